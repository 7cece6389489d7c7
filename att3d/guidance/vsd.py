"""Variational score distillation (VSD, ProlificDreamer: Wang et al., NeurIPS 2023) from any diffusion prior.

SDS compares the prior's noise prediction with the noise that was injected::

    g_SDS = w(t) (eps_prior(x_t; y, c) - eps)

whose expectation is the score of the prior's *noised* image distribution: at high noise that distribution is
blurred, and its mode-seeking pull is what rounds corners and over-smooths (att3d measured it on the shapes world:
docs/results/sds_pull). VSD replaces the injected noise by the prediction of a second denoiser ``eps_phi`` that is
fitted, online, to the model's own renders::

    g_VSD = w(t) (eps_prior(x_t; y, c) - eps_phi(x_t; y, c))

so the gradient points from the distribution the model renders towards the prior's, and vanishes when they agree.
The estimator here starts as a copy of the prior's denoiser (fp32) with LoRA adapters on its attention projections
(ProlificDreamer's recipe; ``estimator_rank=0`` trains the whole copy instead), with the same prompt and camera
conditioning; after every call it takes ``estimator_steps`` Adam steps of the prior's own diffusion loss (epsilon
or v target) on the detached renders, at timesteps drawn from ``estimator_t_range``. At the start
``eps_phi = eps_prior`` (guidance 1), so a fine-tune from a trained model starts with a zero gradient and moves as
the estimator learns what the model draws.

On the shapes world it did not help: from the shipped model, 300 steps washed the colours out (GLB colour error
0.018 -> 0.10) and left the cube as it was (docs/results/surface, session 16).

The estimator is trained state: :meth:`VariationalScoreDistillation.state_dict` goes into the trainer's checkpoints
so that a resumed run continues exactly. Under ``torchrun`` each rank fits its own estimator to its own renders.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from att3d.guidance.priors.base import DiffusionPrior, PromptConditioning, _randn
from att3d.guidance.sds import ScoreDistillation, timestep_bounds
from att3d.render.cameras import OrbitCameras

__all__ = ["LORA_TARGETS", "LoRALinear", "VariationalScoreDistillation", "add_lora", "denoiser_copy"]

#: The attention projections that :func:`add_lora` adapts (ProlificDreamer's LoRA: every attention layer).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoRALinear(torch.nn.Module):
    """``base(x) + (alpha / rank) up(down(x))`` with ``base`` frozen and ``up`` zero at the start (Hu et al., 2021).

    Shapes: (..., in_features) -> (..., out_features), as ``base``.
    """

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = torch.nn.Linear(base.in_features, int(rank), bias=False)
        self.up = torch.nn.Linear(int(rank), base.out_features, bias=False)
        torch.nn.init.normal_(self.down.weight, std=1.0 / int(rank))
        torch.nn.init.zeros_(self.up.weight)
        self.scale = float(alpha if alpha is not None else rank) / int(rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x)) * self.scale


def add_lora(module: torch.nn.Module, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> list[torch.nn.Parameter]:
    """Wrap every ``nn.Linear`` of ``module`` whose name ends with one of ``targets`` in a :class:`LoRALinear`
    (in place; the rest of ``module`` is frozen); returns the adapters' parameters."""
    module.requires_grad_(False)
    names = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)
             and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"no linear layer named {targets} to adapt")
    device = next(module.parameters()).device
    params: list[torch.nn.Parameter] = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        lora = LoRALinear(getattr(parent, child), rank).to(device)
        setattr(parent, child, lora)
        params += [lora.down.weight, lora.up.weight]
    return params


def denoiser_copy(prior: DiffusionPrior) -> DiffusionPrior:
    """A copy of ``prior`` whose denoiser (``unet``) is its own fp32 trainable copy; every other part (text
    encoder, VAE, scheduler tables) is shared with ``prior``."""
    unet = getattr(prior, "unet", None)
    if unet is None:
        raise ValueError(f"{type(prior).__name__} has no `unet` to copy for the VSD estimator")
    memo = {id(m): m for name, m in prior.named_children() if name != "unet"}
    est = copy.deepcopy(prior, memo)
    est.unet.float().requires_grad_(True)
    return est


class VariationalScoreDistillation(ScoreDistillation):
    """Score distillation with a learned baseline (VSD); the arguments of :class:`ScoreDistillation`, plus:

    Args:
        estimator_lr: Adam learning rate of the estimator (ProlificDreamer: 1e-3 for its LoRA). A full copy
            (``estimator_rank=0``) wants far less: on the shapes prior one Adam step at 1e-4 of every weight
            already makes the VSD gradient as large as SDS'.
        estimator_rank: rank of the LoRA adapters of the estimator's attention projections (ProlificDreamer: 4);
            0: the whole copied denoiser is trained.
        estimator_steps: estimator updates per call.
        estimator_t_range: (min, max) fractions of T of the estimator's training timesteps.
        estimator_guidance: CFG scale of the estimator's prediction (1: conditional only, as ProlificDreamer).
    """

    method = "vsd"

    def __init__(self, prior: DiffusionPrior, *, estimator_lr: float = 1e-3, estimator_rank: int = 4,
                 estimator_steps: int = 1, estimator_t_range: tuple[float, float] = (0.02, 0.98),
                 estimator_guidance: float = 1.0, **sds: Any):
        super().__init__(prior, **sds)
        lo, hi = (float(v) for v in estimator_t_range)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"estimator_t_range must satisfy 0 <= min <= max <= 1, got {estimator_t_range}")
        if not float(estimator_lr) > 0 or int(estimator_steps) < 1 or int(estimator_rank) < 0:
            raise ValueError("estimator_lr must be positive, estimator_steps at least 1 and estimator_rank >= 0")
        self.estimator_lr = float(estimator_lr)
        self.estimator_rank = int(estimator_rank)
        self.estimator_steps = int(estimator_steps)
        self.estimator_t_range = (lo, hi)
        self.estimator_guidance = float(estimator_guidance)
        self.estimator = denoiser_copy(prior)
        if self.estimator_rank:
            self.trained = add_lora(self.estimator.unet, self.estimator_rank)
        else:
            self.trained = list(self.estimator.unet.parameters())
        self.optimizer = torch.optim.Adam(self.trained, lr=self.estimator_lr)
        self.last_estimator_loss = float("nan")

    def init_args(self) -> dict[str, Any]:
        return {**super().init_args(), "estimator_lr": self.estimator_lr, "estimator_rank": self.estimator_rank,
                "estimator_steps": self.estimator_steps,
                "estimator_t_range": self.estimator_t_range, "estimator_guidance": self.estimator_guidance}

    def baseline(self, x_t: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: PromptConditioning,
                 cameras: OrbitCameras | None) -> torch.Tensor:
        """The estimator's noise prediction at ``x_t`` (B, C, h, w), with the prior's conditioning."""
        return self.estimator.predict_noise(x_t, t, cond, cameras, self.estimator_guidance)

    def estimator_loss(self, x0: torch.Tensor, cond: PromptConditioning, cameras: OrbitCameras | None,
                       t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The estimator's diffusion loss on clean images ``x0`` (B, C, h, w) at timesteps ``t`` (B,) with
        ``noise``: MSE to the prior's target (epsilon, or v for v-prediction), conditional branch."""
        est = self.estimator
        x_t = est.add_noise(x0, noise, t)
        c = cond.for_cameras(cameras).to(est.device)
        out = est._denoise(x_t.float(), t, c.cond.float(), c.cond_mask, cameras).float()
        target = est.scheduler.get_velocity(x0, noise, t) if est.prediction_type == "v_prediction" else noise
        return (out - target).square().mean()

    def after_step(self, x0: torch.Tensor, cond: PromptConditioning, cameras: OrbitCameras | None,
                   generator: torch.Generator | None) -> None:
        """``estimator_steps`` Adam steps of :meth:`estimator_loss` on the detached images ``x0``."""
        lo, hi = timestep_bounds(*self.estimator_t_range, self.prior.num_train_timesteps)
        gdev = generator.device if generator is not None else torch.device("cpu")
        x0 = x0.detach().float()
        with torch.enable_grad():
            for _ in range(self.estimator_steps):
                t = torch.randint(lo, hi + 1, (x0.shape[0],), generator=generator, device=gdev).to(x0.device)
                noise = _randn(x0.shape, generator, x0.device, x0.dtype)
                loss = self.estimator_loss(x0, cond, cameras, t, noise)
                self.optimizer.zero_grad(set_to_none=True)
                if torch.isfinite(loss):
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(self.trained, 1.0)
                    self.optimizer.step()
                self.last_estimator_loss = float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        """``{"estimator": unet weights, "optimizer": Adam state}`` (what a checkpoint keeps)."""
        return {"estimator": self.estimator.unet.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.estimator.unet.load_state_dict(state["estimator"])
        self.optimizer.load_state_dict(state["optimizer"])
