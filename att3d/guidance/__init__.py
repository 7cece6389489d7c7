"""Guidance from 2D diffusion priors: score distillation (:mod:`att3d.guidance.sds`) and the priors."""

from att3d.guidance.priors import DiffusionPrior, PromptConditioning, ShapesPrior
from att3d.guidance.sds import ScoreDistillation, SDSOutput

__all__ = ["DiffusionPrior", "PromptConditioning", "SDSOutput", "ScoreDistillation", "ShapesPrior"]
