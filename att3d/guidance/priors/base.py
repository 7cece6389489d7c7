"""The interface every diffusion prior offers to score distillation, and the code they share.

A prior is a frozen text-conditioned (optionally camera-conditioned) noise predictor
``eps(x_t, t, text[, camera])`` with a noise schedule ``alphas_cumprod``. Everything
that is the same for all priors lives once in :class:`DiffusionPrior`: prompt caching
and unconditional embeddings, view-dependent prompt suffixes, classifier-free guidance
in one batched forward, conversion of v-prediction to epsilon, the forward noising
process and DDIM sampling. A concrete prior overrides only what differs:

- :meth:`DiffusionPrior._embed_text`: prompts -> per-token embeddings (and mask);
- :meth:`DiffusionPrior._denoise`: one call of its denoiser on a batch;
- :meth:`DiffusionPrior.encode_images` / :meth:`DiffusionPrior.decode`: only latent priors
  (pixel priors use the default ``rgb * 2 - 1`` at the prior's resolution).
"""

from __future__ import annotations

import abc
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from att3d.render.cameras import OrbitCameras

#: DreamFusion-style view suffixes, indexed by :func:`view_index`.
DEFAULT_VIEW_SUFFIXES: tuple[str, ...] = ("front view", "side view", "back view", "overhead view")


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float16`` from ``"float16"``/``"fp16"``/``"torch.float16"`` (configs name dtypes as strings)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    aliases = {"fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32", "bf16": "bfloat16"}
    out = getattr(torch, aliases.get(name, name), None)
    if not isinstance(out, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return out


def view_index(cameras: OrbitCameras, n_views: int = 3, front_deg: float = 45.0, overhead_deg: float = 60.0
               ) -> torch.Tensor:
    """Which view suffix describes each camera (DreamFusion's view-dependent prompting).

    Azimuth 0 looks at the object's front (from +z). A camera within ``front_deg`` of
    azimuth 0 is ``front`` (0), within ``front_deg`` of azimuth pi is ``back`` (2), any other
    is ``side`` (1); with ``n_views == 4`` an elevation above ``overhead_deg`` is ``overhead`` (3).

    Args:
        cameras: B cameras.
        n_views: 3 (front/side/back) or 4 (also overhead).

    Returns:
        (B,) long indices into the view suffixes.
    """
    if n_views not in (3, 4):
        raise ValueError(f"view-dependent prompts need 3 or 4 suffixes, got {n_views}")
    phi = torch.remainder(cameras.phi + math.pi, 2 * math.pi) - math.pi  # (-pi, pi], 0 = front
    front = phi.abs() <= math.radians(front_deg)
    back = phi.abs() >= math.pi - math.radians(front_deg)
    idx = torch.ones_like(cameras.phi, dtype=torch.long)
    idx[front] = 0
    idx[back] = 2
    if n_views == 4:
        idx[cameras.theta > math.radians(overhead_deg)] = 3
    return idx


def hub_kwargs(path: str | os.PathLike, local_files_only: bool | None = None, **extra) -> dict:
    """Keyword arguments of ``from_pretrained`` for a local folder or hub id (offline when the folder exists)."""
    if local_files_only is None:
        local_files_only = Path(path).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
    return {"local_files_only": bool(local_files_only), **{k: v for k, v in extra.items() if v is not None}}


def diffusers_model_kwargs() -> dict:
    """Keyword arguments of a diffusers model's ``from_pretrained``: low-memory loading only where accelerate is
    installed (without it diffusers logs a warning on every load, and loads normally)."""
    from diffusers.utils import is_accelerate_available

    return {"low_cpu_mem_usage": bool(is_accelerate_available())}


def hf_text_embeddings(tokenizer, text_encoder, prompts: list[str], max_length: int,
                       pass_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token hidden states of a transformers text encoder, as diffusers pipelines compute them.

    Prompts are padded (and truncated) to ``max_length``; padded positions keep the encoder's
    output (Stable Diffusion and IF were trained that way).

    Args:
        pass_mask: give the attention mask to the encoder (T5 in IF) or not (CLIP in Stable Diffusion).

    Returns:
        tokens (N, max_length, D) in the encoder's dtype, mask (N, max_length) bool.
    """
    dev = next(text_encoder.parameters()).device
    batch = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                      return_attention_mask=True, return_tensors="pt")
    ids = batch["input_ids"].to(dev)
    mask = batch["attention_mask"].to(dev)
    out = text_encoder(ids, attention_mask=mask if pass_mask else None)
    return out[0], mask.bool()


def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian noise on ``device`` drawn from ``generator`` (which may live on another device)."""
    gdev = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gdev, dtype=dtype).to(device)


@dataclass
class PromptConditioning:
    """Text conditioning of a batch for a prior: conditional and unconditional embeddings.

    Indexable per batch item, movable between devices and mixable, so the trainer can cache
    it per prompt and interpolate two prompts' embeddings (ATT3D's embedding mixing).

    Attributes:
        cond: (B, L, D) per-token embeddings of the prompts.
        uncond: (B, L, D) embeddings of the negative (by default empty) prompt.
        cond_mask: (B, L) bool, True on real tokens; None when the prior ignores masks.
        uncond_mask: (B, L) bool or None.
        views: (B, V, L, D) embeddings of the prompts with each view suffix appended, or None.
        view_masks: (B, V, L) bool or None.
        prompts: the B prompt strings, or None (e.g. for mixed embeddings).
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    cond_mask: torch.Tensor | None = None
    uncond_mask: torch.Tensor | None = None
    views: torch.Tensor | None = None
    view_masks: torch.Tensor | None = None
    prompts: tuple[str, ...] | None = None

    _TENSORS = ("cond", "uncond", "cond_mask", "uncond_mask", "views", "view_masks")

    def __post_init__(self) -> None:
        b = self.cond.shape[0]
        if self.uncond.shape[0] != b:
            if self.uncond.shape[0] != 1:
                raise ValueError(f"uncond has batch {self.uncond.shape[0]}, cond has {b}")
            self.uncond = self.uncond.expand(b, *self.uncond.shape[1:])
            if self.uncond_mask is not None:
                self.uncond_mask = self.uncond_mask.expand(b, *self.uncond_mask.shape[1:])
        if self.prompts is not None:
            self.prompts = tuple(self.prompts)
            if len(self.prompts) != b:
                raise ValueError(f"{len(self.prompts)} prompts for a batch of {b}")

    @classmethod
    def from_tensors(cls, cond: torch.Tensor, uncond: torch.Tensor, cond_mask: torch.Tensor | None = None,
                     uncond_mask: torch.Tensor | None = None) -> PromptConditioning:
        """Conditioning from raw embeddings: ``cond`` (B, L, D); ``uncond`` (B, L, D) or (1, L, D) (broadcast)."""
        return cls(cond, uncond, cond_mask, uncond_mask)

    def __len__(self) -> int:
        return self.cond.shape[0]

    def _map(self, fn, prompts: tuple[str, ...] | None) -> PromptConditioning:
        kw = {k: (fn(getattr(self, k)) if getattr(self, k) is not None else None) for k in self._TENSORS}
        return PromptConditioning(**kw, prompts=prompts)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PromptConditioning:
        """Moved to ``device``; floating tensors cast to ``dtype`` (masks stay bool)."""
        return self._map(lambda x: x.to(device=device, dtype=dtype if x.is_floating_point() else None), self.prompts)

    def index(self, idx) -> PromptConditioning:
        """A sub-batch (int, slice, list or tensor index along the batch)."""
        if isinstance(idx, int):
            idx = [idx]
        prompts = None
        if self.prompts is not None:
            sel = torch.arange(len(self))[idx].reshape(-1).tolist()
            prompts = tuple(self.prompts[i] for i in sel)
        return self._map(lambda x: x[idx].reshape(-1, *x.shape[1:]), prompts)

    __getitem__ = index

    def repeat_interleave(self, n: int) -> PromptConditioning:
        """Each item repeated ``n`` times in a row (e.g. several views per prompt)."""
        prompts = tuple(p for p in self.prompts for _ in range(n)) if self.prompts is not None else None
        return self._map(lambda x: x.repeat_interleave(n, dim=0), prompts)

    @staticmethod
    def cat(items: Sequence[PromptConditioning]) -> PromptConditioning:
        """Concatenate along the batch (all items must carry the same optional fields)."""
        kw = {}
        for k in PromptConditioning._TENSORS:
            vals = [getattr(i, k) for i in items]
            if all(v is None for v in vals):
                kw[k] = None
            elif any(v is None for v in vals):
                raise ValueError(f"cannot concatenate conditionings with and without {k!r}")
            else:
                kw[k] = torch.cat(vals)
        prompts = None
        if all(i.prompts is not None for i in items):
            prompts = tuple(p for i in items for p in i.prompts)
        return PromptConditioning(**kw, prompts=prompts)

    @staticmethod
    def combine(items: Sequence[PromptConditioning], weights: torch.Tensor) -> PromptConditioning:
        """Convex combination of K conditionings of the same batch size B (embedding interpolation).

        Args:
            items: K conditionings, each of batch B and equal (L, D).
            weights: (B, K) or (K,) weights (e.g. Dirichlet samples; rows should sum to 1).

        Returns:
            Conditioning with embeddings ``sum_k w[:, k] * items[k]``; a mask is the union of the
            masks of the items with non-zero weight (a token counts when any mixed prompt has it);
            ``prompts`` is None.
        """
        if not items:
            raise ValueError("nothing to combine")
        b = len(items[0])
        w = torch.as_tensor(weights, dtype=items[0].cond.dtype, device=items[0].cond.device)
        if w.dim() == 1:
            w = w[None].expand(b, -1)
        if w.shape != (b, len(items)):
            raise ValueError(f"weights of shape {tuple(w.shape)} for {len(items)} items of batch {b}")
        kw = {}
        for k in PromptConditioning._TENSORS:
            vals = [getattr(i, k) for i in items]
            if any(v is None for v in vals):
                if not all(v is None for v in vals):
                    raise ValueError(f"cannot mix conditionings with and without {k!r}")
                kw[k] = None
            elif vals[0].dtype == torch.bool:
                used = (w != 0).T.reshape(len(items), b, *([1] * (vals[0].dim() - 1)))
                kw[k] = (torch.stack(vals) & used).any(0)
            else:
                ws = w.T.reshape(len(items), b, *([1] * (vals[0].dim() - 1))).to(vals[0].dtype)
                kw[k] = (torch.stack(vals) * ws).sum(0)
        return PromptConditioning(**kw, prompts=None)

    def mix(self, other: PromptConditioning, weights: torch.Tensor | float) -> PromptConditioning:
        """``weights * self + (1 - weights) * other``; ``weights`` is a float or (B,) (see :meth:`combine`)."""
        w = torch.as_tensor(weights, dtype=self.cond.dtype, device=self.cond.device)
        w = w.expand(len(self)) if w.dim() == 0 else w
        return PromptConditioning.combine([self, other], torch.stack([w, 1 - w], dim=-1))

    def for_cameras(self, cameras: OrbitCameras | None) -> PromptConditioning:
        """The conditioning with each item's view-dependent embedding picked for its camera.

        Without view embeddings (or cameras) this is ``self``.
        """
        if self.views is None or cameras is None:
            return self
        idx = view_index(cameras, self.views.shape[1]).to(self.views.device)
        rows = torch.arange(len(self), device=self.views.device)
        mask = self.view_masks[rows, idx] if self.view_masks is not None else self.cond_mask
        return replace(self, cond=self.views[rows, idx], cond_mask=mask, views=None, view_masks=None)


class DiffusionPrior(torch.nn.Module, abc.ABC):
    """A frozen diffusion model used as the score of a 2D image prior.

    Args:
        scheduler: the diffusers noise scheduler of the model (its ``alphas_cumprod``,
            ``prediction_type`` and config are used; DDIM sampling is built from its config).
        resolution: image size (pixels) at which SDS renders for this prior.
        negative_prompt: the prompt whose embedding is the unconditional branch of CFG.
        view_suffixes: if non-empty (3 or 4 suffixes, see :func:`view_index`), prompts are also
            embedded as ``f"{prompt}, {suffix}"`` and each camera uses its view's embedding.

    Attributes:
        resolution: image size SDS renders at.
        num_train_timesteps: T.
        alphas_cumprod: (T,) float32 buffer.
        uses_cameras: whether :meth:`predict_noise` reads the cameras (view-conditioned denoiser).
        pixel_space: samples are images in [-1, 1] (False for latent priors).
        latent_channels: channels C of ``x0 = encode_images(rgb)``.
    """

    uses_cameras: bool = False
    #: Whether samples are images in [-1, 1] (pixel priors) rather than latents.
    pixel_space: bool = True

    def __init__(self, scheduler, resolution: int, negative_prompt: str = "",
                 view_suffixes: Sequence[str] = ()):
        super().__init__()
        self.scheduler = scheduler
        self.resolution = int(resolution)
        self.negative_prompt = negative_prompt
        self.view_suffixes = tuple(view_suffixes)
        if self.view_suffixes and len(self.view_suffixes) not in (3, 4):
            raise ValueError("view_suffixes must name 3 (front, side, back) or 4 (+ overhead) views")
        ac = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float32).clone()
        self.register_buffer("alphas_cumprod", ac, persistent=False)
        self.num_train_timesteps = int(ac.shape[0])
        self.prediction_type = str(scheduler.config.get("prediction_type", "epsilon"))
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction type {self.prediction_type!r}")
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    # ---- what a concrete prior provides -------------------------------------------------------

    @abc.abstractmethod
    def _embed_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embed prompts: list of N strings -> tokens (N, L, D), mask (N, L) bool or None."""

    @abc.abstractmethod
    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None,
                 cameras: OrbitCameras | None) -> torch.Tensor:
        """One raw denoiser call on a batch of N (CFG branches already stacked).

        Args:
            x_t: (N, C, h, w) noisy samples in the model's dtype.
            t: (N,) long timesteps.
            tokens: (N, L, D) text embeddings in the model's dtype.
            mask: (N, L) bool or None.
            cameras: N cameras or None.

        Returns:
            (N, C, h, w) the model's prediction (epsilon, or v for v-prediction models).
        """

    @property
    def latent_channels(self) -> int:
        return 3

    @property
    def latent_resolution(self) -> int:
        """Spatial size h = w of ``x0``."""
        return self.resolution

    @property
    def model_dtype(self) -> torch.dtype:
        """dtype the denoiser runs in."""
        unet = getattr(self, "unet", None)
        if unet is not None:
            return unet.dtype
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float32

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        """Images to the prior's sample space (differentiable).

        Pixel priors (this default): resized (bilinear, antialiased) to ``resolution`` and mapped to [-1, 1].

        Args:
            rgb: (B, 3, H, W) in [0, 1].

        Returns:
            x0: (B, C, h, w) float32.
        """
        return self.resize(rgb.float()) * 2.0 - 1.0

    def resize(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, resolution, resolution), bilinear (antialiased when shrinking); differentiable."""
        if rgb.shape[-2:] == (self.resolution, self.resolution):
            return rgb
        return F.interpolate(rgb, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                             antialias=rgb.shape[-1] > self.resolution)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Samples back to images: (B, C, h, w) -> (B, 3, H, W) in [0, 1]."""
        return ((x0.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    # ---- shared machinery ---------------------------------------------------------------------

    def _cached_embeddings(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            with torch.no_grad():
                tokens, mask = self._embed_text(missing)
            for i, p in enumerate(missing):
                self._text_cache[p] = (tokens[i].detach(), None if mask is None else mask[i].detach())
        rows = [self._text_cache[p] for p in prompts]
        tokens = torch.stack([r[0] for r in rows]).to(self.device)
        mask = None if rows[0][1] is None else torch.stack([r[1] for r in rows]).to(self.device)
        return tokens, mask

    def encode_prompts(self, prompts: Sequence[str]) -> PromptConditioning:
        """Embeddings of ``prompts`` and of the negative prompt (cached per string).

        Returns:
            :class:`PromptConditioning` of batch B = ``len(prompts)``, with per-view embeddings when
            the prior has ``view_suffixes``.
        """
        prompts = [str(p) for p in prompts]
        cond, cmask = self._cached_embeddings(prompts)
        uncond, umask = self._cached_embeddings([self.negative_prompt])
        views = vmasks = None
        if self.view_suffixes:
            vt, vm = self._cached_embeddings([f"{p}, {s}" for p in prompts for s in self.view_suffixes])
            v = len(self.view_suffixes)
            views = vt.reshape(len(prompts), v, *vt.shape[1:])
            vmasks = None if vm is None else vm.reshape(len(prompts), v, *vm.shape[1:])
        return PromptConditioning(cond, uncond, cmask, umask, views, vmasks, tuple(prompts))

    def clear_cache(self) -> None:
        """Forget cached prompt embeddings."""
        self._text_cache.clear()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The forward process ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise`` with ``a_t = alphas_cumprod[t]``.

        Args:
            x0, noise: (B, C, h, w); t: (B,) long.
        """
        a = self.alphas_cumprod[t.to(self.device)].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def clean_estimate(self, x_t: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`add_noise`: ``x0 = (x_t - sqrt(1 - a_t) noise) / sqrt(a_t)``, the clean sample
        that a (predicted) ``noise`` implies.

        Args:
            x_t, noise: (B, C, h, w); t: (B,) long.
        """
        a = self.alphas_cumprod[t.to(self.device)].to(x_t.device, x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        return (x_t - (1 - a).sqrt() * noise) / a.sqrt()

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: PromptConditioning,
                      cameras: OrbitCameras | None = None, guidance_scale: float | torch.Tensor = 7.5) -> torch.Tensor:
        """Classifier-free guided noise prediction.

        ``eps = eps_uncond + s * (eps_cond - eps_uncond)``, both branches in one forward pass of
        batch 2B (one pass of batch B when ``s == 1``, where the result is ``eps_cond``).

        Args:
            x_t: (B, C, h, w) noisy samples.
            t: (B,) or scalar integer timesteps in [0, T).
            cond: conditioning of batch B.
            cameras: B cameras (required by camera-conditioned priors; also select view prompts).
            guidance_scale: CFG scale s: a number, or a (B,) tensor of one scale per item.

        Returns:
            (B, C, h, w) predicted noise (epsilon, also for v-prediction models), in ``x_t``'s dtype.
        """
        b = x_t.shape[0]
        if len(cond) != b:
            raise ValueError(f"conditioning has batch {len(cond)}, x_t has {b}")
        if self.uses_cameras and cameras is None:
            raise ValueError(f"{type(self).__name__} is view-conditioned: predict_noise needs cameras")
        if cameras is not None and len(cameras) != b:
            raise ValueError(f"{len(cameras)} cameras for a batch of {b}")
        t = torch.as_tensor(t, device=self.device).long().reshape(-1).expand(b)
        dt = self.model_dtype
        c = cond.for_cameras(cameras).to(self.device)
        x_in = x_t.to(self.device, dt)
        if torch.is_tensor(guidance_scale):
            if guidance_scale.numel() not in (1, b):
                raise ValueError(f"guidance_scale must be a number or ({b},), got {tuple(guidance_scale.shape)}")
            scale = guidance_scale.to(self.device, torch.float32).reshape(-1, 1, 1, 1)
            if bool((scale == 1.0).all()):
                guidance_scale = 1.0
        else:
            scale = float(guidance_scale)
        with torch.no_grad():
            if not torch.is_tensor(guidance_scale) and guidance_scale == 1.0:
                out = self._denoise(x_in, t, c.cond.to(dt), c.cond_mask, cameras).float()
            else:
                tokens = torch.cat([c.cond, c.uncond]).to(dt)
                mask = None
                if c.cond_mask is not None or c.uncond_mask is not None:
                    cm = c.cond_mask if c.cond_mask is not None else torch.ones_like(c.cond[..., 0], dtype=torch.bool)
                    um = (c.uncond_mask if c.uncond_mask is not None
                          else torch.ones_like(c.uncond[..., 0], dtype=torch.bool))
                    mask = torch.cat([cm, um])
                cams2 = None
                if cameras is not None:
                    cams2 = OrbitCameras(cameras.phi.repeat(2), cameras.theta.repeat(2), cameras.radius.repeat(2),
                                         cameras.fov_deg)
                both = self._denoise(torch.cat([x_in, x_in]), torch.cat([t, t]), tokens, mask, cams2).float()
                e_c, e_u = both.chunk(2)
                out = e_u + scale * (e_c - e_u)
            if self.prediction_type == "v_prediction":
                a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
                out = a.sqrt() * out + (1 - a).sqrt() * x_in.float()
        return out.to(x_t.dtype)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str] | PromptConditioning, cameras: OrbitCameras | None = None,
               guidance_scale: float = 3.0, num_inference_steps: int = 25, generator: torch.Generator | None = None,
               batch_size: int = 64, progress: bool = False, eta: float = 0.0,
               clip_denoised: bool | None = None, restarts: int = 0, restart_t: float = 0.3,
               timestep_spacing: str | None = None,
               guidance_interval: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """Generate images with DDIM and classifier-free guidance, optionally with restarts.

        Restart sampling (Xu et al., 2023): after the full trajectory, the sample is noised again to
        the level ``restart_t`` and denoised over the same step grid, ``restarts`` times. Each round
        re-applies the denoiser where it is accurate (moderate noise) to a sample that already has
        its object, which removes the error that the first, high-noise steps leave behind (for the
        shapes prior: background noise; see ``assets/shapes-prior/README.md``).

        Args:
            prompts: B prompts (or an already encoded / mixed :class:`PromptConditioning`).
            cameras: B cameras (required by view-conditioned priors).
            guidance_scale: CFG scale.
            num_inference_steps: DDIM steps.
            generator: RNG of the initial noise (and of the noise of stochastic steps when ``eta > 0``).
            batch_size: items denoised together.
            progress: show a tqdm bar over batches and steps.
            eta: DDIM eta (0 = deterministic).
            clip_denoised: clip each step's predicted clean sample to [-1, 1] (default: for pixel priors;
                the scheduler's own dynamic thresholding, as in IF, takes precedence).
            restarts: restart rounds after the first trajectory (0: plain DDIM).
            restart_t: noise level of each restart as a fraction of T (the restart starts at the last
                step of the grid at or below ``restart_t * T``).
            timestep_spacing: the DDIM step grid (``leading``, ``trailing``, ``linspace``; default: the
                scheduler config). ``trailing`` starts at t = T - 1, where the image has no signal left;
                ``leading`` starts lower (t = 960 of 1000 for 25 steps), where the training images still
                carry a trace of the clean image (its mean) that pure noise lacks.
            guidance_interval: ``(lo, hi)`` fractions of T: classifier-free guidance applies to the steps
                with ``lo T <= t <= hi T`` and the others use the conditional prediction alone (guidance in a
                limited interval, Kynkäänniemi et al., 2024: at high noise, guidance pushes the clean-image
                estimate off the data and costs shape fidelity).

        Returns:
            (B, 3, H, W) images in [0, 1] (H = ``resolution``).
        """
        from diffusers import DDIMScheduler

        cond = prompts if isinstance(prompts, PromptConditioning) else self.encode_prompts(list(prompts))
        b = len(cond)
        if cameras is not None and len(cameras) != b:
            raise ValueError(f"{len(cameras)} cameras for {b} prompts")
        # predict_noise always returns epsilon, whatever the model predicts.
        clip = self.pixel_space if clip_denoised is None else bool(clip_denoised)
        spacing = {} if timestep_spacing is None else {"timestep_spacing": timestep_spacing}
        ddim = DDIMScheduler.from_config(self.scheduler.config, prediction_type="epsilon", clip_sample=clip,
                                         clip_sample_range=1.0, **spacing)
        ddim.set_timesteps(num_inference_steps, device=self.device)
        if restarts < 0:
            raise ValueError(f"restarts must be >= 0, got {restarts}")
        if len(guidance_interval) != 2 or not 0.0 <= guidance_interval[0] <= guidance_interval[1] <= 1.0:
            raise ValueError(f"guidance_interval must be (lo, hi) with 0 <= lo <= hi <= 1, got {guidance_interval}")
        if restarts and not 0.0 < restart_t < 1.0:
            raise ValueError(f"restart_t must be in (0, 1), got {restart_t}")
        restart_steps = ddim.timesteps[ddim.timesteps <= restart_t * self.num_train_timesteps]
        if restarts and (len(restart_steps) == 0 or int(restart_steps[0]) == 0):
            raise ValueError(f"restart_t={restart_t} lies below the first step above 0 of a "
                             f"{num_inference_steps}-step grid")
        lo, hi = (round(f * self.num_train_timesteps) for f in guidance_interval)
        shape = (self.latent_channels, self.latent_resolution, self.latent_resolution)
        out = []
        bar = None
        if progress:
            from tqdm import tqdm

            per_batch = len(ddim.timesteps) + restarts * len(restart_steps)
            bar = tqdm(total=math.ceil(b / batch_size) * per_batch, desc="sample", dynamic_ncols=True)

        def denoise(x: torch.Tensor, steps: torch.Tensor, c: PromptConditioning, cams) -> torch.Tensor:
            for t in steps:
                x_in = ddim.scale_model_input(x, t)
                inside = lo <= int(t) <= hi
                eps = self.predict_noise(x_in, t.expand(len(x)), c, cams, guidance_scale if inside else 1.0)
                x = ddim.step(eps, t, x, eta=eta, generator=generator).prev_sample
                if bar is not None:
                    bar.update(1)
            return x

        for s in range(0, b, batch_size):
            idx = torch.arange(s, min(b, s + batch_size))
            c = cond.index(idx)
            cams = cameras.index(idx) if cameras is not None else None
            x = _randn((len(idx), *shape), generator, self.device) * ddim.init_noise_sigma
            x = denoise(x, ddim.timesteps, c, cams)
            for _ in range(restarts):
                t0 = restart_steps[0].expand(len(idx))
                x = self.add_noise(x, _randn(x.shape, generator, self.device, x.dtype), t0)
                x = denoise(x, restart_steps, c, cams)
            out.append(self.decode(x))
        if bar is not None:
            bar.close()
        return torch.cat(out)

    def train(self, mode: bool = True) -> DiffusionPrior:
        """Priors stay in eval mode (frozen)."""
        return super().train(False)
