"""Fast test-time refinement: more score distillation for one prompt, starting from the amortized result.

ATT3D's amortized model gives a good object for a prompt in one forward pass; a few hundred more
SDS steps on that prompt alone can improve it, and start far ahead of per-prompt optimisation
from scratch (DreamFusion). This module does both, on copies, so the amortized model is never
changed::

    refined, history = refine(model, "a red sphere", steps=200, guidance=sds)                 # amortized start
    scratch, history = from_scratch(model, "a red sphere", steps=200, guidance=sds)           # baseline

Two things can be optimised:

- ``mode="params"`` (default): the field conditioning that the mapping generates for the prompt
  (for ATT3D's hypernetwork, the prompt's feature grids) becomes a free ``nn.Parameter``, optionally
  together with the shared field MLP of a deep copy; the mapping network is not used any more.
- ``mode="model"``: a deep copy of the whole model (mapping and field) is trained on the one prompt.

The result is a :class:`RefinedModel`: it behaves like an :class:`~att3d.model.AmortizedModel`
(``conditioning``, ``render``, ``field``, ``config``...), returns the refined conditioning for the
refined prompt, and saves as a model folder (plus ``refined_conditioning.safetensors`` in params
mode; :func:`load_refined` reads it back).

``att3d refine "a red sphere" --steps 200 --out refined/`` (:mod:`att3d.cli.refine`) refines a trained model,
exports the mesh and turntable as ``att3d generate`` does, and saves the refined model folder and the metric
curve; its schedule comes from the guidance config's ``refine:`` block (:func:`schedule_from_config`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from att3d.model import AmortizedModel, copy_model, repeat_conditioning
from att3d.text.encoders import TextEmbedding
from att3d.text.prompts import PromptBank
from att3d.train.batch import Batch
from att3d.train.objectives import Objective, StepResult
from att3d.train.trainer import Trainer, TrainerConfig
from att3d.utils.errors import Att3dError

log = logging.getLogger(__name__)

MODES = ("params", "model")
#: File of the refined conditioning tensors in a refined model folder (params mode).
REFINED_NAME = "refined_conditioning.safetensors"
#: Settings of ``att3d refine`` (from the amortized start) that a guidance config's ``refine:`` block may set.
REFINE_KEYS = ("guidance_scale", "guidance_scale_low", "low_t", "t_max", "lr_final")
#: Keys of :data:`REFINE_KEYS` that configure the :class:`ScoreDistillation` (the rest configure the run).
SDS_KEYS = ("guidance_scale", "guidance_scale_low", "low_t")

EvalFn = Callable[["RefinedModel"], dict[str, float]]


def _normalize(prompt: str) -> str:
    from att3d.text.prompts import normalize_prompt

    return normalize_prompt(prompt)


class RefinedModel(nn.Module):
    """An amortized model refined for one prompt (duck-types :class:`~att3d.model.AmortizedModel`).

    Args:
        model: the (copied) amortized model that was refined; it is a submodule (``.model``).
        prompt: the refined prompt.
        conditioning: params mode: the prompt's refined field conditioning ``{name: (1, ...)}``, returned by
            :meth:`conditioning` for that prompt instead of the mapping's output; None in model mode.
        info: what was done (mode, steps, ...), saved with the model.
    """

    def __init__(self, model: AmortizedModel, prompt: str, conditioning: dict[str, torch.Tensor] | None = None,
                 info: dict[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.prompt = _normalize(prompt)
        self.refined = None
        if conditioning is not None:
            self.refined = nn.ParameterDict({k: nn.Parameter(v.detach().clone()) for k, v in conditioning.items()})
        self.info = dict(info or {})

    # -- the AmortizedModel interface ----------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return self.model.config

    @property
    def field(self) -> nn.Module:
        return self.model.field

    @property
    def mapping(self) -> nn.Module:
        return self.model.mapping

    @property
    def renderer(self) -> nn.Module:
        return self.model.renderer

    @property
    def text_encoder(self) -> nn.Module:
        return self.model.text_encoder

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, *args, **kwargs):  # noqa: D102 - keeps the frozen encoder on the same device
        out = super().to(*args, **kwargs)
        self.model.text_encoder.to(*args, **kwargs)
        return out

    def embed(self, prompts: Sequence[str]) -> TextEmbedding:
        """Embed prompts with the frozen text encoder: -> TextEmbedding (B, L, D)."""
        return self.model.embed(prompts)

    def conditioning(self, prompts_or_embedding: Sequence[str] | TextEmbedding) -> dict[str, torch.Tensor]:
        """Field conditioning (dict of (B, ...) tensors); the refined prompt gets its refined tensors (params mode).

        Embeddings (not prompts) always go through the mapping network.
        """
        if self.refined is None or isinstance(prompts_or_embedding, TextEmbedding):
            return self.model.conditioning(prompts_or_embedding)
        prompts = list(prompts_or_embedding)
        hit = [_normalize(p) == self.prompt for p in prompts]
        if all(hit):
            return {k: v.expand(len(prompts), *v.shape[1:]) for k, v in self.refined.items()}
        out = self.model.conditioning(prompts)
        sel = torch.tensor(hit, device=self.device)
        return {k: torch.where(sel.view(-1, *([1] * (v.dim() - 1))), self.refined[k].to(v.dtype), v)
                for k, v in out.items()}

    def render(self, cond: dict[str, torch.Tensor], cameras, resolution: int, background=(1.0, 1.0, 1.0), **kw):
        """Volume-render the field for conditioning ``cond`` (B prompts) from ``cameras`` (B)."""
        return self.model.render(cond, cameras, resolution, background=background, **kw)

    # -- files ---------------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """A model folder (``att3d.load`` reads it as the refined copy of the amortized model) plus, in params
        mode, ``refined_conditioning.safetensors`` (read by :func:`load_refined`)."""
        from att3d.utils.checkpoint import atomic_folder, save_tensors

        folder = Path(folder)
        meta = {"refined": {"prompt": self.prompt, **self.info}, **(extra or {})}
        with atomic_folder(folder) as tmp:  # the whole folder or nothing
            self.model.write_files(tmp, extra=meta)
            if self.refined is not None:
                save_tensors(tmp / REFINED_NAME, {k: v.detach() for k, v in self.refined.items()})
        return folder


def load_refined(folder: str | os.PathLike, device: str | torch.device = "cpu") -> RefinedModel:
    """Read a folder written by :meth:`RefinedModel.save_pretrained` (with its refined conditioning)."""
    from att3d.model import CONFIG_NAME, load, read_model_config
    from att3d.utils.checkpoint import CheckpointError, load_tensors

    folder = Path(folder)
    model = load(folder, device=device)
    meta = (read_model_config(folder)[1] or {}).get("refined")
    if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str):
        raise CheckpointError(f"{folder} is not a refined model folder (no extra.refined.prompt in {CONFIG_NAME})")
    info = {k: v for k, v in meta.items() if k != "prompt"}
    cond = None
    if (folder / REFINED_NAME).is_file():
        cond = load_tensors(folder / REFINED_NAME, device=device)
        bad = sorted(k for k, v in cond.items() if not v.is_floating_point() or not bool(torch.isfinite(v).all()))
        if bad:
            raise CheckpointError(f"{folder / REFINED_NAME}: tensor {bad[0]} is not finite floating-point data "
                                  "(damaged or diverged)")
    out = RefinedModel(model, meta["prompt"], cond, info).to(device)
    return out.eval()


# ---------------------------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class RefineHistory:
    """What a refinement did.

    Attributes:
        train: one record per step: ``step`` (1-based), ``loss`` (SDS loss value), ``grad_norm``, ``opacity``.
        evals: ``eval_fn``'s metrics with their ``step`` (0 = the starting point, before any update).
        seconds: wall time of the optimisation (evaluations excluded).
        config: the settings (prompt, mode, steps, lrs, ...).
    """

    train: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def finite(self) -> bool:
        """Whether every recorded number is finite."""
        vals = [v for r in self.train + self.evals for v in r.values() if isinstance(v, (int, float))]
        return all(math.isfinite(v) for v in vals)


@dataclass
class RefineSettings:
    """How one prompt is optimised by :func:`refine` and :func:`from_scratch` (the same for both starts).

    Attributes:
        mode: ``params`` (the prompt's generated conditioning as free parameters, plus the field MLP when
            ``train_field``) or ``model`` (the whole copied model on this prompt).
        lr: learning rate of the conditioning (params mode, default 1e-2) or of the mapping (model mode,
            default 1e-3).
        field_lr: learning rate of the shared field (default 1e-3 in params mode, ``lr`` in model mode).
        lr_final: the learning rates decay along a cosine to ``lr_final`` times their start value at the last
            step (1.0: constant). Damps the step-to-step jitter of SDS at the end of a short run.
        t_max: upper end of the SDS timestep range during the run, as a fraction of T (None: the guidance's
            own range and annealing). A start that already has the right shape needs only the lower,
            detail-level noise levels.
        shared_t: one SDS timestep per step, shared by its views (DreamFusion), instead of one per view. With
            ``guidance_scale_low``, whole steps then alternate between shape (noisy) and colour (low-noise)
            updates, each normalised by Adam on its own; mixed in one step, the small low-noise gradients
            would be drowned by the noisy ones.
        train_field: params mode: also train the copy's field MLP (and level gains).
        resolution / batch_views: render size and random views per step.
        eval_every: score every k steps (0: at start and end only) when an ``eval_fn`` is given.
        grad_clip: global gradient-norm clip (None: off); opacity_reg: weight of the mean opacity.
        elevation_deg / radius / fov_deg: the random training cameras.
    """

    mode: str = "params"
    lr: float | None = None
    field_lr: float | None = None
    lr_final: float = 1.0
    t_max: float | None = None
    shared_t: bool = True
    train_field: bool = True
    resolution: int = 32
    batch_views: int = 4
    seed: int = 0
    eval_every: int = 0
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    grad_clip: float | None = 1.0
    opacity_reg: float = 0.0
    elevation_deg: tuple[float, float] = (-10.0, 45.0)
    radius: float = 2.2
    fov_deg: float = 40.0
    progress: bool = True

    def check(self) -> None:
        if self.mode not in MODES:
            raise Att3dError(f"unknown refinement mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.batch_views < 1 or self.resolution < 1:
            raise Att3dError("batch_views and resolution must be positive")
        if not 0.0 < self.lr_final <= 1.0:
            raise Att3dError(f"lr_final must be in (0, 1], got {self.lr_final}")
        if self.t_max is not None and not 0.0 < self.t_max <= 1.0:
            raise Att3dError(f"t_max must be in (0, 1], got {self.t_max}")


def _run_guidance(guidance, t_max: float | None, shared_t: bool):
    """``guidance`` for one run (a new object on the same prior): its timestep range ends at ``t_max``
    (None: unchanged) and it draws one timestep per step (``shared_t``) or one per view."""
    changes: dict[str, Any] = {"per_item_t": not shared_t}
    if t_max is not None:
        changes.update(t_range=(min(float(guidance.t_range[0]), float(t_max)), float(t_max)), t_anneal=None)
    return guidance.replace(**changes)


class RefineSDS(Objective):
    """Test-time refinement of one prompt: its refined field rendered from ``views_per_prompt`` random views per
    step, with the prior's SDS (the timestep and noise drawn by the guidance, one timestep per step when it is
    shared). The parameter groups (their own learning rates) are given: see :func:`refine`."""

    name = "refine"
    distributed = False
    mixing = False

    def __init__(self, groups: list[dict[str, Any]], opacity_reg: float = 0.0):
        self.groups = groups
        self.opacity_reg = float(opacity_reg)

    def param_groups(self, trainer: Trainer) -> list[dict[str, Any]]:
        return self.groups

    def step(self, trainer: Trainer, batch: Batch) -> StepResult:
        model = trainer.model
        cond = repeat_conditioning(model.conditioning([trainer.prompts.prompts[0]]), len(batch.cameras))
        out = model.renderer(model.field, cond, batch.cameras, trainer.cfg.resolution, background=trainer.background,
                             generator=trainer.generator)
        images = out["rgb"].float().permute(0, 3, 1, 2)
        sds = trainer.guidance(images, batch.cond, batch.cameras, step=trainer.step, generator=trainer.generator)
        opacity = out["opacity"].float().mean()
        loss = sds.loss + self.opacity_reg * opacity if self.opacity_reg else sds.loss
        return StepResult(loss, sds, {"opacity": opacity}, images)


class _Curve:
    """Trainer callback of a refinement run: the per-step records and the evaluation curve of its history."""

    def __init__(self, history: RefineHistory, eval_fn: EvalFn | None, every: int):
        self.history, self.eval_fn, self.every = history, eval_fn, every
        self.t0 = 0.0

    def evaluate(self, trainer: Trainer) -> None:
        if self.eval_fn is None:
            return
        trainer.model.eval()
        with torch.no_grad():
            metrics = self.eval_fn(trainer.model)
        self.history.evals.append({"step": trainer.step, **{k: float(v) for k, v in metrics.items()}})

    def on_start(self, trainer: Trainer) -> None:
        self.evaluate(trainer)
        self.t0 = time.time()

    def on_step(self, trainer: Trainer, stats: dict[str, float]) -> None:
        self.history.train.append({"step": trainer.step, "loss": stats["loss"], "grad_norm": stats["grad_norm"],
                                   "opacity": stats["opacity"]})
        last = trainer.step == trainer.cfg.max_steps
        if self.eval_fn is not None and (last or (self.every > 0 and trainer.step % self.every == 0)):
            self.history.seconds += time.time() - self.t0
            self.evaluate(trainer)
            self.t0 = time.time()

    def on_end(self, trainer: Trainer) -> None:
        if self.eval_fn is None or not self.history.evals or self.history.evals[-1]["step"] != trainer.step:
            self.history.seconds += time.time() - self.t0
            self.evaluate(trainer)


def _optimise(refined: RefinedModel, prompt: str, steps: int, guidance, groups: list[dict[str, Any]],
              opts: RefineSettings, eval_fn: EvalFn | None, history: RefineHistory) -> None:
    """SDS on one prompt for ``steps`` steps, ``opts.batch_views`` random views per step (updates ``refined``),
    through the one training loop (:class:`~att3d.train.trainer.Trainer`, no run folder)."""
    cfg = TrainerConfig(max_steps=steps, batch_size=1, views_per_prompt=opts.batch_views, resolution=opts.resolution,
                        lr=float(groups[0]["lr"]), lr_final=opts.lr_final, grad_clip=opts.grad_clip or 0.0,
                        elevation_deg=tuple(opts.elevation_deg), radius=opts.radius, fov_deg=opts.fov_deg,
                        checkpoint_every=max(1, steps), log_every=1, image_every=0, max_bad_steps=steps,
                        seed=opts.seed, device=str(refined.device), mixed_precision=False)
    trainer = Trainer(refined, PromptBank([prompt]), _run_guidance(guidance, opts.t_max, opts.shared_t), cfg,
                      run_dir=None, objective=RefineSDS(groups, opts.opacity_reg), background=opts.background,
                      progress=opts.progress, callbacks=[_Curve(history, eval_fn, opts.eval_every)])
    trainer.fit(resume=False)
    if trainer.bad_steps:
        log.warning("%d of %d refinement steps skipped (non-finite loss or gradient)", trainer.bad_steps, steps)


def _run(start: AmortizedModel, prompt: str, steps: int, guidance, opts: RefineSettings, eval_fn: EvalFn | None,
         info: dict[str, Any]) -> tuple[RefinedModel, RefineHistory]:
    """Refine ``start`` (already a private copy) on ``prompt``."""
    opts.check()
    if steps < 0:
        raise Att3dError(f"steps must be >= 0, got {steps}")
    prompt = _normalize(prompt)
    start.eval()  # no spectral-norm power iteration while reading the starting conditioning
    if opts.mode == "params":
        lr = 1e-2 if opts.lr is None else float(opts.lr)
        field_lr = 1e-3 if opts.field_lr is None else float(opts.field_lr)
        with torch.no_grad():
            cond = start.conditioning([prompt])
        refined = RefinedModel(start, prompt, cond)
        start.mapping.requires_grad_(False)
        start.field.requires_grad_(opts.train_field)
        groups = [{"params": list(refined.refined.parameters()), "lr": lr}]
        if opts.train_field:
            groups.append({"params": [p for p in start.field.parameters()], "lr": field_lr})
    else:
        lr = 1e-3 if opts.lr is None else float(opts.lr)
        field_lr = lr if opts.field_lr is None else float(opts.field_lr)
        refined = RefinedModel(start, prompt, None)
        start.requires_grad_(True)
        groups = [{"params": list(start.mapping.parameters()), "lr": lr},
                  {"params": list(start.field.parameters()), "lr": field_lr}]
    groups = [g for g in groups if g["params"]]
    history = RefineHistory(config={"prompt": prompt, "mode": opts.mode, "steps": steps, "lr": lr,
                                    "field_lr": field_lr, "lr_final": opts.lr_final, "t_max": opts.t_max,
                                    "shared_t": opts.shared_t,
                                    "guidance_scale": getattr(guidance, "guidance_scale", None),
                                    "guidance_scale_low": getattr(guidance, "guidance_scale_low", None),
                                    "train_field": opts.train_field, "resolution": opts.resolution,
                                    "batch_views": opts.batch_views, "seed": opts.seed, **info})
    refined.info = {"mode": opts.mode, "steps": steps, **info}
    _optimise(refined, prompt, steps, guidance, groups, opts, eval_fn, history)
    for p in refined.parameters():
        p.requires_grad_(False)
    return refined, history


def _settings(kwargs: dict[str, Any], caller: str) -> tuple[RefineSettings, EvalFn | None]:
    kwargs = dict(kwargs)
    eval_fn = kwargs.pop("eval_fn", None)
    names = {f.name for f in fields(RefineSettings)}
    unknown = set(kwargs) - names
    if unknown:
        raise TypeError(f"{caller}() got unexpected arguments {sorted(unknown)}")
    for key in ("elevation_deg", "background"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return RefineSettings(**kwargs), eval_fn


def refine(model: AmortizedModel, prompt: str, steps: int, guidance, **kwargs: Any
           ) -> tuple[RefinedModel, RefineHistory]:
    """Refine the amortized model's output for one prompt with ``steps`` SDS steps; ``model`` is left unchanged.

    Each step renders the prompt's field from ``batch_views`` random training views at ``resolution``
    (B = batch_views images (B, 3, H, W)), and applies the SDS gradient of ``guidance`` with Adam.

    Args:
        model: the amortized model (not modified: all work happens on :func:`copy_model`).
        prompt: the prompt to refine.
        steps: SDS steps.
        guidance: a :class:`att3d.guidance.sds.ScoreDistillation` (see :func:`att3d.config.build_guidance`).
        kwargs: the fields of :class:`RefineSettings` (``mode``, ``lr``, ``lr_final``, ``t_max``, ...) and
            ``eval_fn``: optional ``fn(refined_model) -> {metric: value}`` called (without gradients, in eval
            mode) before the first step, every ``eval_every`` steps and after the last (e.g.
            :func:`att3d.eval.refine_eval.shapes_eval_fn`).

    Returns:
        ``(refined, history)``: the :class:`RefinedModel` (a copy) and its :class:`RefineHistory`.
    """
    opts, eval_fn = _settings(kwargs, "refine")
    return _run(copy_model(model), prompt, steps, guidance, opts, eval_fn, {"from_scratch": False})


def fresh_model(model: AmortizedModel, seed: int = 0) -> AmortizedModel:
    """A newly initialised model of the same configuration as ``model`` (sharing its text encoder).

    The initialisation is drawn from a forked RNG seeded with ``seed``; the global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) + 1_000_003)
        fresh = AmortizedModel(model.config, text_encoder=model.text_encoder)
    return fresh.to(model.device)


def from_scratch(model: AmortizedModel, prompt: str, steps: int, guidance, init_seed: int | None = None,
                 **kwargs: Any) -> tuple[RefinedModel, RefineHistory]:
    """The DreamFusion-style baseline: the same architecture, prior and steps, from a fresh initialisation.

    A newly initialised model of ``model``'s configuration (:func:`fresh_model`; ``model`` itself is only
    read for its config) is optimised on ``prompt`` exactly as :func:`refine` optimises the amortized one:
    in params mode the fresh mapping's output (a near-empty grid: the initial density bump) becomes the
    free conditioning, in model mode the whole fresh model is trained.

    Args:
        init_seed: seed of the fresh initialisation (default: the ``seed`` setting).
        kwargs: as :func:`refine`.
    """
    opts, eval_fn = _settings(kwargs, "from_scratch")
    start = fresh_model(model, opts.seed if init_seed is None else init_seed)
    return _run(start, prompt, steps, guidance, opts, eval_fn, {"from_scratch": True})


# ---------------------------------------------------------------------------------------------------------------
# The schedule of a guidance config's refine block
# ---------------------------------------------------------------------------------------------------------------

def schedule_from_config(gcfg: dict[str, Any], from_scratch: bool = False,
                         overrides: dict[str, float | None] | None = None, source: str = "") -> dict[str, float | None]:
    """The SDS schedule of one refinement run: ``{"guidance_scale", "guidance_scale_low", "low_t", "t_max",
    "lr_final"}``, from a ``guidance`` config group (a dict, e.g. :func:`att3d.config.guidance_config`).

    Precedence: ``overrides`` (values that are not None) > the config's ``refine:`` block (only when refining
    from the amortized start: a start of the right shape needs other settings than a run that must first form
    it) > the config's own ``guidance_scale``, its full timestep range and a constant learning rate (None here).

    Raises:
        Att3dError: the refine block has keys other than :data:`REFINE_KEYS` (``source`` names the config).
    """
    block = dict(gcfg.get("refine") or {})
    unknown = set(block) - set(REFINE_KEYS)
    if unknown:
        raise Att3dError(f"unknown keys {sorted(unknown)} in the refine block of guidance {source!r} "
                         f"(allowed: {', '.join(REFINE_KEYS)})")
    out: dict[str, float | None] = {"guidance_scale": None, "guidance_scale_low": None, "low_t": None,
                                    "t_max": None, "lr_final": 1.0}
    if not from_scratch:
        out.update({k: float(v) for k, v in block.items() if v is not None})
    out.update({k: float(v) for k, v in (overrides or {}).items() if v is not None})
    return out
