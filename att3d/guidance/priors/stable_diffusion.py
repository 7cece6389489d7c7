"""Stable Diffusion as a latent-space prior (DreamFusion-style SDS through the VAE).

Loaded from a diffusers Stable Diffusion folder or hub id with the layout::

    unet/  vae/  text_encoder/ (CLIPTextModel)  tokenizer/  scheduler/

Renders are resized to ``resolution`` (512 for SD 1.x/2.x-base), encoded by the VAE into
latents of ``resolution / 8`` and distilled there. The UNet takes no camera; the camera
enters through optional view-dependent prompt suffixes ("..., front view", "side view",
"back view", "overhead view"), chosen from the azimuth as in DreamFusion.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from att3d.guidance.priors.base import (
    DEFAULT_VIEW_SUFFIXES,
    DiffusionPrior,
    as_dtype,
    diffusers_model_kwargs,
    hf_text_embeddings,
    hub_kwargs,
)
from att3d.registry import PRIORS
from att3d.render.cameras import OrbitCameras

DEFAULT_SD_MODEL = "stabilityai/stable-diffusion-2-1-base"


def default_device_dtype(device: torch.device | str | None, dtype: torch.dtype | str | None
                         ) -> tuple[torch.device, torch.dtype]:
    """CUDA with fp16 when available, else CPU with fp32 (for arguments left None)."""
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = as_dtype(dtype) if dtype is not None else (torch.float16 if dev.type == "cuda" else torch.float32)
    return dev, dt


class StableDiffusionPrior(DiffusionPrior):
    """Latent diffusion prior (Stable Diffusion).

    Args:
        unet: ``UNet2DConditionModel`` over VAE latents.
        vae: ``AutoencoderKL``.
        text_encoder: ``CLIPTextModel``.
        tokenizer: its tokenizer (prompts are padded to ``max_length``, default the tokenizer's
            ``model_max_length`` capped at the encoder's position count).
        scheduler: the noise scheduler (epsilon or v-prediction).
        resolution: image size fed to the VAE (latents are ``resolution / vae_scale_factor``).
        negative_prompt: unconditional prompt.
        view_suffixes: view-dependent prompt suffixes (3 or 4) or ``()`` to disable.
    """

    uses_cameras = False
    pixel_space = False

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, resolution: int = 512,
                 negative_prompt: str = "", view_suffixes: Sequence[str] = DEFAULT_VIEW_SUFFIXES,
                 max_length: int | None = None):
        super().__init__(scheduler, resolution=resolution, negative_prompt=negative_prompt,
                         view_suffixes=view_suffixes)
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if resolution % self.vae_scale_factor:
            raise ValueError(f"resolution {resolution} is not a multiple of the VAE factor {self.vae_scale_factor}")
        limit = int(getattr(text_encoder.config, "max_position_embeddings", 77))
        self.max_length = int(max_length or min(int(getattr(tokenizer, "model_max_length", limit)), limit))
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.get("shift_factor", None) or 0.0)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike = DEFAULT_SD_MODEL, device: torch.device | str | None = None,
                        dtype: torch.dtype | str | None = None, resolution: int = 512, negative_prompt: str = "",
                        view_dependent: bool = True, variant: str | None = None,
                        local_files_only: bool | None = None) -> StableDiffusionPrior:
        """Load the components of a diffusers Stable Diffusion repository.

        Args:
            path: local folder or hub id.
            device, dtype: default CUDA/fp16 if available, else CPU/fp32.
            resolution: image size at which SDS renders (512 -> 64x64 latents).
            negative_prompt: unconditional prompt.
            view_dependent: append DreamFusion view suffixes chosen from the camera azimuth.
            variant: weights variant (e.g. ``"fp16"``).
            local_files_only: default True when ``path`` is an existing folder.
        """
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        dev, dt = default_device_dtype(device, dtype)
        path = str(path)
        kw = hub_kwargs(path, local_files_only)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dt, variant=variant, **kw,
                                                    **diffusers_model_kwargs())
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dt, variant=variant, **kw,
                                            **diffusers_model_kwargs())
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dt,
                                                     **hub_kwargs(path, local_files_only, variant=variant))
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        return cls(unet, vae, text_encoder, tokenizer, scheduler, resolution=resolution,
                   negative_prompt=negative_prompt,
                   view_suffixes=DEFAULT_VIEW_SUFFIXES if view_dependent else ()).to(dev)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def latent_resolution(self) -> int:
        return self.resolution // self.vae_scale_factor

    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        """VAE latents of images (differentiable).

        Args:
            rgb: (B, 3, H, W) in [0, 1]; resized (:meth:`resize`) to ``resolution`` when needed.

        Returns:
            (B, 4, resolution / 8, resolution / 8) float32: ``(mean latent - shift) * scaling_factor``
            (the posterior mean; its standard deviation is negligible for SD's VAE).
        """
        x = self.resize(rgb.float()).to(self.vae.dtype) * 2.0 - 1.0
        z = self.vae.encode(x).latent_dist.mean
        return ((z - self.shift_factor) * self.scaling_factor).float()

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) -> images (B, 3, resolution, resolution) in [0, 1]."""
        z = x0.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return ((self.vae.decode(z).sample.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def _embed_text(self, prompts: list[str]) -> tuple[torch.Tensor, None]:
        tokens, _ = hf_text_embeddings(self.tokenizer, self.text_encoder, prompts, self.max_length, pass_mask=False)
        return tokens, None  # the SD UNet attends to every position, padding included

    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None,
                 cameras: OrbitCameras | None) -> torch.Tensor:
        return self.unet(x_t, t, encoder_hidden_states=tokens).sample


@PRIORS.register("stable_diffusion")
def stable_diffusion_prior(path: str = DEFAULT_SD_MODEL, **kwargs) -> StableDiffusionPrior:
    """Stable Diffusion prior (see :meth:`StableDiffusionPrior.from_pretrained` for the keyword arguments)."""
    return StableDiffusionPrior.from_pretrained(path, **kwargs)
