"""DeepFloyd IF stage I as a pixel-space prior (64 x 64, T5 text encoder).

Loaded from a diffusers IF repository (``DeepFloyd/IF-I-XL-v1.0``) with the layout::

    unet/  text_encoder/ (T5EncoderModel)  tokenizer/  scheduler/

The UNet projects the T5 states through ``encoder_hid_dim`` and predicts noise and a
variance (6 channels); SDS uses the first 3 (the noise). Prompts are embedded as the IF
pipeline does without caption cleaning: lower-cased, padded to 77 tokens, T5 run with the
attention mask, all 77 states given to the UNet.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from att3d.guidance.priors.base import (
    DEFAULT_VIEW_SUFFIXES,
    DiffusionPrior,
    diffusers_model_kwargs,
    hf_text_embeddings,
    hub_kwargs,
)
from att3d.guidance.priors.stable_diffusion import default_device_dtype
from att3d.registry import PRIORS
from att3d.render.cameras import OrbitCameras

DEFAULT_IF_MODEL = "DeepFloyd/IF-I-XL-v1.0"


class DeepFloydPrior(DiffusionPrior):
    """Pixel-space IF stage I prior.

    Args:
        unet: IF ``UNet2DConditionModel`` (3 input channels, 3 or 6 output channels).
        text_encoder: ``T5EncoderModel``.
        tokenizer: its tokenizer.
        scheduler: the noise scheduler.
        resolution: pixel size (default the UNet's ``sample_size``, 64 for IF-I).
        negative_prompt: unconditional prompt.
        view_suffixes: view-dependent prompt suffixes (3 or 4) or ``()``.
        max_length: T5 tokens per prompt (77 in IF).
    """

    uses_cameras = False

    def __init__(self, unet, text_encoder, tokenizer, scheduler, resolution: int | None = None,
                 negative_prompt: str = "", view_suffixes: Sequence[str] = DEFAULT_VIEW_SUFFIXES, max_length: int = 77):
        super().__init__(scheduler, resolution=int(resolution or unet.config.sample_size),
                         negative_prompt=negative_prompt, view_suffixes=view_suffixes)
        self.unet = unet.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike = DEFAULT_IF_MODEL, device: torch.device | str | None = None,
                        dtype: torch.dtype | str | None = None, negative_prompt: str = "",
                        view_dependent: bool = True, variant: str | None = None,
                        local_files_only: bool | None = None) -> DeepFloydPrior:
        """Load the stage I components of a diffusers IF repository.

        Args:
            path: local folder or hub id.
            device, dtype: default CUDA/fp16 if available, else CPU/fp32.
            negative_prompt: unconditional prompt.
            view_dependent: append DreamFusion view suffixes chosen from the camera azimuth.
            variant: weights variant (IF publishes ``"fp16"``).
            local_files_only: default True when ``path`` is an existing folder.
        """
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, T5EncoderModel

        dev, dt = default_device_dtype(device, dtype)
        path = str(path)
        kw = hub_kwargs(path, local_files_only)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dt, variant=variant, **kw,
                                                    **diffusers_model_kwargs())
        text_encoder = T5EncoderModel.from_pretrained(path, subfolder="text_encoder", dtype=dt,
                                                      **hub_kwargs(path, local_files_only, variant=variant))
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        return cls(unet, text_encoder, tokenizer, scheduler, negative_prompt=negative_prompt,
                   view_suffixes=DEFAULT_VIEW_SUFFIXES if view_dependent else ()).to(dev)

    def _embed_text(self, prompts: list[str]) -> tuple[torch.Tensor, None]:
        texts = [p.lower().strip() for p in prompts]
        tokens, _ = hf_text_embeddings(self.tokenizer, self.text_encoder, texts, self.max_length, pass_mask=True)
        return tokens, None  # the IF UNet is called without a mask, as in the IF pipeline

    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None,
                 cameras: OrbitCameras | None) -> torch.Tensor:
        out = self.unet(x_t, t, encoder_hidden_states=tokens).sample
        return out[:, : x_t.shape[1]]  # noise; the other channels are the learned variance


@PRIORS.register("deepfloyd_if")
def deepfloyd_prior(path: str = DEFAULT_IF_MODEL, **kwargs) -> DeepFloydPrior:
    """DeepFloyd IF stage I prior (see :meth:`DeepFloydPrior.from_pretrained` for the keyword arguments)."""
    return DeepFloydPrior.from_pretrained(path, **kwargs)
