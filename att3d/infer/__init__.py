"""Inference with a trained amortized model: prompts -> textured meshes and turntables in one forward pass.

- :mod:`att3d.infer.generate`: ``generate(model, prompts)`` (text encoder -> mapping -> field ->
  iso-surface -> UV atlas + baked texture -> trimesh), :func:`~att3d.infer.generate.write_outputs`,
  and the ``att3d generate`` command.
- :mod:`att3d.infer.turntable`: turntable videos of meshes (rasterized) or fields (volume-rendered).
- :mod:`att3d.infer.atlas`: the fast box-projection UV atlas used for baking.

Submodules import torch; this package itself stays cheap to import.
"""
