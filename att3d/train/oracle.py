"""Oracle fits: the same model and stages trained by direct supervision on the shapes world's renders.

Score distillation only tells a model what a 32 px prior believes; the **oracle** replaces the prior's
gradient with the ground truth itself, so that its scores are the ceiling of the representation (mapping,
field, renderer or mesh stage) on the shapes world, and the distance of an SDS model to it is known::

    att3d train stage=oracle prompts.train=shapes64 name=oracle                     # NeRF stage, from scratch
    att3d train stage=mesh_oracle init_from=RUN/model prompts.train=shapes64        # then the mesh stage

Each step renders the batch exactly as the SDS stage does (same cameras, same resolution, same
background) and minimises ``mean |render - truth|^2`` plus ``mask_weight * mean (opacity - mask)^2``
against :func:`att3d.world.render.render_objects` of each row's object (its prompt must be a shapes-world
caption). The trainer's loop, checkpoints and resume are the same; the prior is loaded but not used
(the logged ``sds_*`` figures are the supervised loss, with a zero gradient norm). No mixing: a mixture of
two prompts has no ground truth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from att3d.guidance.sds import SDSOutput
from att3d.train.mesh_stage import MeshSDS
from att3d.train.objectives import STAGES, NerfSDS, StepResult
from att3d.utils.errors import Att3dError

if TYPE_CHECKING:  # pragma: no cover
    from att3d.train.batch import Batch
    from att3d.train.trainer import Trainer


class OracleError(Att3dError):
    """An oracle fit cannot run (a prompt that is not a shapes-world caption)."""


def ground_truth_batch(trainer: Trainer, batch: Batch) -> dict[str, torch.Tensor]:
    """The shapes world's renders of the batch's rows: ``rgb`` (N, H, W, 3) and ``mask`` (N, H, W)."""
    from att3d.world.render import render_objects
    from att3d.world.shapes import CaptionError, parse_caption

    idx = batch.idx.repeat_interleave(batch.views) if batch.views > 1 else batch.idx
    try:
        objects = [parse_caption(trainer.prompts.prompts[int(i)]) for i in idx]
    except CaptionError as e:
        raise OracleError(f"an oracle fit needs shapes-world captions: {e}") from None
    with torch.no_grad():
        out = render_objects(objects, batch.cameras, trainer.cfg.resolution)
    return {"rgb": out["rgb"].to(trainer.device), "mask": out["mask"].to(trainer.device)}


def supervised(images: torch.Tensor, opacity: torch.Tensor, truth: dict[str, torch.Tensor],
               mask_weight: float) -> SDSOutput:
    """The supervised loss in the trainer's SDS record: ``mse(rgb) + mask_weight * mse(opacity)``.

    Args:
        images: (N, 3, H, W) renders; opacity: (N, H, W); truth: :func:`ground_truth_batch`.
    """
    loss = (images - truth["rgb"].permute(0, 3, 1, 2)).square().mean()
    if mask_weight > 0:
        loss = loss + mask_weight * (opacity - truth["mask"]).square().mean()
    n = images.shape[0]
    return SDSOutput(loss=loss, grad_norm=torch.zeros(()), t=torch.zeros(n, dtype=torch.long))


@STAGES.register("oracle")
class NerfOracle(NerfSDS):
    """The NeRF stage supervised by ground-truth renders (see the module docstring).

    Args:
        mask_weight: weight of the opacity-vs-silhouette term.
    """

    name = "oracle"
    mixing = False
    from_scratch = True  # no init_from needed

    def __init__(self, mask_weight: float = 1.0):
        if not (isinstance(mask_weight, (int, float)) and mask_weight >= 0):
            raise OracleError(f"stage.mask_weight must be >= 0, got {mask_weight!r}")
        self.mask_weight = float(mask_weight)

    def step(self, trainer: Trainer, batch: Batch) -> StepResult:
        model, cfg = trainer.model, trainer.cfg
        cond = model.mapping(batch.emb)
        out = model.renderer(model.field, cond, batch.cameras, cfg.resolution, background=trainer.background,
                             generator=trainer.render_random())
        images = out["rgb"].float().permute(0, 3, 1, 2)
        opacity = out["opacity"].float()
        sds = supervised(images, opacity, ground_truth_batch(trainer, batch), self.mask_weight)
        return StepResult(sds.loss, sds, {"opacity": opacity.mean()}, images)


@STAGES.register("mesh_oracle")
class MeshOracle(MeshSDS):
    """The mesh stage supervised by ground-truth renders: its meshes, rasterized and coloured (and shaded, with
    ``shading=lambert``) as :class:`~att3d.train.mesh_stage.MeshSDS` does, against the truth. The defaults are the
    mesh stage's (texture mode, density anchored, antialiased renders). In geometry mode the antialiased
    occlusion edges pull the silhouettes towards the truth's; without them (``antialias=false``) and without an
    anchor the surface grows without bound (nothing pulls back a surface that covers too much; measured in the
    model card of ``assets/att3d-shapes64``).

    Args:
        mask_weight: weight of the coverage-vs-silhouette term (the hard coverage has no gradient: it only scores;
            the silhouettes move through the antialiased colours).
        **kw: :class:`~att3d.train.mesh_stage.MeshSDS`'s arguments.
    """

    name = "mesh_oracle"

    def __init__(self, mask_weight: float = 0.0, tet_resolution: int = 64, geometry: bool = False,
                 anchor_weight: float = 1.0, anchor_points: int = 2048, anchor_band: float = 2.0,
                 colour_offset: float | None = None, min_resolution: int = 8, shading: str = "none",
                 antialias: bool = True, coarse_step: int = 4):
        super().__init__(tet_resolution=tet_resolution, geometry=geometry, anchor_weight=anchor_weight,
                         anchor_points=anchor_points, anchor_band=anchor_band, colour_offset=colour_offset,
                         min_resolution=min_resolution, shading=shading, antialias=antialias,
                         coarse_step=coarse_step)
        if not (isinstance(mask_weight, (int, float)) and mask_weight >= 0):
            raise OracleError(f"stage.mask_weight must be >= 0, got {mask_weight!r}")
        self.mask_weight = float(mask_weight)

    def step(self, trainer: Trainer, batch: Batch) -> StepResult:
        r = self.render_batch(trainer, batch)
        sds = supervised(r["images"], r["mask"], ground_truth_batch(trainer, batch), self.mask_weight)
        return StepResult(sds.loss + self.anchor_weight * r["anchor"], sds, r["stats"], r["images"])
