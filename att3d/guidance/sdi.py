"""Score distillation with DDIM-inverted noise (SDI: Lukoianov et al., "Score Distillation via Reparametrized DDIM",
NeurIPS 2024), from any diffusion prior.

SDS noises the render with fresh random noise at every step::

    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps,   g_SDS = w(t) (eps_prior(x_t; y, c) - eps)

and the paper shows that this is a high-variance version of a DDIM step whose noise term is drawn instead of
inferred, which is what over-smooths. SDI infers it: ``x0`` is carried to ``x_t`` along the prior's own DDIM
trajectory (``inversion_steps`` deterministic inversion steps from 0 to t, conditional prediction at
``inversion_guidance``), the noise is read off the result, ``eps_inv = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t)``, and::

    g_SDI = w(t) (eps_prior(x_t; y, c) - eps_inv)

An image that the prior's DDIM trajectory maps back to itself is a fixed point (the gradient vanishes), whereas
under SDS every image is pulled towards the mean of what the prior draws at that noise level (on the shapes world:
a rounded cube; docs/results/sds_pull). Each call costs ``inversion_steps`` more denoiser passes (no gradient).
"""

from __future__ import annotations

from typing import Any

import torch

from att3d.guidance.priors.base import DiffusionPrior, PromptConditioning
from att3d.guidance.sds import ScoreDistillation
from att3d.render.cameras import OrbitCameras

__all__ = ["InvertedScoreDistillation", "ddim_invert"]


@torch.no_grad()
def ddim_invert(prior: DiffusionPrior, x0: torch.Tensor, t: torch.Tensor, steps: int, cond: PromptConditioning,
                cameras: OrbitCameras | None, guidance_scale: float = 1.0) -> torch.Tensor:
    """Deterministic DDIM inversion of clean samples to per-item timesteps.

    Item i goes from timestep 0 to ``t[i]`` in ``steps`` equal strides; each stride ``s -> s'`` is
    ``x_s' = sqrt(a_s') x0_hat + sqrt(1 - a_s') eps``, with ``eps`` the prior's prediction at ``(x_s, s)`` and
    ``x0_hat`` its clean estimate (``x0`` itself in the first stride: the start is clean, not noised to step 0).

    Args:
        x0: (B, C, h, w) clean samples (``prior.encode_images`` space); t: (B,) long target timesteps.

    Returns:
        (B, C, h, w) ``x_t`` on the prior's DDIM trajectory through ``x0``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    a_all = prior.alphas_cumprod.to(x0.device)
    t = t.long().to(x0.device)
    x = x0.float()
    for j in range(steps):
        s = (t * j) // steps
        s_next = (t * (j + 1)) // steps
        a = a_all[s].float().view(-1, 1, 1, 1) if j else torch.ones_like(x[:, :1, :1, :1])  # x0 is clean
        a_next = a_all[s_next].float().view(-1, 1, 1, 1)
        eps = prior.predict_noise(x.to(x0.dtype), s, cond, cameras, guidance_scale).float()
        x0_hat = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = torch.where((s_next > s).view(-1, 1, 1, 1), a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps, x)
    return x.to(x0.dtype)


class InvertedScoreDistillation(ScoreDistillation):
    """Score distillation whose noise is inferred by DDIM inversion (SDI); the arguments of
    :class:`ScoreDistillation`, plus:

    Args:
        inversion_steps: DDIM inversion steps from 0 to each item's t.
        inversion_guidance: CFG scale of the inversion's predictions (1: the conditional prediction alone).
    """

    def __init__(self, prior: DiffusionPrior, *, inversion_steps: int = 10, inversion_guidance: float = 1.0,
                 **sds: Any):
        super().__init__(prior, **sds)
        if int(inversion_steps) < 1:
            raise ValueError(f"inversion_steps must be >= 1, got {inversion_steps}")
        self.inversion_steps = int(inversion_steps)
        self.inversion_guidance = float(inversion_guidance)

    def init_args(self) -> dict[str, Any]:
        return {**super().init_args(), "inversion_steps": self.inversion_steps,
                "inversion_guidance": self.inversion_guidance}

    def noise_for(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: PromptConditioning,
                  cameras: OrbitCameras | None) -> torch.Tensor:
        """The noise that the prior's DDIM trajectory puts on ``x0`` at ``t`` (the drawn ``noise`` is unused)."""
        x_t = ddim_invert(self.prior, x0, t, self.inversion_steps, cond, cameras, self.inversion_guidance)
        a = self.prior.alphas_cumprod.to(x0.device)[t].float().view(-1, 1, 1, 1)
        return ((x_t.float() - a.sqrt() * x0.float()) / (1 - a).sqrt()).to(x0.dtype)
