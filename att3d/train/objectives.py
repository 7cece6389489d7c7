"""Stage objectives: what one training step renders and which loss it minimises.

The :class:`~att3d.train.trainer.Trainer` owns everything a stage shares (the batch of prompts and cameras,
the optimiser step with its schedule, non-finite skipping and clipping, checkpoints, resume, signals,
logging and data parallelism); an objective owns only its step's forward pass::

    batch (prompts, embeddings, prior conditioning, cameras)
        --objective.step(trainer, batch)--> StepResult(loss, sds, stats, images)

Stages: :class:`NerfSDS` (ATT3D: amortized SDS through volume rendering, the default of ``att3d train``),
:class:`att3d.train.mesh_stage.MeshSDS` (LATTE3D's textured-mesh stage, ``stage=mesh``) and
:class:`att3d.train.refine.RefineSDS` (test-time refinement of one prompt). A new stage subclasses
:class:`Objective` and registers under a name in :data:`STAGES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from att3d.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from att3d.train.batch import Batch
    from att3d.train.trainer import Trainer

#: Stage objectives by the name of the ``stage`` config group.
STAGES = Registry("training stage", ("att3d.train.objectives", "att3d.train.mesh_stage", "att3d.train.oracle"))


@dataclass
class StepResult:
    """The forward pass of one step on this rank.

    Attributes:
        loss: scalar to minimise (the SDS loss plus the stage's regularisers).
        sds: the :class:`~att3d.guidance.sds.SDSOutput` of the step (its loss, gradient norm, timesteps and
            count of non-finite items are logged).
        stats: more scalars to log, averaged over the ranks (e.g. ``opacity``).
        images: (N, 3, H, W) the renders the prior saw (logged to TensorBoard).
    """

    loss: torch.Tensor
    sds: Any
    stats: dict[str, float | torch.Tensor] = field(default_factory=dict)
    images: torch.Tensor | None = None


class Objective:
    """A training stage's forward pass (see the module docstring).

    Class attributes:
        name: the stage's name (recorded in the model folder's ``extra["stage"]``).
        distributed: whether the stage runs under ``torchrun`` (data parallel).
        mixing: whether the stage trains on mixtures of two prompts (ATT3D's interpolation training).
    """

    name = "objective"
    distributed = True
    mixing = True
    #: the model folder the run started from (``init_from``) and that folder's ``extra`` (set by the builder)
    source: str | None = None
    source_extra: dict[str, Any] | None = None
    #: the grid levels added to ``source``'s model (``grow_levels``; :func:`att3d.train.grow.grow_levels`)
    grown_levels: list[int] | None = None

    def setup(self, trainer: Trainer) -> None:
        """Called once by the trainer after it built the model, prompts and embeddings (before any resume)."""

    def param_groups(self, trainer: Trainer) -> list[dict[str, Any]]:
        """The optimiser's parameter groups (each with its base ``lr``): by default every model parameter at
        ``trainer.lr``; with ``trainer.mapping_lr_scale`` != 1 the mapping network's parameters form a second group
        at ``mapping_lr_scale * lr`` (the first group, whose rate is logged, holds the rest)."""
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        lr, scale = trainer.cfg.lr, trainer.cfg.mapping_lr_scale
        if scale == 1.0:
            return [{"params": params, "lr": lr}]
        mapping = {id(p) for p in trainer.model.mapping.parameters()}
        return [{"params": [p for p in params if id(p) not in mapping], "lr": lr},
                {"params": [p for p in params if id(p) in mapping], "lr": lr * scale}]

    def step(self, trainer: Trainer, batch: Batch) -> StepResult:
        """The forward pass of one step for this rank's rows of ``batch``."""
        raise NotImplementedError

    def record(self, trainer: Trainer) -> dict[str, Any]:
        """What the final model folder's ``extra`` records about the stage."""
        record: dict[str, Any] = {"stage": self.name, "steps": trainer.step, "prompts": len(trainer.prompts)}
        if self.source is not None:
            record["init_from"] = self.source
        if self.grown_levels:
            record["grown_levels"] = list(self.grown_levels)
        guidance = getattr(trainer, "guidance", None)
        if guidance is not None and hasattr(guidance, "record"):
            record["teacher"] = guidance.record()
        if self.source_extra:
            record["previous"] = self.source_extra
        return record


def opacity_regularisers(opacity: torch.Tensor, opacity_reg: float, entropy_reg: float) -> torch.Tensor:
    """``opacity_reg * mean(o) + entropy_reg * mean(H(o))`` (H: binary entropy) of accumulated opacity (...)."""
    loss = torch.zeros((), device=opacity.device)
    if opacity_reg:
        loss = loss + opacity_reg * opacity.mean()
    if entropy_reg:
        o = opacity.clamp(1e-5, 1 - 1e-5)
        loss = loss + entropy_reg * (-(o * o.log() + (1 - o) * (1 - o).log())).mean()
    return loss


@STAGES.register("nerf")
class NerfSDS(Objective):
    """ATT3D's stage: map each row's embedding to field conditioning, volume-render it from the row's camera at
    ``trainer.resolution`` and take the prior's SDS gradient; optional opacity and entropy regularisers
    (``trainer.opacity_reg``, ``trainer.entropy_reg``). bf16 autocast on CUDA with ``trainer.mixed_precision``.
    """

    name = "nerf"

    def step(self, trainer: Trainer, batch: Batch) -> StepResult:
        cfg, model = trainer.cfg, trainer.model
        use_amp = cfg.mixed_precision and trainer.device.type == "cuda"
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=use_amp):
            field_cond = model.mapping(batch.emb)
            out = model.renderer(model.field, field_cond, batch.cameras, cfg.resolution,
                                 background=trainer.background, generator=trainer.render_random())
        images = out["rgb"].float().permute(0, 3, 1, 2)
        sds = trainer.score_distillation(images, batch)
        opacity = out["opacity"].float()
        loss = sds.loss
        if cfg.opacity_reg or cfg.entropy_reg:
            loss = loss + opacity_regularisers(opacity, cfg.opacity_reg, cfg.entropy_reg)
        return StepResult(loss, sds, {"opacity": opacity.mean()}, images)
