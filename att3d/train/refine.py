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

``att3d refine "a red sphere" --steps 200 --out refined/`` refines a trained model, exports the mesh
and turntable as ``att3d generate`` does, and saves the refined model folder and the metric curve.
"""

from __future__ import annotations

import copy
import json
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

from att3d.model import AmortizedModel
from att3d.text.encoders import TextEmbedding
from att3d.utils.errors import Att3dError

log = logging.getLogger(__name__)

MODES = ("params", "model")
#: File of the refined conditioning tensors in a refined model folder (params mode).
REFINED_NAME = "refined_conditioning.safetensors"
#: Default model folder of ``att3d refine`` (relative to the repository root when not found here).
DEFAULT_CHECKPOINT = "assets/att3d-shapes64"
#: Settings of ``att3d refine`` (from the amortized start) that a guidance config's ``refine:`` block may set.
REFINE_KEYS = ("guidance_scale", "guidance_scale_low", "low_t", "t_max", "lr_final")
#: Keys of :data:`REFINE_KEYS` that configure the :class:`ScoreDistillation` (the rest configure the run).
SDS_KEYS = ("guidance_scale", "guidance_scale_low", "low_t")

EvalFn = Callable[["RefinedModel"], dict[str, float]]


def _normalize(prompt: str) -> str:
    from att3d.text.prompts import normalize_prompt

    return normalize_prompt(prompt)


def copy_model(model: AmortizedModel) -> AmortizedModel:
    """A deep copy of ``model`` (mapping, field, renderer, buffers) that shares its frozen text encoder."""
    memo = {id(model.text_encoder): model.text_encoder}
    return copy.deepcopy(model, memo)


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
        from att3d.utils.checkpoint import save_tensors

        folder = Path(folder)
        meta = {"refined": {"prompt": self.prompt, **self.info}, **(extra or {})}
        self.model.save_pretrained(folder, extra=meta)
        if self.refined is not None:
            save_tensors(folder / REFINED_NAME, {k: v.detach() for k, v in self.refined.items()})
        return folder


def load_refined(folder: str | os.PathLike, device: str | torch.device = "cpu") -> RefinedModel:
    """Read a folder written by :meth:`RefinedModel.save_pretrained` (with its refined conditioning)."""
    from att3d.model import CONFIG_NAME, load
    from att3d.utils.checkpoint import CheckpointError, load_json, load_tensors

    folder = Path(folder)
    model = load(folder, device=device)
    meta = (load_json(folder / CONFIG_NAME).get("extra") or {}).get("refined")
    if not meta or "prompt" not in meta:
        raise CheckpointError(f"{folder} is not a refined model folder (no extra.refined.prompt in {CONFIG_NAME})")
    info = {k: v for k, v in meta.items() if k != "prompt"}
    cond = None
    if (folder / REFINED_NAME).is_file():
        cond = load_tensors(folder / REFINED_NAME, device=device)
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


def cosine_factor(step: int, steps: int, final: float) -> float:
    """Learning-rate factor at ``step`` of ``steps``: 1 at step 0, ``final`` at the last step (cosine)."""
    if steps <= 1 or final >= 1.0:
        return 1.0
    p = min(1.0, step / (steps - 1))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * p))


def _run_guidance(guidance, t_max: float | None, shared_t: bool):
    """``guidance`` for one run (a new object on the same prior): its timestep range ends at ``t_max``
    (None: unchanged) and it draws one timestep per step (``shared_t``) or one per view."""
    changes: dict[str, Any] = {"per_item_t": not shared_t}
    if t_max is not None:
        changes.update(t_range=(min(float(guidance.t_range[0]), float(t_max)), float(t_max)), t_anneal=None)
    return guidance.replace(**changes)


def _optimise(refined: RefinedModel, prompt: str, steps: int, guidance, groups: list[dict[str, Any]],
              opts: RefineSettings, eval_fn: EvalFn | None, history: RefineHistory, desc: str) -> None:
    """SDS on one prompt for ``steps`` steps, ``opts.batch_views`` random views per step (updates ``refined``)."""
    from tqdm import tqdm

    from att3d.eval.model_eval import repeat_cond
    from att3d.render.cameras import OrbitCameras

    device = refined.device
    gen = torch.Generator().manual_seed(opts.seed)
    guidance = _run_guidance(guidance, opts.t_max, opts.shared_t)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.Adam(groups, betas=(0.9, 0.99))
    base_lrs = [g["lr"] for g in opt.param_groups]
    views = opts.batch_views
    prior_cond = guidance.prior.encode_prompts([prompt]).repeat_interleave(views)
    bg = torch.tensor(opts.background, dtype=torch.float32, device=device)

    def evaluate(step: int) -> None:
        if eval_fn is None:
            return
        refined.eval()
        with torch.no_grad():
            metrics = eval_fn(refined)
        history.evals.append({"step": step, **{k: float(v) for k, v in metrics.items()}})

    evaluate(0)
    bar = tqdm(range(steps), disable=not opts.progress, desc=desc, dynamic_ncols=True)
    t0 = time.time()
    for step in bar:
        refined.train()
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * cosine_factor(step, steps, opts.lr_final)
        cams = OrbitCameras.sample_training(views, gen, opts.elevation_deg, opts.radius, opts.fov_deg).to(device)
        cond = repeat_cond(refined.conditioning([prompt]), views)
        out = refined.renderer(refined.field, cond, cams, opts.resolution, background=bg, generator=gen)
        images = out["rgb"].float().permute(0, 3, 1, 2)
        sds = guidance(images, prior_cond, cams, step=step, generator=gen)
        opacity = out["opacity"].float().mean()
        loss = sds.loss + opts.opacity_reg * opacity if opts.opacity_reg else sds.loss
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            log.warning("non-finite loss at refinement step %d: skipped", step + 1)
            continue
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, opts.grad_clip if opts.grad_clip else float("inf"))
        if not torch.isfinite(norm):
            log.warning("non-finite gradient at refinement step %d: skipped", step + 1)
            opt.zero_grad(set_to_none=True)
            continue
        opt.step()
        rec = {"step": step + 1, "loss": float(sds.loss.detach()), "grad_norm": float(norm),
               "opacity": float(opacity.detach())}
        history.train.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3g}", op=f"{rec['opacity']:.2f}")
        every = opts.eval_every
        if eval_fn is not None and (step + 1 == steps or (every > 0 and (step + 1) % every == 0)):
            history.seconds += time.time() - t0
            evaluate(step + 1)
            t0 = time.time()
    history.seconds += time.time() - t0
    bar.close()
    refined.eval()


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
    _optimise(refined, prompt, steps, guidance, groups, opts, eval_fn, history,
              desc="refine" if not info.get("from_scratch") else "scratch")
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
        guidance: a :class:`att3d.guidance.sds.ScoreDistillation` (see :func:`att3d.train.app.build_guidance`).
        kwargs: the fields of :class:`RefineSettings` (``mode``, ``lr``, ``lr_final``, ``t_max``, ...) and
            ``eval_fn``: optional ``fn(refined_model) -> {metric: value}`` called (without gradients, in eval
            mode) before the first step, every ``eval_every`` steps and after the last (e.g.
            :func:`shapes_eval_fn`).

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
# Metrics of the shapes world
# ---------------------------------------------------------------------------------------------------------------

def is_shapes_caption(prompt: str) -> bool:
    """Whether ``prompt`` names a shapes-world object (``a {colour} {shape}``)."""
    from att3d.world.shapes import parse_caption

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
    from att3d.eval.model_eval import field_occupancy, render_views
    from att3d.world import metrics
    from att3d.world.shapes import parse_caption

    obj = parse_caption(prompt)

    @torch.no_grad()
    def fn(model) -> dict[str, float]:
        cond = model.conditioning([prompt])
        occ = field_occupancy(model, cond, metrics.VOXEL_RESOLUTION, threshold)
        rgb, op = render_views(model, cond, resolution, n_views)
        return metrics.score_object(occ[0], rgb[0], op[0], obj)

    return fn


# ---------------------------------------------------------------------------------------------------------------
# att3d refine
# ---------------------------------------------------------------------------------------------------------------

def guidance_config(name_or_path: str, prior: str | None = None) -> dict[str, Any]:
    """A ``guidance`` config group as a dict: a name in ``configs/guidance/`` or a YAML file; ``prior`` overrides
    ``prior.path``."""
    from omegaconf import OmegaConf

    from att3d.train.app import configs_dir

    path = Path(name_or_path)
    if not path.suffix:
        path = configs_dir() / "guidance" / f"{name_or_path}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in (configs_dir() / "guidance").glob("*.yaml"))
        raise Att3dError(f"unknown guidance {name_or_path!r}: no {path} (choose from {', '.join(choices)} "
                         "or give a YAML file)")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if prior:
        cfg["prior"]["path"] = prior
    return cfg


def load_guidance(name_or_path: str = "shapes", prior: str | None = None, device: str | torch.device = "cpu",
                  guidance_scale: float | None = None, **sds: float | None):
    """``(ScoreDistillation, background)`` of a guidance config (see :func:`guidance_config`); ``guidance_scale``
    and ``sds`` (``guidance_scale_low``, ``low_t``; None: keep the config's) override the config's values."""
    from att3d.train.app import build_guidance, resolve_path

    cfg = guidance_config(name_or_path, prior)
    prior_path = cfg["prior"].get("path")
    if cfg["prior"].get("name") == "shapes" and prior_path and not resolve_path(prior_path).exists():
        raise Att3dError(f"no shapes prior at {prior_path} (train one with scripts/train_prior.py or pass --prior)")
    if guidance_scale is not None:
        if not guidance_scale > 0:
            raise Att3dError(f"--guidance-scale must be positive, got {guidance_scale}")
        cfg["guidance_scale"] = float(guidance_scale)
    unknown = set(sds) - set(SDS_KEYS)
    if unknown:
        raise TypeError(f"load_guidance() got unexpected arguments {sorted(unknown)}")
    cfg.update({k: float(v) for k, v in sds.items() if v is not None})
    background = tuple(cfg.get("background") or (1.0, 1.0, 1.0))
    return build_guidance(cfg, str(device)), background


def refine_schedule(name_or_path: str = "shapes", from_scratch: bool = False,
                    overrides: dict[str, float | None] | None = None) -> dict[str, float | None]:
    """The SDS schedule of one refinement run: ``{"guidance_scale", "t_max", "lr_final"}``.

    Precedence: ``overrides`` (values that are not None) > the guidance config's ``refine:`` block (only when
    refining from the amortized start: a start of the right shape needs other settings than a run that must
    first form it) > the config's own ``guidance_scale``, its full timestep range and a constant learning rate.
    """
    cfg = guidance_config(name_or_path)
    block = dict(cfg.get("refine") or {})
    unknown = set(block) - set(REFINE_KEYS)
    if unknown:
        raise Att3dError(f"unknown keys {sorted(unknown)} in the refine block of guidance {name_or_path!r} "
                         f"(allowed: {', '.join(REFINE_KEYS)})")
    out: dict[str, float | None] = {"guidance_scale": None, "guidance_scale_low": None, "low_t": None,
                                    "t_max": None, "lr_final": 1.0}
    if not from_scratch:
        out.update({k: float(v) for k, v in block.items() if v is not None})
    out.update({k: float(v) for k, v in (overrides or {}).items() if v is not None})
    return out


def main(argv: list[str] | None = None) -> int:
    """``att3d refine PROMPT --steps N --out DIR``: refine (or optimise from scratch), export, save."""
    from att3d.cli import command_parser
    from att3d.model import load
    from att3d.train.app import resolve_path
    from att3d.train.trainer import pick_device

    ap = command_parser("refine")
    ap.add_argument("prompt", help="the prompt to refine")
    ap.add_argument("--steps", type=int, default=200, help="SDS steps (default 200)")
    ap.add_argument("--out", default="refined", help="output folder (default refined/)")
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"model folder (default {DEFAULT_CHECKPOINT})")
    ap.add_argument("--mode", choices=MODES, default="params",
                    help="params: the prompt's field conditioning (+ field MLP); model: the whole model")
    ap.add_argument("--from-scratch", action="store_true",
                    help="baseline: a freshly initialised model of the same architecture instead of the trained one")
    ap.add_argument("--guidance", default="shapes", help="guidance config name (configs/guidance/) or YAML file")
    ap.add_argument("--prior", default=None, help="prior folder (overrides the guidance config's prior.path)")
    ap.add_argument("--guidance-scale", type=float, default=None,
                    help="classifier-free guidance scale (default: the guidance config's refine.guidance_scale "
                         "when refining, else its guidance_scale)")
    ap.add_argument("--guidance-scale-low", type=float, default=None,
                    help="guidance scale of the low-noise steps (t <= --low-t T; default: the config's refine block)")
    ap.add_argument("--low-t", type=float, default=None, help="boundary of --guidance-scale-low, fraction of T")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-2 params, 1e-3 model)")
    ap.add_argument("--field-lr", type=float, default=None, help="learning rate of the field MLP")
    ap.add_argument("--lr-final", type=float, default=None,
                    help="learning rates decay (cosine) to this fraction at the end (default: the guidance config's "
                         "refine.lr_final when refining, else 1 = constant)")
    ap.add_argument("--t-max", type=float, default=None,
                    help="upper end of the SDS timestep range as a fraction of T (default: the guidance config's "
                         "refine.t_max when refining, else its own range)")
    ap.add_argument("--freeze-field", action="store_true", help="params mode: keep the shared field MLP fixed")
    ap.add_argument("--resolution", type=int, default=32, help="render resolution of the SDS steps")
    ap.add_argument("--batch-views", type=int, default=4, help="random views per step")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="shapes-world captions: score the object every N steps (0: at start and end only)")
    ap.add_argument("--no-eval", action="store_true", help="do not score shapes-world captions")
    ap.add_argument("--format", choices=("glb", "obj", "ply"), default="glb", help="mesh format")
    ap.add_argument("--grid-resolution", type=int, default=128, help="marching cubes grid of the mesh")
    ap.add_argument("--texture-size", type=int, default=512, help="texture size of the mesh (0: vertex colours only)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="density threshold of the mesh (default: the model's extraction threshold)")
    ap.add_argument("--no-turntable", action="store_true", help="do not render the turntable video")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    args = ap.parse_args(argv)
    if args.steps < 0:
        raise Att3dError(f"--steps must be >= 0, got {args.steps}")

    device = pick_device(args.device)
    ckpt = resolve_path(args.checkpoint)
    if not ckpt.is_dir():
        raise Att3dError(f"no model folder at {args.checkpoint} (train one with 'att3d train' or pass --checkpoint)")
    model = load(ckpt, device=device)
    schedule = refine_schedule(args.guidance, from_scratch=args.from_scratch,
                               overrides={"guidance_scale": args.guidance_scale, "t_max": args.t_max,
                                          "lr_final": args.lr_final, "guidance_scale_low": args.guidance_scale_low,
                                          "low_t": args.low_t})
    guidance, background = load_guidance(args.guidance, args.prior, device, **{k: schedule[k] for k in SDS_KEYS})
    eval_fn = None
    if not args.no_eval and is_shapes_caption(args.prompt):
        eval_fn = shapes_eval_fn(args.prompt)
    kwargs = dict(mode=args.mode, lr=args.lr, field_lr=args.field_lr, lr_final=schedule["lr_final"],
                  t_max=schedule["t_max"],
                  train_field=not args.freeze_field,
                  resolution=args.resolution, batch_views=args.batch_views, seed=args.seed, eval_fn=eval_fn,
                  eval_every=args.eval_every, background=background)
    if args.from_scratch:
        refined, history = from_scratch(model, args.prompt, args.steps, guidance, **kwargs)
    else:
        refined, history = refine(model, args.prompt, args.steps, guidance, **kwargs)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = refined.save_pretrained(out / "model", extra={"checkpoint": str(ckpt)})
    (out / "history.json").write_text(json.dumps(history.to_dict(), indent=2) + "\n")
    print(f"{'optimised from scratch' if args.from_scratch else 'refined'} {refined.prompt!r}: {args.steps} steps "
          f"({args.mode} mode) in {history.seconds:.1f} s")
    if history.evals:
        first, last = history.evals[0], history.evals[-1]
        print("  " + ", ".join(f"{k}: {first[k]:.3f} -> {last[k]:.3f}" for k in first if k != "step"))
    print(f"wrote {folder}/ (refined model) and {out / 'history.json'}")
    rows = export_refined(refined, out, format=args.format, grid_resolution=args.grid_resolution,
                          texture_size=args.texture_size, turntable=not args.no_turntable,
                          threshold=args.threshold, device=device)
    for row in rows:
        for f in row["files"]:
            print(f"wrote {f}")
        if row["empty"]:
            print(f"no mesh written: {row['note']}")
    return 0


def export_refined(refined: RefinedModel, out_dir: str | Path, format: str = "glb", grid_resolution: int = 128,
                   texture_size: int = 512, turntable: bool = True, threshold: float | None = None,
                   device: str | torch.device = "cpu", progress: bool = True) -> list[dict[str, Any]]:
    """Mesh (and turntable video) of the refined prompt, written by :func:`att3d.infer.generate.write_outputs`
    exactly as ``att3d generate`` writes them (``<slug>.<format>``, ``<slug>.mp4``).

    Returns:
        ``write_outputs``' rows (one: ``files``, ``empty``, ``note``, ...).
    """
    from att3d.infer.generate import meshes_from_conditioning, write_outputs

    with torch.no_grad():
        cond = refined.conditioning([refined.prompt])
    meshes = meshes_from_conditioning(refined, cond, grid_resolution=grid_resolution, threshold=threshold,
                                      texture_size=texture_size)
    return write_outputs(meshes, [refined.prompt], out_dir, format=format, turntable=turntable, device=device,
                         progress=progress)
