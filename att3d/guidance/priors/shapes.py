"""The embedded default prior: a small view-conditioned pixel diffusion model of the shapes world.

It is the model trained by :mod:`att3d.world.prior_training` and saved by
:func:`att3d.world.prior_training.save_prior` as a folder::

    prior_config.json   {"kind": "shapes", "arch": {PriorArchitecture fields}, ...}
    unet/               diffusers UNet2DConditionModel (fp16 safetensors)
    scheduler/          diffusers DDPMScheduler (epsilon prediction)

Conditioning is exactly the training one: images in [-1, 1] of shape (B, 3, R, R), the
caption's token embeddings from the ``arch.text_encoder`` (MiniLM) with their attention
mask, and the camera 4-vector ``(sin phi, cos phi, sin theta, cos theta)`` through the
UNet's projection class embedding (with ``arch.camera_harmonics`` > 1, followed by its azimuth harmonics,
:func:`att3d.render.cameras.camera_features`), and with ``arch.camera_map = "ray"`` each pixel's ray
(:func:`att3d.render.cameras.camera_map`) as 6 more input channels beside the image. The unconditional branch
is the empty prompt ``""`` (captions were dropped to ``""`` in training).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from att3d.guidance.priors.base import DiffusionPrior, as_dtype, diffusers_model_kwargs
from att3d.registry import PRIORS, TEXT_ENCODERS
from att3d.render.cameras import OrbitCameras, camera_features, camera_map
from att3d.utils.checkpoint import load_json
from att3d.utils.paths import REPO_ROOT

#: Environment variable naming the default shapes prior folder.
SHAPES_PRIOR_ENV = "ATT3D_SHAPES_PRIOR"


def default_shapes_prior_path() -> Path:
    """``$ATT3D_SHAPES_PRIOR`` if set, else ``assets/shapes-prior`` of the source checkout."""
    env = os.environ.get(SHAPES_PRIOR_ENV)
    if env:
        return Path(env)
    return REPO_ROOT / "assets" / "shapes-prior"


def unet_input(x_t: torch.Tensor, cameras: OrbitCameras, kind: str) -> torch.Tensor:
    """The prior UNet's input: the noisy images (B, 3, R, R), followed by the cameras' map (B, 6, R, R) when
    ``kind`` (``PriorArchitecture.camera_map``) is not ``none``."""
    cmap = camera_map(cameras, x_t.shape[-1], kind)
    return x_t if cmap is None else torch.cat([x_t, cmap.to(x_t.device, x_t.dtype)], dim=1)


class ShapesPrior(DiffusionPrior):
    """View-conditioned pixel-space prior of the shapes world.

    Args:
        unet: ``UNet2DConditionModel`` (out 3 channels; in 3, or 9 with a camera map; projection class
            embedding of the camera).
        scheduler: its ``DDPMScheduler``.
        text_encoder: an :class:`att3d.text.encoders.TextEncoder` (the one the UNet was trained with).
        arch: the ``PriorArchitecture`` fields as a dict (``resolution`` is read from it).
        negative_prompt: unconditional prompt (``""`` as in training).
    """

    uses_cameras = True

    def __init__(self, unet, scheduler, text_encoder, arch: dict, negative_prompt: str = ""):
        super().__init__(scheduler, resolution=int(arch["resolution"]), negative_prompt=negative_prompt)
        self.unet = unet.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.arch = dict(arch)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                        dtype: torch.dtype | str = torch.float32) -> ShapesPrior:
        """Load a prior folder written by :func:`att3d.world.prior_training.save_prior`.

        Args:
            folder: the folder (default :func:`default_shapes_prior_path`).
            device: where the prior runs.
            dtype: dtype of the UNet (weights are stored in fp16; fp32 on CPU).
        """
        from diffusers import DDPMScheduler, UNet2DConditionModel

        folder = Path(folder) if folder is not None else default_shapes_prior_path()
        if not (folder / "prior_config.json").is_file():
            raise FileNotFoundError(f"no shapes prior at {folder} (expected prior_config.json, unet/, scheduler/); "
                                    f"train one with `python scripts/train_prior.py` or set ${SHAPES_PRIOR_ENV}")
        meta = load_json(folder / "prior_config.json")
        if meta.get("kind") != "shapes":
            raise ValueError(f"{folder} holds a prior of kind {meta.get('kind')!r}, not 'shapes'")
        arch = meta["arch"]
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=as_dtype(dtype),
                                                    **diffusers_model_kwargs())
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
        text_encoder = TEXT_ENCODERS.build(arch["text_encoder"], max_length=int(arch["text_max_length"]))
        return cls(unet, scheduler, text_encoder, arch).to(device)

    def _embed_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.text_encoder(list(prompts))
        return emb.tokens, emb.mask

    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None,
                 cameras: OrbitCameras | None) -> torch.Tensor:
        if cameras is None:
            raise ValueError("the shapes prior is view-conditioned: cameras are required")
        cam = camera_features(cameras.as_vector(), int(self.arch.get("camera_harmonics", 1))).to(x_t.device, x_t.dtype)
        x_in = unet_input(x_t, cameras, str(self.arch.get("camera_map", "none")))  # moves the map to x_t
        return self.unet(x_in, t, encoder_hidden_states=tokens, class_labels=cam,
                         encoder_attention_mask=None if mask is None else mask.to(x_t.dtype)).sample


@PRIORS.register("shapes")
def shapes_prior(path: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype | str = torch.float32) -> ShapesPrior:
    """The embedded shapes prior (``path`` defaults to :func:`default_shapes_prior_path`)."""
    return ShapesPrior.from_pretrained(path, device=device, dtype=dtype)
