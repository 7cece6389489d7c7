"""The one training loop of att3d: amortized score distillation over a prompt set, for every stage.

Every step takes a batch of different prompts (``views_per_prompt`` random cameras each,
:mod:`att3d.train.batch`), lets the stage's objective (:mod:`att3d.train.objectives`: the NeRF stage,
the mesh stage, test-time refinement) render them and compute its loss with the prior's SDS
gradient, and makes one optimiser step (:mod:`att3d.train.optim`: schedule, non-finite skip,
clipping). Optionally (ATT3D's interpolation training) a fraction of the batch is replaced by
mixtures of two prompts' embeddings with Dirichlet(kappa) weights, for the mapping network and the
prior alike, so that in-between prompts are meaningful.

Randomness: everything random (prompt order, mixing partners and weights, cameras,
stratified jitter, SDS timesteps and noise) flows from one seeded generator and is
drawn for the step's *global* batch, so a run with a fixed seed is reproducible on the
CPU, a resumed run continues exactly as an uninterrupted one, and a data-parallel run
(:mod:`att3d.train.distributed`, ``torchrun``) trains the same model as one process with
the whole batch.

Checkpoints (``run_dir/checkpoints/step-XXXXXXX/``) hold the model folder, the
optimiser state, the generator state and the trainer state (step, skipped steps,
prompt order). A checkpoint folder is written under a temporary name and renamed into
place when complete, and ``checkpoints/latest.json`` is rewritten (atomically) only
after that, so a crash at any moment (even ``kill -9``) leaves a resumable run that
loses at most ``checkpoint_every`` steps. A damaged checkpoint is a one-line
:class:`~att3d.utils.checkpoint.CheckpointError` naming the file, never a silent
restart; so is a missing or damaged ``latest.json`` next to complete ``step-*``
folders, which names the newest one and how to continue from it (``resume_checkpoint``).
Resuming never deletes a checkpoint. Checkpoints hold nothing rank-specific: a run
resumes on any number of processes. The run folder is locked while the trainer writes
to it (:func:`att3d.train.run_dir.lock_run_dir`).

Faults: SIGINT / SIGTERM during :meth:`Trainer.fit` finish the current step, write a
checkpoint and raise :class:`TrainingInterrupted` (the ``att3d train`` command exits with
130 / 143); a second signal stops at once (:class:`StoppedAtOnce`, exit code 128 + its
number as well). A step whose loss (or every item's SDS gradient, or the clipped
gradient) is not finite is skipped and counted; more than ``trainer.max_bad_steps`` of
them stop the run with a :class:`TrainingError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from att3d.model import AmortizedModel, load_state_checked
from att3d.text.prompts import PromptBank
from att3d.train import distributed
from att3d.train.batch import Batch, BatchSampler, CameraSampler
from att3d.train.objectives import NerfSDS, Objective, StepResult
from att3d.train.optim import adam, clip_gradients, lr_factor
from att3d.train.run_dir import RunDirLock, lock_run_dir
from att3d.utils.allocator import keep_freed_memory
from att3d.utils.checkpoint import (
    CheckpointError,
    atomic_folder,
    is_temporary,
    load_json,
    load_state,
    load_tensors,
    rng_state,
    save_json,
    save_state,
    save_tensors,
    set_rng_state,
)
from att3d.utils.devices import pick_device
from att3d.utils.errors import Att3dError

log = logging.getLogger(__name__)

#: Signals that stop training gracefully (checkpoint, then :class:`TrainingInterrupted`).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingError(Att3dError):
    """Training cannot go on (e.g. too many non-finite steps)."""


class TrainingInterrupted(Att3dError):
    """Training stopped on a signal after writing a checkpoint.

    Attributes:
        signum: the signal (SIGINT or SIGTERM).
        step: the step reached (and checkpointed).
        checkpoint: the checkpoint folder written.
        exit_code: ``128 + signum`` (130 for SIGINT, 143 for SIGTERM), the shell convention.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path, run_dir: Path | None):
        self.signum = int(signum)
        self.step = int(step)
        self.checkpoint = Path(checkpoint)
        self.exit_code = 128 + self.signum
        super().__init__(f"interrupted by {signal.Signals(self.signum).name} at step {self.step}: checkpoint "
                         f"written to {self.checkpoint}; continue with: att3d train resume={run_dir}")


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGINT / SIGTERM during training: stop now, without a checkpoint (the last one stays valid).

    A :class:`KeyboardInterrupt`, so that it unwinds like Ctrl-C through any ``except Exception``.

    Attributes:
        signum: the signal.
        exit_code: ``128 + signum`` (130 for SIGINT, 143 for SIGTERM).
        message: one line for the user.
    """

    def __init__(self, signum: int, step: int | None, run_dir: Path | None):
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        name = signal.Signals(self.signum).name
        last = f" (step {step})" if step is not None else ""
        tail = f"; continue with: att3d train resume={run_dir}" if run_dir is not None and step is not None else ""
        self.message = f"stopped at once by a second {name}: the last checkpoint{last} stays valid{tail}"
        super().__init__(self.message)


@dataclass
class InterpolationConfig:
    """ATT3D interpolation training: mix two prompts' embeddings with Dirichlet(kappa) weights."""

    prob: float = 0.0  # fraction of batch items that are mixtures
    kappa: float = 1.0  # Dirichlet concentration (1 = uniform weights on the segment)


@dataclass
class TrainerConfig:
    """Optimisation settings (Hydra group ``trainer``)."""

    max_steps: int = 1000
    batch_size: int = 8  # prompts per step (global: split evenly over the processes of a torchrun job)
    views_per_prompt: int = 1  # cameras per prompt in a step (several views of one object: multi-view priors)
    resolution: int = 32
    lr: float = 1e-3
    lr_final: float = 1.0  # < 1: cosine decay of the learning rate to lr_final * lr at the last step
    mapping_lr_scale: float = 1.0  # the mapping network's learning rate is mapping_lr_scale * lr (the field's: lr)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0  # 0: no clipping
    opacity_reg: float = 0.0  # weight of mean opacity (shrinks floaters)
    entropy_reg: float = 0.0  # weight of the binary entropy of opacity (crisp silhouettes)
    elevation_deg: tuple[float, float] = (-10.0, 45.0)
    radius: float = 2.2
    fov_deg: float = 40.0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    image_every: int = 200
    max_bad_steps: int = 50
    seed: int = 0
    device: str = "auto"
    mixed_precision: bool = True  # bf16 autocast on CUDA only
    threads: int = 0
    keep_freed_memory: bool = True  # CPU: glibc's malloc keeps freed blocks (att3d.utils.allocator); faster steps
    interpolation: InterpolationConfig = field(default_factory=InterpolationConfig)


# Entries of the per-step vector that the ranks sum (one all-reduce per step); the stage's own statistics follow.
_HEAD = _NONFINITE_LOSS, _SIGINT, _SIGTERM, _SDS_NONFINITE, _LOSS, _TOTAL, _SDS_NORM, _T_MEAN = range(8)

#: The files of a complete checkpoint folder (``trainer_state.json`` is written last).
CHECKPOINT_FILES = ("model.safetensors", "model_config.json", "optimizer.pt", "rng.safetensors",
                    "trainer_state.json")
POINTER_NAME = "latest.json"
#: The guidance's trained state in a checkpoint folder, when it has one (VSD's estimator).
GUIDANCE_STATE_NAME = "guidance.pt"
_STEP_FOLDER = re.compile(r"^step-(\d+)$")


def _restore_state(path: Path, load: Any, what: str, owner: str) -> None:
    """``load(state)`` with the state file ``path`` (:func:`load_state`: no pickled code runs); a file that cannot
    be read, or whose state does not fit ``owner``, is a one-line :class:`CheckpointError` naming it."""
    try:
        state = load_state(path)
    except CheckpointError as e:
        raise CheckpointError(_short_load_error(e, path)) from None
    try:
        load(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{what} {path} does not fit {owner}: {' '.join(str(e).split())}") from None


def checkpoint_step(folder: str | Path) -> int | None:
    """The step of a complete checkpoint folder (``step-N`` holding every file of :data:`CHECKPOINT_FILES`, its
    ``trainer_state.json`` readable and saying step N), or None. Reads only ``trainer_state.json``."""
    folder = Path(folder)
    match = _STEP_FOLDER.match(folder.name)
    if match is None or not folder.is_dir() or any(not (folder / f).is_file() for f in CHECKPOINT_FILES):
        return None
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step != int(match.group(1)):
        return None
    return step


def complete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """The complete checkpoint folders of ``ckpt_dir`` (:func:`checkpoint_step`), oldest step first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in ckpt_dir.glob("step-*")]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def continue_hint(ckpt_dir: str | Path, skip: Path | None = None) -> str:
    """``"; the newest complete checkpoint is ... continue from it with: ..."`` for an error message, or ``""``
    when ``ckpt_dir`` holds no complete checkpoint (other than ``skip``)."""
    ckpt_dir = Path(ckpt_dir)
    found = [p for p in complete_checkpoints(ckpt_dir) if skip is None or p.resolve() != skip.resolve()]
    if not found:
        return ""
    newest = found[-1]
    return (f"; the newest complete checkpoint is {newest} (step {checkpoint_step(newest)}): continue from it with: "
            f"att3d train resume={ckpt_dir.parent} resume_checkpoint={newest.name}")


def resolve_checkpoint(ckpt_dir: str | Path, checkpoint: str | Path) -> Path:
    """The checkpoint folder that ``resume_checkpoint`` names: a ``step-*`` folder of ``ckpt_dir`` (its name) or a
    path; a :class:`CheckpointError` unless it is a complete checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    given = Path(str(checkpoint))
    folder = given if (given.is_absolute() or len(given.parts) > 1) else ckpt_dir / given
    if checkpoint_step(folder) is None:
        if not folder.is_dir():
            why = "not found"
        else:
            missing = [f for f in CHECKPOINT_FILES if not (folder / f).is_file()]
            why = (f"incomplete (no {', '.join(missing)})" if missing else
                   "not a checkpoint folder (step-N whose trainer_state.json says step N)")
        raise CheckpointError(f"resume_checkpoint: {folder} is {why}{continue_hint(ckpt_dir, folder)}")
    return folder


def latest_checkpoint(ckpt_dir: str | Path, warn: bool = True, checkpoint: str | Path | None = None) -> Path | None:
    """The checkpoint folder to resume from, or None when no checkpoint was ever completed.

    That is ``checkpoint`` when given (``resume_checkpoint``: a ``step-*`` name or a path, which must be
    complete), else the folder ``ckpt_dir/latest.json`` points at. A missing ``latest.json`` next to complete
    ``step-*`` folders, a damaged one, or one pointing at a missing folder is a :class:`CheckpointError` naming
    it and the newest complete checkpoint with the command that continues from it: a run never silently starts
    over, and nothing is deleted. Only ``step-*`` folders that are all incomplete (a crash during the first
    checkpoint of a version that wrote them in place) let the run start from step 0 (with a warning).
    """
    ckpt_dir = Path(ckpt_dir)
    if checkpoint not in (None, ""):
        return resolve_checkpoint(ckpt_dir, checkpoint)  # type: ignore[arg-type]
    pointer = ckpt_dir / POINTER_NAME
    if not pointer.exists():
        hint = continue_hint(ckpt_dir)
        if hint:
            raise CheckpointError(f"{pointer} is missing, but complete checkpoints are there (nothing was changed)"
                                  f"{hint} (or restore {POINTER_NAME}: {{\"folder\": \"step-...\"}})")
        partial = sorted(p.name for p in ckpt_dir.glob("step-*")) if ckpt_dir.is_dir() else []
        if partial and warn:
            log.warning("%s has %s but no %s and none of them is complete: no checkpoint was completed (a crash "
                        "during the first one); starting from step 0", ckpt_dir, ", ".join(partial), POINTER_NAME)
        return None
    try:
        data = load_json(pointer)
        if not isinstance(data, dict) or not isinstance(data.get("folder"), str) or "/" in data["folder"] \
                or data["folder"] in ("", ".", ".."):
            raise CheckpointError(f"corrupted checkpoint pointer {pointer}: expected {{\"folder\": \"step-...\"}}")
    except CheckpointError as e:
        raise CheckpointError(f"{e}{continue_hint(ckpt_dir)}") from None
    folder = ckpt_dir / data["folder"]
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder} (named by {pointer})"
                              f"{continue_hint(ckpt_dir, folder)}")
    return folder


def check_model_fits(model: torch.nn.Module, run_dir: str | Path, checkpoint: str | Path | None = None
                     ) -> Path | None:
    """Fail fast on resume: load the model weights of the run's checkpoint to resume from (if any) into ``model``.

    A checkpoint of another architecture (or a damaged one, or a missing ``latest.json``) raises a one-line
    :class:`CheckpointError` naming the file, before the expensive parts (the diffusion prior) are loaded.
    Returns the checkpoint folder.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    folder = latest_checkpoint(ckpt_dir, warn=False, checkpoint=checkpoint)
    if folder is None:
        return None
    weights = folder / "model.safetensors"
    try:
        load_state_checked(model, load_tensors(weights), weights)
    except CheckpointError as e:
        if "another architecture" in str(e):
            raise
        raise CheckpointError(f"{e}{continue_hint(ckpt_dir, folder)}") from None
    return folder


def _short_load_error(error: CheckpointError, path: Path) -> str:
    """One line for a failed ``torch.load(weights_only=True)`` (PyTorch's own message is a paragraph)."""
    text = " ".join(str(error).split())
    if "Weights only load failed" in text:
        detail = "unsupported content"
        if "WeightsUnpickler error:" in text:
            detail = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation")[0].strip()
        elif "unsupported GLOBAL " in text:
            detail = "it calls " + text.split("unsupported GLOBAL ", 1)[1].split()[0]
        return (f"corrupted or truncated checkpoint file {path}: not a plain state of tensors and numbers "
                f"({detail}); refused without running any of its code")
    return text


def check_stage(objective: Objective, cfg: TrainerConfig, dist: distributed.DistInfo | None = None) -> None:
    """A one-line :class:`TrainingError` when the stage cannot run with these settings (before anything loads)."""
    dist = dist or distributed.current()
    if dist.enabled and not objective.distributed:
        raise TrainingError(f"the {objective.name} stage runs in one process (no torchrun)")
    if cfg.interpolation.prob > 0 and not objective.mixing:
        raise TrainingError(f"the {objective.name} stage does not mix prompts (a mixture has nothing of its own to "
                            "train here): set trainer.interpolation.prob=0")


def encoder_tag(config: dict[str, Any]) -> str:
    """The embedding cache's tag of the mapping network's text encoder: its full config (name and arguments)."""
    return "mapping-" + json.dumps(config, sort_keys=True, default=str)


def prior_tag(prior: Any) -> str:
    """The embedding cache's tag of a prior's text conditioning: its class, settings and text encoder."""
    encoder = getattr(prior, "text_encoder", None)
    ident = {
        "prior": f"{type(prior).__module__}.{type(prior).__qualname__}",
        "arch": getattr(prior, "arch", None),
        "negative_prompt": getattr(prior, "negative_prompt", None),
        "view_suffixes": list(getattr(prior, "view_suffixes", ()) or ()),
        "encoder": getattr(encoder, "path", None) or getattr(getattr(encoder, "config", None), "_name_or_path", None),
        "max_length": getattr(encoder, "max_length", None),
    }
    return "prior-" + json.dumps(ident, sort_keys=True, default=str)


#: Per-prompt fields of a prior's conditioning (the unconditional ones are one prompt's, shared by all).
_COND_FIELDS = ("cond", "cond_mask", "views", "view_masks")


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().cpu(), b.detach().cpu()
    return bool(torch.equal(a, b)) if not a.is_floating_point() else bool(torch.allclose(a, b, rtol=0, atol=1e-6))


def prior_conditioning(prior: Any, prompts: PromptBank, cache_dir: str | Path | None = None,
                       text_emb: Any = None) -> Any:
    """The prior's conditioning (``PromptConditioning``) of every prompt of ``prompts``, in batches.

    Batches go through the prior's ``encode_prompts`` (its memo is cleared after each, so memory is bounded by a
    batch) and, with ``cache_dir``, stream to the on-disk embedding cache and come back memory-mapped. When the
    prior embeds text exactly as the mapping network's encoder does (the same encoder: checked on a probe
    prompt against ``text_emb``), its conditioning reuses ``text_emb`` instead of embedding every prompt again.
    """
    from att3d.guidance.priors.base import PromptConditioning

    first = prior.encode_prompts([prompts.prompts[0]])  # also the unconditional (negative prompt) embedding
    prior.clear_cache()
    uncond = first.uncond[:1]
    uncond_mask = first.uncond_mask[:1] if first.uncond_mask is not None else None
    if text_emb is not None and first.views is None and _same(first.cond, text_emb.tokens[:1]) \
            and _same(first.cond_mask, text_emb.mask[:1]):
        return PromptConditioning(text_emb.tokens.to(first.cond.device), uncond, text_emb.mask.to(first.cond.device),
                                  uncond_mask, prompts=tuple(prompts.prompts))

    def encode(batch: list[str]) -> dict[str, torch.Tensor]:
        cond = prior.encode_prompts(batch)
        prior.clear_cache()
        return {k: getattr(cond, k) for k in _COND_FIELDS if getattr(cond, k) is not None}

    fields = prompts.embedding_fields(prior_tag(prior), encode, cache_dir, verify=True)
    device = first.cond.device
    return PromptConditioning(fields["cond"].to(device), uncond,
                              *(fields[k].to(device) if k in fields else None for k in _COND_FIELDS[1:]),
                              prompts=tuple(prompts.prompts))


def read_trainer_state(path: Path, num_prompts: int) -> tuple[int, int, list[int], list[dict[str, Any]]]:
    """``(step, bad_steps, order, history)`` of a checkpoint's ``trainer_state.json``, every value checked (a
    negative or non-integer step, more skipped steps than steps, a prompt order that does not fit the prompt set)
    : a one-line :class:`CheckpointError` naming the file and the field."""
    state = load_json(path)

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"corrupted checkpoint file {path}: {what}")

    if not isinstance(state, dict):
        raise bad(f"expected a mapping, got {type(state).__name__}")
    for key in ("step", "bad_steps", "order"):
        if key not in state:
            raise bad(f"no {key!r}")
    step, bad_steps, order = state["step"], state["bad_steps"], state["order"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise bad(f"step must be an integer >= 0, got {step!r}")
    if isinstance(bad_steps, bool) or not isinstance(bad_steps, int) or not 0 <= bad_steps <= step:
        raise bad(f"bad_steps must be an integer in [0, step={step}], got {bad_steps!r}")
    if not isinstance(order, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in order):
        raise bad("order must be a list of prompt indices")
    if any(not 0 <= i < num_prompts for i in order) or len(order) > num_prompts:
        raise CheckpointError(f"checkpoint {path} was trained on another prompt set (prompt index out of range for "
                              f"{num_prompts} prompts)")
    if len(set(order)) != len(order):
        raise bad("order repeats a prompt index")
    history = state.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise bad("history must be a list of records")
    return step, bad_steps, list(order), list(history)


class Trainer:
    """The training loop of every stage (one process, or one rank of a ``torchrun`` job).

    Args:
        model: the model to train (an :class:`~att3d.model.AmortizedModel`, or a model that behaves like one,
            such as refinement's :class:`~att3d.train.refine.RefinedModel`).
        prompts: the training prompt bank.
        guidance: a :class:`att3d.guidance.sds.ScoreDistillation` over a diffusion prior.
        cfg: optimisation settings; ``cfg.batch_size`` is the global batch of a step (prompts).
        run_dir: where checkpoints, logs and TensorBoard events go (rank 0 writes them); None: nothing is
            written (checkpoints, resume and the final model folder are off; e.g. refinement).
        objective: the stage (default :class:`~att3d.train.objectives.NerfSDS`).
        background: (3,) background colour composited behind the renders.
        embedding_cache: folder of the on-disk embedding cache (:mod:`att3d.text.embedding_cache`) for the
            prompts' text embeddings and the prior's conditioning: computed in batches, streamed there and read
            back memory-mapped (bounded memory for any number of prompts; a warm cache embeds nothing). None:
            computed in batches and kept in memory.
        progress: show a progress bar (rank 0).
        callbacks: objects with optional ``on_start(trainer)``, ``on_step(trainer, stats)`` and
            ``on_end(trainer)`` methods (e.g. refinement's evaluation curve).
        resume_checkpoint: resume from this checkpoint (a ``step-*`` folder name of ``run_dir/checkpoints`` or a
            path) instead of the one ``latest.json`` names.

    In a process group (:func:`att3d.train.distributed.init_from_env`), each rank trains rows
    ``[rank * b, (rank + 1) * b)`` of every global batch (``b = batch_size / world_size``) and the
    gradients are averaged; the model stays identical on all ranks.
    """

    def __init__(self, model: AmortizedModel, prompts: PromptBank, guidance: Any, cfg: TrainerConfig,
                 run_dir: str | Path | None, objective: Objective | None = None,
                 background: tuple[float, float, float] = (1.0, 1.0, 1.0),
                 embedding_cache: str | Path | None = None, progress: bool = True,
                 callbacks: Sequence[Any] = (), resume_checkpoint: str | Path | None = None):
        self.cfg = cfg
        self.objective = objective if objective is not None else NerfSDS()
        self.dist = distributed.current()
        check_stage(self.objective, cfg, self.dist)
        self.rows = distributed.shard(cfg.batch_size, self.dist)
        self.device = distributed.rank_device(pick_device(cfg.device), self.dist)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.keep_freed_memory and self.device.type == "cpu":
            keep_freed_memory()
        self.model = model.to(self.device)
        self.prompts = prompts
        self.guidance = guidance
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.ckpt_dir = self.run_dir / "checkpoints" if self.run_dir is not None else None
        self.resume_checkpoint = resume_checkpoint if resume_checkpoint not in (None, "") else None
        self.embedding_cache = Path(embedding_cache) if embedding_cache is not None else None
        self._lock: RunDirLock | None = None
        self.background = torch.tensor(background, dtype=torch.float32, device=self.device)
        self.progress = progress and self.dist.is_main
        self.callbacks = list(callbacks)
        self.step = 0
        self.bad_steps = 0
        self.history: list[dict[str, float]] = []
        self.generator = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.sampler = BatchSampler(len(prompts), cfg.batch_size,
                                    CameraSampler(tuple(cfg.elevation_deg), cfg.radius, cfg.fov_deg,
                                                  cfg.views_per_prompt),
                                    cfg.interpolation.prob, cfg.interpolation.kappa)
        # Embeddings are computed once for the whole prompt set (in batches; through the disk cache if any). With a
        # cache, rank 0 fills it first and the other ranks read it: every rank trains on the same embeddings.
        first = self.dist.enabled and self.embedding_cache is not None
        if first and not self.dist.is_main:
            distributed.barrier()
        self.text_emb = prompts.embeddings(encoder_tag(model.config["text_encoder"]), model.text_encoder,
                                           self.embedding_cache, verify=True).to(self.device)
        self.prior_cond = prior_conditioning(guidance.prior, prompts, self.embedding_cache, self.text_emb)
        if first and self.dist.is_main:
            distributed.barrier()
        self.objective.setup(self)
        distributed.broadcast_module(self.model)  # identical start on every rank (no-op for one process)
        self.optimizer = adam(self.objective.param_groups(self), lr=cfg.lr, betas=tuple(cfg.betas),
                              weight_decay=cfg.weight_decay)
        self._base_lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        self._writer = None
        self._stop_signal: int | None = None  # a stop requested on this rank (signal number)
        self._stop_agreed: int | None = None  # the stop all ranks agreed on at the last step
        self._saved_step: int | None = None  # step of the last checkpoint written or loaded
        self._restored = False  # restore() ran (the run folder is prepared, the latest checkpoint loaded)
        self._start_step = 0  # the step this process started (or resumed) training at

    @property
    def _order(self) -> list[int]:
        """The rest of the current epoch's prompt order (checkpointed)."""
        return self.sampler.order

    # -- sampling ------------------------------------------------------------------------------------------------
    def sample_batch(self) -> Batch:
        """One step's prompts (and mixtures), embeddings, prior conditioning and cameras: this rank's rows."""
        return self.sampler.sample(self.text_emb, self.prior_cond, self.generator, self.rows, self.device)

    @property
    def rows_per_step(self) -> int:
        """Rows of the global batch: prompts times views."""
        return self.cfg.batch_size * self.cfg.views_per_prompt

    def render_random(self) -> Any:
        """The random source of the volume renderer's jitter for this step (drawn for the global batch)."""
        renderer = self.model.renderer
        resolve = getattr(renderer, "resolve_backend", None)
        if resolve is not None and resolve(self.device) == "torch":
            rows = self.rows
            v = self.cfg.views_per_prompt
            return distributed.BatchSlice(self.generator, self.rows_per_step, slice(rows.start * v, rows.stop * v))
        if not self.dist.enabled:
            return self.generator
        # The CUDA (nerfacc) path draws per prompt and sample count: one stream per rank, forked from the
        # shared generator, so that the shared generator still advances alike on all ranks.
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        return torch.Generator().manual_seed(seed + self.dist.rank)

    def sds_random(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``rows`` of the step's SDS timesteps (N,) and noise (N, C, h, w), drawn for the global
        batch (``rows_per_step`` rows)."""
        b = self.rows_per_step
        t = self.guidance.sample_t(b, self.step, self.generator)
        prior = self.guidance.prior
        shape = (b, int(prior.latent_channels), int(prior.latent_resolution), int(prior.latent_resolution))
        noise = torch.randn(shape, generator=self.generator, device=self.generator.device)
        return t[rows], noise[rows]

    def score_distillation(self, images: torch.Tensor, batch: Batch):
        """The prior's SDS of this rank's renders ``images`` (N, 3, H, W) of ``batch`` (timesteps and noise drawn
        for the global batch)."""
        t, noise = self.sds_random(batch.view_rows)
        return self.guidance(images, batch.cond, batch.cameras, step=self.step, generator=self.generator,
                             t=t, noise=noise)

    # -- one step ------------------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """The learning rate of the first parameter group at ``step``."""
        return self._base_lrs[0] * lr_factor(step, self.cfg.max_steps, self.cfg.warmup_steps, self.cfg.lr_final)

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask :meth:`fit` to stop after the current step with a checkpoint (what SIGINT / SIGTERM do)."""
        self._stop_signal = int(signum)

    def train_step(self) -> dict[str, float]:
        """One optimisation step over the global batch (this rank's share of it); returns the step's statistics.

        A skipped step (non-finite loss or gradient) returns ``{"skipped": 1.0}``.
        """
        cfg = self.cfg
        batch = self.sample_batch()
        self.model.train()
        factor = lr_factor(self.step, cfg.max_steps, cfg.warmup_steps, cfg.lr_final)
        for g, base in zip(self.optimizer.param_groups, self._base_lrs):
            g["lr"] = base * factor
        result: StepResult = self.objective.step(self, batch)
        loss, sds = result.loss, result.sds
        # Each rank's loss is the mean over its rows, so the global loss is the mean over the ranks. One all-reduce
        # makes every rank agree on skipping the step, on stopping, and on the logged (global) statistics.
        names = list(result.stats)
        local = torch.zeros(len(_HEAD) + len(names), dtype=torch.float64)
        local[_NONFINITE_LOSS] = float(not bool(torch.isfinite(loss)))
        local[_SIGINT] = float(self._stop_signal == signal.SIGINT)
        local[_SIGTERM] = float(self._stop_signal is not None and self._stop_signal != signal.SIGINT)
        local[_SDS_NONFINITE] = float(sds.num_nonfinite)
        local[_LOSS] = float(sds.loss.detach())
        local[_TOTAL] = float(loss.detach())
        local[_SDS_NORM] = float(sds.grad_norm)
        local[_T_MEAN] = float(sds.t.float().mean())
        for k, name in enumerate(names):
            local[len(_HEAD) + k] = float(torch.as_tensor(result.stats[name]).detach().float())
        agreed = distributed.all_reduce_sum(local.to(self.device)).cpu()
        world = self.dist.world_size
        self._stop_agreed = (signal.SIGINT if agreed[_SIGINT] > 0 else
                             signal.SIGTERM if agreed[_SIGTERM] > 0 else None)
        self.optimizer.zero_grad(set_to_none=True)
        if agreed[_NONFINITE_LOSS] > 0:
            return self._bad_step("loss")
        if agreed[_SDS_NONFINITE] >= self.rows_per_step:
            return self._bad_step("SDS gradient (every item of the batch)")
        grad_norm = torch.zeros(())
        if loss.requires_grad or self.dist.enabled:  # no gradient at all: e.g. no mesh of the batch is visible
            loss.backward()
            distributed.average_gradients(self.model.parameters())
            norm = clip_gradients(self.model.parameters(), cfg.grad_clip)
            if norm is None:  # the averaged gradients are identical on all ranks: so is this test
                self.optimizer.zero_grad(set_to_none=True)
                return self._bad_step("gradient")
            grad_norm = norm
            self.optimizer.step()
        self.step += 1
        stats = {"loss": float(agreed[_LOSS]) / world, "total_loss": float(agreed[_TOTAL]) / world,
                 "grad_norm": float(grad_norm), "sds_grad_norm": float(agreed[_SDS_NORM]) / world,
                 **{name: float(agreed[len(_HEAD) + k]) / world for k, name in enumerate(names)},
                 "t_mean": float(agreed[_T_MEAN]) / world, "sds_nonfinite": float(agreed[_SDS_NONFINITE]),
                 "lr": self.lr_at(self.step - 1)}
        estimator_loss = getattr(self.guidance, "last_estimator_loss", None)
        if estimator_loss is not None:  # VSD: this rank's estimator's diffusion loss on the step's renders
            stats["vsd_estimator_loss"] = float(estimator_loss)
        if result.images is not None:
            stats["_images"] = result.images.detach()  # type: ignore[assignment]
        return stats

    def _bad_step(self, what: str) -> dict[str, float]:
        self.bad_steps += 1
        self.step += 1
        if self.dist.is_main:
            log.warning("non-finite %s at step %d: step skipped (%d so far)", what, self.step, self.bad_steps)
        if self.bad_steps > self.cfg.max_bad_steps:
            raise TrainingError(f"stopped at step {self.step}: {self.bad_steps} steps skipped for a non-finite "
                                f"loss or gradient (the last: {what}), more than trainer.max_bad_steps="
                                f"{self.cfg.max_bad_steps}; lower trainer.lr or check the prior and the field")
        return {"skipped": 1.0}

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write a complete checkpoint folder, then point ``latest.json`` at it (atomic); rank 0 writes, all wait."""
        if self.ckpt_dir is None:
            raise TrainingError("this trainer has no run folder: nothing to checkpoint")
        folder = self.ckpt_dir / f"step-{self.step:07d}"
        if self.dist.is_main:
            with atomic_folder(folder) as tmp:  # complete under its name, or not there at all
                write_files = getattr(self.model, "write_files", None)
                write_files(tmp) if write_files is not None else self.model.save_pretrained(tmp)
                save_state(tmp / "optimizer.pt", self.optimizer.state_dict())
                save_tensors(tmp / "rng.safetensors", {"rng.generator": self.generator.get_state(), **rng_state()})
                guidance_state = self.guidance.state_dict() if hasattr(self.guidance, "state_dict") else {}
                if guidance_state:  # trained guidance state (VSD's estimator)
                    save_state(tmp / GUIDANCE_STATE_NAME, guidance_state)
                save_json(tmp / "trainer_state.json", {
                    "step": self.step, "bad_steps": self.bad_steps, "order": self.sampler.order,
                    "history": self.history[-2000:], "batch_size": self.cfg.batch_size,
                    "world_size": self.dist.world_size})
            save_json(self.ckpt_dir / POINTER_NAME, {"step": self.step, "folder": folder.name})
            self._saved_step = self.step  # at once: a second signal during the pruning names this checkpoint
            self._prune_checkpoints(folder)
        distributed.barrier()
        self._saved_step = self.step
        return folder

    def _prune_checkpoints(self, current: Path) -> None:
        """After ``current`` was written and ``latest.json`` points at it: keep it and the newest
        ``keep_checkpoints - 1`` complete older folders; drop the older rest, incomplete ``step-*`` folders and
        the temporary remains of interrupted writes. Complete folders of later steps (a run resumed from an
        earlier checkpoint on purpose) are kept until the run rewrites them."""
        older, junk = [], []
        for p in self.ckpt_dir.iterdir():
            if p == current or not p.is_dir():
                continue
            if is_temporary(p) and p.name.startswith(".step-"):
                junk.append(p)
            elif _STEP_FOLDER.match(p.name):
                step = checkpoint_step(p)
                if step is None:
                    junk.append(p)
                elif step < self.step:
                    older.append((step, p))
        older.sort()
        drop = [p for _, p in older[: max(0, len(older) - (self.cfg.keep_checkpoints - 1))]]
        for p in junk + drop:
            shutil.rmtree(p, ignore_errors=True)

    def latest(self) -> Path | None:
        """The checkpoint to resume from: ``resume_checkpoint`` or the folder ``checkpoints/latest.json`` points at;
        None for a fresh run (see :func:`latest_checkpoint`)."""
        if self.ckpt_dir is None:
            return None
        return latest_checkpoint(self.ckpt_dir, warn=self.dist.is_main, checkpoint=self.resume_checkpoint)

    def load_checkpoint(self, folder: str | Path) -> None:
        """Restore model, optimiser, RNG and step from a checkpoint folder (errors name the bad file)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {folder}")
        load_state_checked(self.model, load_tensors(folder / "model.safetensors", self.device),
                           folder / "model.safetensors")
        _restore_state(folder / "optimizer.pt", self.optimizer.load_state_dict, "optimizer state", "this model")
        self._load_guidance_state(folder)
        rng_file = folder / "rng.safetensors"
        rng = load_tensors(rng_file)
        if "rng.generator" not in rng:
            raise CheckpointError(f"corrupted checkpoint file {rng_file}: no generator state")
        try:
            self.generator.set_state(rng.pop("rng.generator").to(torch.uint8))
        except RuntimeError as e:
            raise CheckpointError(f"corrupted checkpoint file {rng_file}: {e}") from None
        cuda_states = [k for k in rng if k.startswith("rng.cuda")]
        if len(cuda_states) != (torch.cuda.device_count() if torch.cuda.is_available() else 0):
            rng = {k: v for k, v in rng.items() if k not in cuda_states}  # another machine: keep its own CUDA RNG
        set_rng_state(rng)
        state_file = folder / "trainer_state.json"
        step, bad_steps, order, history = read_trainer_state(state_file, len(self.prompts))
        match = _STEP_FOLDER.match(folder.name)
        if match is not None and int(match.group(1)) != step:
            raise CheckpointError(f"corrupted checkpoint file {state_file}: step {step} in the folder of step "
                                  f"{int(match.group(1))}")
        self.step, self.bad_steps, self.sampler.order, self.history = step, bad_steps, order, history
        self._saved_step = self.step

    def _load_guidance_state(self, folder: Path) -> None:
        """Restore the guidance's trained state (VSD's estimator) from ``folder``; a checkpoint of a run without
        it (VSD switched on at resume) starts the estimator afresh, with a warning."""
        if not hasattr(self.guidance, "load_state_dict") or not self.guidance.state_dict():
            return
        path = folder / GUIDANCE_STATE_NAME
        if not path.is_file():
            log.warning("%s has no %s (a run without VSD): the VSD estimator starts from the prior", folder,
                        GUIDANCE_STATE_NAME)
            return
        _restore_state(path, self.guidance.load_state_dict, "guidance state", "this prior")

    # -- logging -------------------------------------------------------------------------------------------------
    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events of steps after the resumed checkpoint that a crashed run had logged
            purge = self._start_step + 1 if self._start_step else None
            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge)
        return self._writer

    def _log(self, stats: dict[str, float], rate: float) -> None:
        record = {"step": self.step, **{k: v for k, v in stats.items() if not k.startswith("_")}, "steps_per_s": rate}
        self.history.append(record)
        if self.run_dir is None:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step":
                self.writer.add_scalar(f"train/{k}", v, self.step)

    def _trim_metrics(self) -> None:
        """Drop ``metrics.jsonl`` records after the resumed step (logged by a run that died before its checkpoint)."""
        path = self.run_dir / "metrics.jsonl" if self.run_dir is not None else None
        if path is None or not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if int(json.loads(line)["step"]) <= self.step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the crash
        path.write_text("".join(k + "\n" for k in kept))

    # -- signals -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """While training: SIGINT / SIGTERM request a graceful stop; a second one stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

        def restore() -> None:
            for s, h in previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)

        def handler(signum: int, frame: object) -> None:
            if self._stop_signal is not None:
                restore()
                raise StoppedAtOnce(signum, self._saved_step, self.run_dir)
            self.request_stop(signum)
            if self.dist.is_main:
                print(f"att3d: {signal.Signals(signum).name} received: stopping after this step with a checkpoint "
                      "(again to stop at once)", file=sys.stderr, flush=True)

        for s in STOP_SIGNALS:
            signal.signal(s, handler)
        try:
            yield
        finally:
            restore()

    # -- loop ----------------------------------------------------------------------------------------------------
    def restore(self, resume: bool = True) -> Path | None:
        """Prepare the run folder and load the latest checkpoint (with ``resume``); returns it, or None.

        :meth:`fit` calls this unless it was called before (the ``att3d train`` app does, to check a resumed
        checkpoint against the model before it saves the run's config).
        """
        main = self.dist.is_main
        if main and self.run_dir is not None and self._lock is None:
            self._lock = lock_run_dir(self.run_dir)  # creates the folder; RunDirLocked if another run writes there
        distributed.barrier()
        latest = self.latest() if resume else None
        if latest is not None:
            self.load_checkpoint(latest)
            if main:
                log.info("resumed from %s (step %d)", latest, self.step)
        if self.dist.enabled:
            step0 = int(distributed.broadcast_object(self.step))  # type: ignore[arg-type]
            if step0 != self.step:
                raise TrainingError(f"rank {self.dist.rank} resumed at step {self.step} but rank 0 at step {step0}: "
                                    f"put the run folder {self.run_dir} on a file system that all nodes share")
        if main:
            self._trim_metrics()
        self._start_step = self.step
        self._restored = True
        return latest

    def fit(self, resume: bool = True) -> Path | None:
        """Train to ``max_steps`` (resuming from the latest checkpoint if any); returns the final model folder
        (``run_dir/model``, whose ``extra`` is the objective's :meth:`~att3d.train.objectives.Objective.record`),
        or None without a run folder.

        Raises:
            TrainingInterrupted: on SIGINT / SIGTERM, after writing a checkpoint (with a run folder).
            TrainingError: after more than ``max_bad_steps`` non-finite steps.
            CheckpointError: the latest checkpoint is damaged or from another architecture.
            RunDirLocked: another process is writing to the run folder.
        """
        try:
            return self._fit(resume)
        finally:
            self.close()

    def close(self) -> None:
        """Release the run folder's lock and close the TensorBoard writer (:meth:`fit` does it when it ends)."""
        self._close_writer()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _fit(self, resume: bool) -> Path | None:
        from tqdm import tqdm

        main = self.dist.is_main
        if not self._restored:
            self.restore(resume)
        elif main and self.run_dir is not None and self._lock is None:  # fit() again after an earlier one ended
            self._lock = lock_run_dir(self.run_dir)
        cfg = self.cfg
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.progress,
                   desc=self.objective.name, dynamic_ncols=True)
        self._call("on_start")
        t0, n0 = time.time(), self.step
        signals = self._stop_on_signals() if self.run_dir is not None else contextlib.nullcontext()
        with signals:
            while self.step < cfg.max_steps:
                stats = self.train_step()
                bar.update(1)
                if "skipped" not in stats and main:
                    if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                        rate = (self.step - n0) / max(1e-9, time.time() - t0)
                        self._log(stats, rate)
                        bar.set_postfix(loss=f"{stats['loss']:.3g}", it_s=f"{rate:.2f}",
                                        **{k: f"{v:.2f}" for k, v in stats.items() if k == "opacity"})
                        t0, n0 = time.time(), self.step
                    if cfg.image_every and self.step % cfg.image_every == 0 and "_images" in stats \
                            and self.run_dir is not None:
                        imgs = stats["_images"][:16].clamp(0, 1).cpu()
                        self.writer.add_images("train/renders", imgs, self.step)
                    self._call("on_step", stats)
                if self.ckpt_dir is None:
                    continue
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                    self.save_checkpoint()
                # One process stops at once; ranks stop together at the step whose all-reduce carried the request.
                stop = self._stop_agreed if self.dist.enabled else self._stop_signal
                if stop is not None and self.step < cfg.max_steps:
                    if self._saved_step != self.step:
                        self.save_checkpoint()
                    bar.close()
                    self._close_writer()
                    raise TrainingInterrupted(stop, self.step, self.ckpt_dir / f"step-{self.step:07d}", self.run_dir)
        bar.close()
        self.model.eval()
        self._call("on_end")
        if self.run_dir is None:
            return None
        final = self.run_dir / "model"
        if main:
            self.model.save_pretrained(final, extra=self.objective.record(self))
        self._close_writer()
        distributed.barrier()
        return final

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, *args)

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _coerce(what: str, annotation: str, value: Any) -> Any:
    """``value`` as the field type ``annotation`` (``int``, ``float``, ``bool``, ``str``, ``tuple[float, float]``);
    a float must be finite."""
    try:
        if annotation == "int":
            if isinstance(value, bool) or isinstance(value, (list, tuple, dict)) or value is None:
                raise ValueError
            number = float(value)
            if not math.isfinite(number) or number != int(number):
                raise ValueError
            return int(number)
        if annotation == "float":
            if isinstance(value, bool) or value is None:
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        if annotation == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if annotation == "str":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if annotation.startswith("tuple[float"):
            if isinstance(value, (str, bytes)):
                raise ValueError
            out = tuple(float(v) for v in value)
            if len(out) != 2 or not all(math.isfinite(v) for v in out) or any(isinstance(v, bool) for v in value):
                raise ValueError
            return out
    except (TypeError, ValueError, OverflowError):
        kind = {"int": "an integer", "float": "a finite number", "bool": "true or false",
                "str": "a string"}.get(annotation, annotation)
        if annotation.startswith("tuple"):
            kind = "a list of two finite numbers"
        raise Att3dError(f"{what} must be {kind}, got {value!r}") from None
    return value


#: Ranges of the trainer options: ``(low, high, low_open, high_open)``; None: unbounded on that side.
_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "max_steps": (0, None, False, False), "batch_size": (1, None, False, False),
    "views_per_prompt": (1, None, False, False), "resolution": (1, 8192, False, False),
    "lr": (0, None, True, False), "lr_final": (0, None, False, False), "mapping_lr_scale": (0, None, True, False),
    "weight_decay": (0, None, False, False),
    "warmup_steps": (0, None, False, False), "grad_clip": (0, None, False, False),
    "opacity_reg": (0, None, False, False), "entropy_reg": (0, None, False, False),
    "radius": (0, None, True, False), "fov_deg": (0, 180, True, True), "checkpoint_every": (1, None, False, False),
    "keep_checkpoints": (1, None, False, False), "log_every": (1, None, False, False),
    "image_every": (0, None, False, False), "max_bad_steps": (0, None, False, False),
    "seed": (0, 2**63 - 1, False, False), "threads": (0, 4096, False, False),
    "interpolation.prob": (0, 1, False, False), "interpolation.kappa": (0, None, True, False),
}


def _check_range(key: str, value: float) -> None:
    low, high, low_open, high_open = _RANGES[key]
    ok = (low is None or (value > low if low_open else value >= low)) and \
         (high is None or (value < high if high_open else value <= high))
    if ok:
        return
    if low is not None and high is not None:
        want = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        want = f"{'greater than' if low_open else 'at least'} {low:g}"
    else:
        want = f"at most {high:g}"
    raise Att3dError(f"trainer.{key} must be {want}, got {value:g}")


def check_device_name(name: str, what: str = "trainer.device") -> None:
    """A one-line :class:`~att3d.utils.errors.Att3dError` naming ``what`` unless ``name`` is a device of this
    machine (``auto``, ``cpu``, ``cuda``, ``cuda:N`` with N below the device count, ``mps``)."""
    try:
        device = pick_device(name)
    except Att3dError as e:
        raise Att3dError(f"{what}={name}: {e}") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise Att3dError(f"{what}={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def trainer_config_from_dict(d: dict[str, Any]) -> TrainerConfig:
    """A :class:`TrainerConfig` from the ``trainer`` config group, every field checked: an unknown key, a value of
    the wrong type (``trainer.batch_size=abc``), a float that is not finite, or one out of its range
    (``trainer.interpolation.prob=2``, ``trainer.threads=-1``, ``trainer.device=bogus``) is a one-line error
    naming the option, before anything is loaded."""
    if not isinstance(d, dict):
        raise Att3dError(f"trainer must be a mapping of options, got {d!r}")
    d = dict(d)
    interp = d.pop("interpolation", {}) or {}
    if not isinstance(interp, dict):
        raise Att3dError(f"trainer.interpolation must be a mapping (prob, kappa), got {interp!r}")
    interp = dict(interp)
    for what, keys, cls in (("trainer", d, TrainerConfig), ("trainer.interpolation", interp, InterpolationConfig)):
        fields = cls.__dataclass_fields__
        unknown = sorted(set(keys) - set(fields) - {"interpolation"})
        if unknown:
            raise Att3dError(f"unknown {what} option(s): {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
        for key in list(keys):
            keys[key] = _coerce(f"{what}.{key}", str(fields[key].type), keys[key])
    cfg = TrainerConfig(interpolation=InterpolationConfig(**interp), **d)
    for key in _RANGES:
        obj, name = (cfg.interpolation, key.split(".", 1)[1]) if key.startswith("interpolation.") else (cfg, key)
        _check_range(key, getattr(obj, name))
    for i, b in enumerate(cfg.betas):
        if not 0 <= b < 1:
            raise Att3dError(f"trainer.betas[{i}] must be in [0, 1), got {b:g}")
    lo, hi = cfg.elevation_deg
    if not -90.0 <= lo <= hi <= 90.0:
        raise Att3dError(f"trainer.elevation_deg must be [low, high] with -90 <= low <= high <= 90, got [{lo:g}, "
                         f"{hi:g}]")
    check_device_name(cfg.device)
    return cfg
