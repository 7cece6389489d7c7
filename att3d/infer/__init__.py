"""Inference with a trained amortized model: prompts -> files in one forward pass.

- :mod:`att3d.infer.generate`: ``generate(model, prompts)`` (:func:`att3d.model.generate_meshes`: text
  encoder -> mapping -> :mod:`att3d.mesh.extract`), :func:`~att3d.infer.generate.write_outputs` (mesh files and
  turntables) and :func:`~att3d.infer.generate.format_table`.
- :mod:`att3d.infer.turntable`: turntable videos of meshes (rasterized) or fields (volume-rendered).
- :mod:`att3d.infer.interpolate`: objects along paths between prompts' text embeddings.

The commands (``att3d generate``, ``att3d interpolate``) are in :mod:`att3d.cli`. Submodules import torch;
this package itself stays cheap to import.
"""
