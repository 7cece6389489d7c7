"""Guidance from 2D diffusion priors: score distillation (:mod:`att3d.guidance.sds`), its variant with a learned
baseline (:mod:`att3d.guidance.vsd`, VSD), and the priors."""

from att3d.guidance.priors import DiffusionPrior, PromptConditioning, ShapesPrior
from att3d.guidance.sds import ScoreDistillation, SDSOutput
from att3d.guidance.vsd import VariationalScoreDistillation

__all__ = ["DiffusionPrior", "PromptConditioning", "SDSOutput", "ScoreDistillation", "ShapesPrior",
           "VariationalScoreDistillation"]
