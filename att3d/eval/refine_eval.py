"""Shapes-world metrics of a refinement run: one prompt's object against its ground truth, step by step.

:func:`shapes_eval_fn` is the ``eval_fn`` that :func:`att3d.train.refine.refine` and
:func:`~att3d.train.refine.from_scratch` call before the first step, every ``eval_every`` steps and after
the last (``att3d refine``, ``scripts/refine_curve.py``).
"""

from __future__ import annotations

import torch

from att3d.train.refine import EvalFn
from att3d.world import metrics
from att3d.world.metrics import field_occupancy, render_views
from att3d.world.shapes import parse_caption


def is_shapes_caption(prompt: str) -> bool:
    """Whether ``prompt`` names a shapes-world object (``a {colour} {shape}``)."""
    try:
        parse_caption(prompt)
    except ValueError:
        return False
    return True


def shapes_eval_fn(prompt: str, resolution: int = 64, n_views: int = 8,
                   threshold: float | None = None) -> EvalFn:
    """``fn(model) -> {volume_iou, silhouette_iou, colour_error}`` of ``prompt``'s object against its ground truth.

    Volume IoU on the 64^3 voxel centres (density above the extraction threshold); silhouette IoU and colour
    error from the 8 evaluation views rendered at ``resolution`` (WORLD.md's metrics, as ``att3d eval model``).
    """
    obj = parse_caption(prompt)

    @torch.no_grad()
    def fn(model) -> dict[str, float]:
        cond = model.conditioning([prompt])
        occ = field_occupancy(model, cond, metrics.VOXEL_RESOLUTION, threshold)
        rgb, op = render_views(model, cond, resolution, n_views)
        return metrics.score_object(occ[0], rgb[0], op[0], obj)

    return fn
