"""The shipped shapes-world priors (assets/shapes-prior, assets/shapes-prior-wordings) load through from_pretrained
and predict noise; the wordings prior reads a wording of an object as its caption."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from att3d.guidance.priors.shapes import ShapesPrior
from att3d.render.cameras import OrbitCameras

ASSETS = Path(__file__).resolve().parents[1] / "assets"
PRIORS = [ASSETS / "shapes-prior", ASSETS / "shapes-prior-wordings"]


@pytest.mark.parametrize("PRIOR", PRIORS, ids=lambda p: p.name)
def test_shipped_prior_is_small_fp16_safetensors(PRIOR):
    weights = PRIOR / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file() and (PRIOR / "scheduler" / "scheduler_config.json").is_file()
    assert weights.stat().st_size < 40 * 2**20
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        assert {f.get_tensor(k).dtype for k in list(f.keys())[:20]} == {torch.float16}


@pytest.mark.parametrize("PRIOR, prompts", [(PRIORS[0], ["a red cube", "a blue torus"]),
                                            (PRIORS[1], ["a red cube", "a blue torus"]),
                                            (PRIORS[1], ["a cherry square block", "a hoop that is sapphire"])],
                         ids=["shapes-prior", "shapes-prior-wordings", "shapes-prior-wordings-wordings"])
def test_shipped_prior_predicts_noise_of_the_right_shape(PRIOR, prompts):
    from att3d.world.render import render_objects
    from att3d.world.shapes import WorldObject

    prior = ShapesPrior.from_pretrained(PRIOR)
    assert prior.resolution == 32 and prior.uses_cameras
    cond = prior.encode_prompts(prompts)
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


def wording_errors(folder: Path, right: str, wrong: str) -> tuple[float, float]:
    """Noise-prediction error of renders of the red cube under a right and a wrong wording (no guidance), summed
    over 8 views, t = 600 and 800, 4 noise draws."""
    from att3d.world.render import render_objects
    from att3d.world.shapes import WorldObject

    prior = ShapesPrior.from_pretrained(folder)
    cams = OrbitCameras.evaluation(8)
    x0 = prior.encode_images(render_objects([WorldObject("cube", "red")] * 8, cams, 32)["rgb"].permute(0, 3, 1, 2))
    gen = torch.Generator().manual_seed(0)
    out = []
    for prompt in (right, wrong):
        cond = prior.encode_prompts([prompt] * 8)
        total = 0.0
        for t in (600, 800):
            for _ in range(4):
                noise = torch.randn(x0.shape, generator=gen)
                tt = torch.full((8,), t)
                eps = prior.predict_noise(prior.add_noise(x0, noise, tt), tt, cond, cams, guidance_scale=1.0)
                total += float((eps - noise).pow(2).mean())
        out.append(total)
    return out[0], out[1]


def test_the_wordings_prior_reads_colour_words_of_the_vocabulary():
    # "cherry" is one of red's words (WORLD.md): the wordings prior explains a red cube better with it than with
    # blue's "cobalt"
    right, wrong = wording_errors(PRIORS[1], "a cherry square block", "a cobalt square block")
    assert right < 0.9 * wrong, (right, wrong)
