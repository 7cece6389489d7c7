"""att3d: amortized text-to-3D generation (ATT3D, LATTE3D).

A text encoder and a mapping network turn any prompt into the conditioning of a
shared neural field, which is volume-rendered and trained with score
distillation from a diffusion prior on many prompts at once; a mesh head turns
the fields into textured meshes.

``import att3d`` is cheap (no torch); the public API imports what it needs on
first use::

    import att3d
    model = att3d.load("runs/quickstart/<timestamp>/model")
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from att3d.utils.errors import Att3dError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from att3d.model import AmortizedModel

__version__ = "0.1.0"

__all__ = ["Att3dError", "__version__", "load"]


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> AmortizedModel:
    """Load a trained amortized model folder onto ``device``.

    Raises:
        Att3dError: the folder is missing or not an att3d model (one line).
    """
    from att3d.model import load as load_model

    return load_model(path, device=device)
