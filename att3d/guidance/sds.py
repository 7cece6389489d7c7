"""Score distillation sampling (SDS, DreamFusion) from any :class:`~att3d.guidance.priors.DiffusionPrior`.

For rendered images ``x = g(theta)`` the SDS gradient is::

    grad_theta L = E_{t, eps} [ w(t) (eps_hat(x_t; y, t) - eps) dx0/dtheta ],   x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps

where ``x0 = prior.encode_images(x)`` and ``eps_hat`` is the classifier-free guided noise
prediction (no gradient flows through the denoiser). It is applied through the usual
reparametrisation: with ``g = w(t) (eps_hat - eps)`` (detached) and ``B`` the batch size::

    loss = 0.5 * || x0 - stopgrad(x0 - g) ||^2 / B        =>        d loss / d x0 = g / B

so ``loss.backward()`` puts exactly the SDS gradient (averaged over the batch) on the
images and on everything that produced them. The loss *value* is ``0.5 * |g|^2 / B``: a
diagnostic of the gradient size, not a quantity that decreases during training.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from att3d.guidance.priors.base import DiffusionPrior, PromptConditioning, _randn
from att3d.render.cameras import OrbitCameras

WEIGHTINGS = ("sds", "uniform", "snr")


def timestep_bounds(lo: float, hi: float, num_train_timesteps: int) -> tuple[int, int]:
    """Inclusive integer timesteps ``(t_min, t_max)`` of the fractions ``[lo, hi]`` of T (``hi`` at least ``lo``),
    clamped to ``[0, T - 1]``."""
    n = int(num_train_timesteps)
    t_min = min(n - 1, max(0, round(lo * n)))
    t_max = min(n - 1, max(t_min, round(max(hi, lo) * n)))
    return t_min, t_max


@dataclass
class SDSOutput:
    """Result of one score distillation step.

    Attributes:
        loss: scalar whose gradient w.r.t. the images is the SDS gradient / B.
        grad_norm: scalar, mean over the batch of the L2 norm of each item's SDS gradient (after the guard and clamp).
        t: (B,) long timesteps used.
        num_nonfinite: number of batch items whose gradient was NaN/inf (their gradient was set to zero).
    """

    loss: torch.Tensor
    grad_norm: torch.Tensor
    t: torch.Tensor
    num_nonfinite: int = 0


class ScoreDistillation:
    """Score distillation from a frozen diffusion prior.

    Args:
        prior: the diffusion prior.
        guidance_scale: classifier-free guidance scale (DreamFusion uses 100 with Imagen, SD ~7.5-100).
        t_range: (min, max) timestep range as fractions of T; t is drawn uniformly from the integers
            ``[round(min T), round(max T)]``.
        t_anneal: ``(start_max, end_max, steps)``: the maximum fraction moves linearly from ``start_max``
            at step 0 to ``end_max`` at ``steps`` and stays there (never below ``t_range[0]``); None: fixed.
        weighting: ``w(t)``: ``"sds"`` = ``1 - a_t`` (DreamFusion), ``"uniform"`` = 1, ``"snr"`` =
            ``sqrt(a_t) (1 - a_t)`` (signal-scaled: also down-weights the noisiest steps, as in Fantasia3D).
        grad_clip: if set, each element of the gradient is clamped to ``[-grad_clip, grad_clip]``.
        per_item_t: draw one timestep per batch item (True) or one for the whole batch.
        guidance_scale_low: if set, the scale of the low-noise items (``t <= low_t * T``); ``guidance_scale``
            stays the scale of the noisier ones. High-noise steps decide the shape and want strong guidance;
            low-noise steps decide colour and detail, where strong guidance pulls colours off (oversaturated,
            shifted hue).
        low_t: the boundary of ``guidance_scale_low``, as a fraction of T.
        view_guidance: weight of the view contrast (:meth:`view_contrast`) added to the guided prediction of a
            view-conditioned prior (one that is given the render's camera); 0: off. Two more conditional
            denoiser passes per step.
        view_guidance_azimuth: the turn, in degrees, of the cameras that the view contrast pushes away from.

    Attributes:
        prior_source: the prior as its config named it (``name``, ``path`` and its other options), set by
            :func:`att3d.config.build_guidance` and kept by :meth:`replace`; None when built directly.
    """

    #: ``guidance.method`` of this class (:data:`att3d.config.GUIDANCE_METHODS`).
    method = "sds"
    prior_source: dict[str, Any] | None = None

    def __init__(self, prior: DiffusionPrior, guidance_scale: float = 7.5, t_range: tuple[float, float] = (0.02, 0.98),
                 t_anneal: tuple[float, float, int] | None = None, weighting: str = "sds",
                 grad_clip: float | None = None, per_item_t: bool = True, guidance_scale_low: float | None = None,
                 low_t: float = 0.5, view_guidance: float = 0.0, view_guidance_azimuth: float = 45.0):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown SDS weighting {weighting!r}; choose one of {WEIGHTINGS}")
        lo, hi = (float(v) for v in t_range)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"t_range must satisfy 0 <= min <= max <= 1, got {t_range}")
        if t_anneal is not None:
            if len(t_anneal) != 3 or int(t_anneal[2]) < 0:
                raise ValueError("t_anneal is (start_max, end_max, steps)")
            t_anneal = (float(t_anneal[0]), float(t_anneal[1]), int(t_anneal[2]))
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError("grad_clip must be positive (or None)")
        if guidance_scale_low is not None and not guidance_scale_low > 0:
            raise ValueError(f"guidance_scale_low must be positive (or None), got {guidance_scale_low}")
        if not 0.0 <= float(low_t) <= 1.0:
            raise ValueError(f"low_t must be in [0, 1], got {low_t}")
        if not float(view_guidance) >= 0.0:
            raise ValueError(f"view_guidance must be >= 0, got {view_guidance}")
        if not 0.0 < float(view_guidance_azimuth) <= 180.0:
            raise ValueError(f"view_guidance_azimuth must be in (0, 180] degrees, got {view_guidance_azimuth}")
        self.prior = prior
        self.guidance_scale = float(guidance_scale)
        self.t_range = (lo, hi)
        self.t_anneal = t_anneal
        self.weighting = weighting
        self.grad_clip = grad_clip
        self.per_item_t = per_item_t
        self.guidance_scale_low = None if guidance_scale_low is None else float(guidance_scale_low)
        self.low_t = float(low_t)
        self.view_guidance = float(view_guidance)
        self.view_guidance_azimuth = float(view_guidance_azimuth)

    def replace(self, **changes: Any) -> ScoreDistillation:
        """A new ``ScoreDistillation`` on the same prior with some settings changed (validated as in ``__init__``).

        Args:
            changes: any of the ``__init__`` arguments except ``prior``.
        """
        args = self.init_args()
        unknown = set(changes) - set(args)
        if unknown:
            raise TypeError(f"replace() got unexpected arguments {sorted(unknown)}")
        out = type(self)(self.prior, **{**args, **changes})
        out.prior_source = self.prior_source
        return out

    def record(self) -> dict[str, Any]:
        """What a trained model's record names as its teacher: ``prior`` (:attr:`prior_source`, or the prior's
        class name when unknown), ``method`` and every resolved :meth:`init_args` value (tuples as lists)."""
        prior = self.prior_source or {"class": type(self.prior).__name__}
        args = {k: list(v) if isinstance(v, tuple) else v for k, v in self.init_args().items()}
        return {"prior": dict(prior), "method": self.method, **args}

    def init_args(self) -> dict[str, Any]:
        """The ``__init__`` arguments (except ``prior``) that built this object."""
        return {"guidance_scale": self.guidance_scale, "t_range": self.t_range, "t_anneal": self.t_anneal,
                "weighting": self.weighting, "grad_clip": self.grad_clip, "per_item_t": self.per_item_t,
                "guidance_scale_low": self.guidance_scale_low, "low_t": self.low_t,
                "view_guidance": self.view_guidance, "view_guidance_azimuth": self.view_guidance_azimuth}

    def baseline(self, x_t: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: PromptConditioning,
                 cameras: OrbitCameras | None) -> torch.Tensor:
        """What the prior's prediction is compared with: the injected noise (SDS). (B, C, h, w)."""
        return noise

    def after_step(self, x0: torch.Tensor, cond: PromptConditioning, cameras: OrbitCameras | None,
                   generator: torch.Generator | None) -> None:
        """Called with the detached images ``x0`` at the end of each call (SDS: nothing to do)."""

    def state_dict(self) -> dict[str, Any]:
        """Trained state to checkpoint (SDS: none; see :class:`~att3d.guidance.vsd.VariationalScoreDistillation`)."""
        return {}

    def t_bounds(self, step: int = 0) -> tuple[int, int]:
        """Inclusive integer timestep range ``(t_min, t_max)`` used at training ``step``."""
        lo, hi = self.t_range
        if self.t_anneal is not None:
            start, end, steps = self.t_anneal
            p = min(1.0, max(0.0, step / steps)) if steps > 0 else 1.0
            hi = start + (end - start) * p
        return timestep_bounds(lo, hi, self.prior.num_train_timesteps)

    def sample_t(self, batch: int, step: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) long timesteps, uniform in :meth:`t_bounds` (one per item, or one shared)."""
        t_min, t_max = self.t_bounds(step)
        n = batch if self.per_item_t else 1
        gdev = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(t_min, t_max + 1, (n,), generator=generator, device=gdev)
        return t.expand(batch).to(self.prior.device)

    def scales(self, t: torch.Tensor) -> float | torch.Tensor:
        """The CFG scale of each item: ``guidance_scale``, or (B,) scales when ``guidance_scale_low`` is set."""
        if self.guidance_scale_low is None:
            return self.guidance_scale
        low = t <= round(self.low_t * self.prior.num_train_timesteps)
        return torch.where(low, self.guidance_scale_low, self.guidance_scale).float()

    def view_contrast(self, x_t: torch.Tensor, t: torch.Tensor, cond: PromptConditioning, cameras: OrbitCameras,
                      eps: torch.Tensor) -> torch.Tensor:
        """``eps_c(x_t; y, view) - mean_{+-d} eps_c(x_t; y, view turned by d in azimuth)``, d =
        ``view_guidance_azimuth`` degrees: the conditional predictions (no CFG) for the render's own camera and
        for the cameras turned both ways. Added to the guided prediction with the weight ``view_guidance``
        (negative view conditioning, like Perp-Neg's negative view prompts), it pushes each render towards
        what the object looks like from its own view and away from what it looks like from the turned ones:
        nothing for a render that looks the same from every azimuth (a body of revolution), a sharper azimuth
        for one that does not. A prior blurred in azimuth makes bodies with corners rounder and wider than
        they are; this term counters that blur. (B, C, h, w); ``eps`` is the guided prediction, reused as the
        conditional one when the scale is 1.
        """
        if self.guidance_scale == 1.0 and self.guidance_scale_low in (None, 1.0):
            own = eps
        else:
            own = self.prior.predict_noise(x_t, t, cond, cameras, 1.0)
        d = math.radians(self.view_guidance_azimuth)
        turned = [self.prior.predict_noise(x_t, t, cond, dataclasses.replace(cameras, phi=cameras.phi + s * d), 1.0)
                  for s in (1.0, -1.0)]
        return own - 0.5 * (turned[0] + turned[1])

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) weights ``w(t)``."""
        a = self.prior.alphas_cumprod[t]
        if self.weighting == "sds":
            return 1.0 - a
        if self.weighting == "uniform":
            return torch.ones_like(a)
        return a.sqrt() * (1.0 - a)

    def __call__(self, images: torch.Tensor, cond: PromptConditioning, cameras: OrbitCameras | None = None,
                 step: int = 0, generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None) -> SDSOutput:
        """One SDS evaluation.

        Args:
            images: (B, 3, H, W) renders in [0, 1] (requiring grad).
            cond: conditioning of batch B (from ``prior.encode_prompts``, possibly mixed).
            cameras: the B cameras of the renders (required by view-conditioned priors).
            step: training step (for timestep annealing).
            generator: RNG for timesteps and noise (timesteps are drawn on the generator's device).
            t: (B,) precomputed timesteps (instead of drawing them; e.g. the rank's rows of a global batch's
                draw in data-parallel training).
            noise: precomputed noise of ``x0``'s shape ``(B, prior.latent_channels, h, w)`` (instead of drawing it).

        Returns:
            :class:`SDSOutput`; ``loss.backward()`` gives ``d loss / d x0 = w(t) (eps_hat - eps) / B``.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        b = images.shape[0]
        if len(cond) != b:
            raise ValueError(f"conditioning has batch {len(cond)}, images have {b}")
        x0 = self.prior.encode_images(images)  # (B, C, h, w), differentiable
        if t is None:
            t = self.sample_t(b, step, generator)
        elif tuple(t.shape) != (b,):
            raise ValueError(f"t must be ({b},), got {tuple(t.shape)}")
        else:
            t = t.long().to(self.prior.device)
        with torch.no_grad():
            if noise is None:
                noise = _randn(x0.shape, generator, x0.device, x0.dtype)
            elif noise.shape != x0.shape:
                raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
            else:
                noise = noise.to(device=x0.device, dtype=x0.dtype)
            x_t = self.prior.add_noise(x0.detach(), noise, t)
            eps = self.prior.predict_noise(x_t, t, cond, cameras, self.scales(t)).to(x0.dtype)
            if self.view_guidance > 0 and cameras is not None:
                eps = eps + self.view_guidance * self.view_contrast(x_t, t, cond, cameras, eps).to(x0.dtype)
            base = self.baseline(x_t, noise, t, cond, cameras).to(x0.dtype)
            grad = self.weight(t).to(x0.dtype).view(-1, *([1] * (x0.dim() - 1))) * (eps - base)
            bad = ~torch.isfinite(grad).flatten(1).all(dim=1)
            num_bad = int(bad.sum().item())
            if num_bad:
                grad = torch.where(bad.view(-1, *([1] * (grad.dim() - 1))), torch.zeros_like(grad), grad)
            if self.grad_clip is not None:
                grad = grad.clamp(-self.grad_clip, self.grad_clip)
            target = x0.detach() - grad
            grad_norm = grad.flatten(1).norm(dim=1).mean()
        loss = 0.5 * F.mse_loss(x0, target, reduction="sum") / b
        self.after_step(x0.detach(), cond, cameras, generator)
        return SDSOutput(loss=loss, grad_norm=grad_norm, t=t, num_nonfinite=num_bad)
