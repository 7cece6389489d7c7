"""Diffusion priors behind one interface (:class:`DiffusionPrior`), registered in ``att3d.registry.PRIORS``.

``shapes`` (the embedded shapes-world prior), ``stable_diffusion`` and ``deepfloyd_if``. Importing
this package is cheap: diffusers and transformers are imported when a prior is loaded.
"""

from att3d.guidance.priors.base import DEFAULT_VIEW_SUFFIXES, DiffusionPrior, PromptConditioning, view_index
from att3d.guidance.priors.deepfloyd import DeepFloydPrior
from att3d.guidance.priors.shapes import ShapesPrior, default_shapes_prior_path
from att3d.guidance.priors.stable_diffusion import StableDiffusionPrior

__all__ = ["DEFAULT_VIEW_SUFFIXES", "DeepFloydPrior", "DiffusionPrior", "PromptConditioning", "ShapesPrior",
           "StableDiffusionPrior", "default_shapes_prior_path", "view_index"]
