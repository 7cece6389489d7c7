"""Amortized score-distillation training over a prompt set (ATT3D).

Every step takes a batch of different prompts, each with its own random camera,
maps their text embeddings to field conditioning, renders, and updates the mapping
network and the shared field with the SDS gradient of the prior. Optionally
(ATT3D's interpolation training) a fraction of the batch is replaced by mixtures of
two prompts' embeddings with Dirichlet(kappa) weights, for the mapping network and
the prior alike, so that in-between prompts are meaningful.

Checkpoints (``run_dir/checkpoints/step-XXXXXXX/``) hold the model folder, the
optimiser state, the RNG states and the step; ``checkpoints/latest.json`` is
rewritten (atomically) only after a checkpoint folder is complete, so a crash at
any moment leaves a resumable run. Everything random flows from one seeded
generator, so a run with a fixed seed is reproducible on the CPU and a resumed
run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from att3d.model import AmortizedModel, load_state_checked
from att3d.render.cameras import OrbitCameras
from att3d.text.encoders import TextEmbedding
from att3d.text.prompts import PromptBank
from att3d.utils.checkpoint import (
    CheckpointError,
    load_json,
    load_state,
    load_tensors,
    rng_state,
    save_json,
    save_state,
    save_tensors,
    set_rng_state,
)
from att3d.utils.errors import Att3dError

log = logging.getLogger(__name__)


class TrainingError(Att3dError):
    """Training cannot go on (e.g. too many non-finite steps)."""


@dataclass
class InterpolationConfig:
    """ATT3D interpolation training: mix two prompts' embeddings with Dirichlet(kappa) weights."""

    prob: float = 0.0  # fraction of batch items that are mixtures
    kappa: float = 1.0  # Dirichlet concentration (1 = uniform weights on the segment)


@dataclass
class TrainerConfig:
    """Optimisation settings (Hydra group ``trainer``)."""

    max_steps: int = 1000
    batch_size: int = 8  # prompts per step
    resolution: int = 32
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
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
    interpolation: InterpolationConfig = field(default_factory=InterpolationConfig)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise Att3dError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def mix_embeddings(a: TextEmbedding, b: TextEmbedding, w: torch.Tensor) -> TextEmbedding:
    """Convex mixture ``w * a + (1 - w) * b`` of two batches of embeddings; w: (B,)."""
    wt = w.to(a.tokens)
    tokens = wt[:, None, None] * a.tokens + (1 - wt)[:, None, None] * b.tokens
    pooled = wt[:, None] * a.pooled + (1 - wt)[:, None] * b.pooled
    return TextEmbedding(tokens, a.mask | b.mask, pooled)


class Trainer:
    """Amortized SDS trainer.

    Args:
        model: the amortized model (text encoder, mapping network, field, renderer).
        prompts: the training prompt bank.
        guidance: a :class:`att3d.guidance.sds.ScoreDistillation` over a diffusion prior.
        cfg: optimisation settings.
        run_dir: where checkpoints, logs and TensorBoard events go.
        background: (3,) background colour composited behind the field.
    """

    def __init__(self, model: AmortizedModel, prompts: PromptBank, guidance: Any, cfg: TrainerConfig,
                 run_dir: str | Path, background: tuple[float, float, float] = (1.0, 1.0, 1.0),
                 embedding_cache: str | Path | None = None, progress: bool = True):
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model = model.to(self.device)
        self.prompts = prompts
        self.guidance = guidance
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.background = torch.tensor(background, dtype=torch.float32, device=self.device)
        self.progress = progress
        self.step = 0
        self.bad_steps = 0
        self.history: list[dict[str, float]] = []
        self.generator = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                          weight_decay=cfg.weight_decay)
        # Embeddings are computed once for the whole prompt set.
        self.text_emb = prompts.embeddings("mapping-" + model.config["text_encoder"]["name"],
                                           model.text_encoder, embedding_cache).to(self.device)
        self.prior_cond = guidance.prior.encode_prompts(prompts.prompts)
        self._writer = None
        self._order: list[int] = []

    # -- sampling ------------------------------------------------------------------------------------------------
    def _next_prompts(self, n: int) -> torch.Tensor:
        """Indices of the next ``n`` prompts: epochs over a seeded shuffle, so every prompt is visited evenly."""
        out = []
        while len(out) < n:
            if not self._order:
                self._order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
            out.append(self._order.pop())
        return torch.tensor(out)

    def sample_batch(self) -> dict[str, Any]:
        """One step's prompts (and mixtures), embeddings, prior conditioning and cameras."""
        cfg = self.cfg
        idx = self._next_prompts(cfg.batch_size)
        emb = self.text_emb.index(idx.to(self.device))
        cond = self.prior_cond.index(idx)
        n_mix = int(round(cfg.interpolation.prob * cfg.batch_size))
        if n_mix > 0:
            partner = torch.randint(0, len(self.prompts), (n_mix,), generator=self.generator)
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
            k = cfg.interpolation.kappa
            w = torch.from_numpy(np.random.default_rng(seed).dirichlet([k, k], size=n_mix)[:, 0]).float()
            head = torch.arange(n_mix)
            mixed = mix_embeddings(emb.index(head.to(self.device)), self.text_emb.index(partner.to(self.device)),
                                   w.to(self.device))
            emb = TextEmbedding(torch.cat([mixed.tokens, emb.tokens[n_mix:]]),
                                torch.cat([mixed.mask, emb.mask[n_mix:]]),
                                torch.cat([mixed.pooled, emb.pooled[n_mix:]]))
            mixed_cond = cond.index(head).mix(self.prior_cond.index(partner), w)
            cond = type(cond).cat([mixed_cond, cond.index(torch.arange(n_mix, len(idx)))])
        cams = OrbitCameras.sample_training(cfg.batch_size, self.generator, tuple(cfg.elevation_deg), cfg.radius,
                                            cfg.fov_deg).to(self.device)
        return {"idx": idx, "emb": emb, "cond": cond, "cameras": cams, "n_mix": n_mix}

    # -- one step ------------------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        if self.cfg.warmup_steps and step < self.cfg.warmup_steps:
            return self.cfg.lr * (step + 1) / self.cfg.warmup_steps
        return self.cfg.lr

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        batch = self.sample_batch()
        self.model.train()
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(self.step)
        use_amp = cfg.mixed_precision and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            field_cond = self.model.mapping(batch["emb"])
            out = self.model.renderer(self.model.field, field_cond, batch["cameras"], cfg.resolution,
                                      background=self.background, generator=self.generator)
        images = out["rgb"].float().permute(0, 3, 1, 2)
        sds = self.guidance(images, batch["cond"], batch["cameras"], step=self.step, generator=self.generator)
        loss = sds.loss
        opacity = out["opacity"].float()
        if cfg.opacity_reg:
            loss = loss + cfg.opacity_reg * opacity.mean()
        if cfg.entropy_reg:
            o = opacity.clamp(1e-5, 1 - 1e-5)
            loss = loss + cfg.entropy_reg * (-(o * o.log() + (1 - o) * (1 - o).log())).mean()
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return self._bad_step("loss")
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return self._bad_step("gradient")
        self.optimizer.step()
        self.step += 1
        return {"loss": float(sds.loss.detach()), "total_loss": float(loss.detach()), "grad_norm": float(grad_norm),
                "sds_grad_norm": float(sds.grad_norm), "opacity": float(opacity.mean().detach()),
                "t_mean": float(sds.t.float().mean()), "lr": self.lr_at(self.step - 1), "_images": images.detach()}

    def _bad_step(self, what: str) -> dict[str, float]:
        self.bad_steps += 1
        self.step += 1
        log.warning("non-finite %s at step %d: step skipped (%d so far)", what, self.step, self.bad_steps)
        if self.bad_steps > self.cfg.max_bad_steps:
            raise TrainingError(f"stopped: {self.bad_steps} steps with a non-finite {what} "
                                f"(more than trainer.max_bad_steps={self.cfg.max_bad_steps})")
        return {"skipped": 1.0}

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write a complete checkpoint folder, then point ``latest.json`` at it (atomic)."""
        folder = self.ckpt_dir / f"step-{self.step:07d}"
        self.model.save_pretrained(folder)
        save_state(folder / "optimizer.pt", self.optimizer.state_dict())
        save_tensors(folder / "rng.safetensors", {"rng.generator": self.generator.get_state(), **rng_state()})
        save_json(folder / "trainer_state.json", {"step": self.step, "bad_steps": self.bad_steps,
                                                  "order": self._order, "history": self.history[-2000:]})
        save_json(self.ckpt_dir / "latest.json", {"step": self.step, "folder": folder.name})
        old = sorted(p for p in self.ckpt_dir.glob("step-*") if p.is_dir() and p != folder)
        for p in old[: max(0, len(old) - (self.cfg.keep_checkpoints - 1))]:
            shutil.rmtree(p, ignore_errors=True)
        return folder

    def latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_dir / "latest.json"
        if not pointer.is_file():
            return None
        return self.ckpt_dir / load_json(pointer)["folder"]

    def load_checkpoint(self, folder: str | Path) -> None:
        """Restore model, optimiser, RNG and step from a checkpoint folder (errors name the bad file)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {folder}")
        load_state_checked(self.model, load_tensors(folder / "model.safetensors", self.device),
                           folder / "model.safetensors")
        try:
            self.optimizer.load_state_dict(load_state(folder / "optimizer.pt"))
        except ValueError as e:
            raise CheckpointError(f"optimizer state {folder / 'optimizer.pt'} does not fit this model: {e}") from None
        rng = load_tensors(folder / "rng.safetensors")
        self.generator.set_state(rng.pop("rng.generator"))
        set_rng_state(rng)
        state = load_json(folder / "trainer_state.json")
        self.step, self.bad_steps = int(state["step"]), int(state["bad_steps"])
        self._order = list(state["order"])
        self.history = list(state.get("history", []))

    # -- logging -------------------------------------------------------------------------------------------------
    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._writer

    def _log(self, stats: dict[str, float], rate: float) -> None:
        record = {"step": self.step, **{k: v for k, v in stats.items() if not k.startswith("_")}, "steps_per_s": rate}
        self.history.append(record)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step":
                self.writer.add_scalar(f"train/{k}", v, self.step)

    # -- loop ----------------------------------------------------------------------------------------------------
    def fit(self, resume: bool = True) -> Path:
        """Train to ``max_steps`` (resuming from the latest checkpoint if any); returns the final model folder."""
        from tqdm import tqdm

        self.run_dir.mkdir(parents=True, exist_ok=True)
        latest = self.latest_checkpoint() if resume else None
        if latest is not None:
            self.load_checkpoint(latest)
            log.info("resumed from %s (step %d)", latest, self.step)
        cfg = self.cfg
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.progress, desc="train", dynamic_ncols=True)
        t0, n0 = time.time(), self.step
        while self.step < cfg.max_steps:
            stats = self.train_step()
            bar.update(1)
            if "skipped" in stats:
                continue
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                rate = (self.step - n0) / max(1e-9, time.time() - t0)
                self._log(stats, rate)
                bar.set_postfix(loss=f"{stats['loss']:.3g}", op=f"{stats['opacity']:.2f}", it_s=f"{rate:.2f}")
                t0, n0 = time.time(), self.step
            if cfg.image_every and self.step % cfg.image_every == 0:
                imgs = stats["_images"][:16].clamp(0, 1).cpu()
                self.writer.add_images("train/renders", imgs, self.step)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                self.save_checkpoint()
        bar.close()
        final = self.run_dir / "model"
        self.model.save_pretrained(final, extra={"steps": self.step, "prompts": len(self.prompts)})
        if self._writer is not None:
            self._writer.close()
        return final


def config_dict(cfg: TrainerConfig) -> dict[str, Any]:
    return asdict(cfg)


def trainer_config_from_dict(d: dict[str, Any]) -> TrainerConfig:
    d = dict(d)
    interp = InterpolationConfig(**d.pop("interpolation", {}) or {})
    for key in ("betas", "elevation_deg"):
        if key in d:
            d[key] = tuple(d[key])
    return TrainerConfig(interpolation=interp, **d)
