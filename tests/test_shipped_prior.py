"""The shipped shapes-world prior (assets/shapes-prior) loads through from_pretrained and predicts noise."""

from __future__ import annotations

from pathlib import Path

import torch

from att3d.guidance.priors.shapes import ShapesPrior
from att3d.render.cameras import OrbitCameras

PRIOR = Path(__file__).resolve().parents[1] / "assets" / "shapes-prior"


def test_shipped_prior_is_small_fp16_safetensors():
    weights = PRIOR / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file() and (PRIOR / "scheduler" / "scheduler_config.json").is_file()
    assert weights.stat().st_size < 40 * 2**20
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        assert {f.get_tensor(k).dtype for k in list(f.keys())[:20]} == {torch.float16}


def test_shipped_prior_predicts_noise_of_the_right_shape():
    from att3d.world.render import render_objects
    from att3d.world.shapes import WorldObject

    prior = ShapesPrior.from_pretrained(PRIOR)
    assert prior.resolution == 32 and prior.uses_cameras
    cond = prior.encode_prompts(["a red cube", "a blue torus"])
    cams = OrbitCameras.evaluation(2)
    gt = render_objects([WorldObject("cube", "red"), WorldObject("torus", "blue")], cams, 32)["rgb"]
    x0 = prior.encode_images(gt.permute(0, 3, 1, 2))
    t = torch.tensor([500, 900])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    eps = prior.predict_noise(prior.add_noise(x0, noise, t), t, cond, cams, guidance_scale=3.0)
    assert eps.shape == (2, 3, 32, 32) and torch.isfinite(eps).all()
    # A trained denoiser recovers most of the noise of a world image, at moderate and at high noise.
    err = (eps - noise).pow(2).mean(dim=(1, 2, 3)) / noise.pow(2).mean(dim=(1, 2, 3))
    assert (err < 0.1).all(), err
