"""Score distillation with DDIM-inverted noise (att3d.guidance.sdi): the inversion, the fixed point that SDS lacks,
the gradient formula, the config switch and a few training steps."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import tiny_config

from att3d.cli.train import main as train_main
from att3d.config import build_guidance, guidance_config
from att3d.guidance import ScoreDistillation, ShapesPrior
from att3d.guidance.priors import DiffusionPrior
from att3d.guidance.sdi import InvertedScoreDistillation, ddim_invert
from att3d.model import AmortizedModel
from att3d.render.cameras import OrbitCameras

PROMPTS = ["a red cube", "a blue sphere", "a green torus"]


class ConstantPrior(DiffusionPrior):
    """Predicts the same noise ``e(prompt)`` everywhere (``linear``: ``0.5 x_t + e``), epsilon parametrisation."""

    def __init__(self, linear: bool = False):
        from diffusers import DDPMScheduler

        super().__init__(DDPMScheduler(num_train_timesteps=1000), resolution=8)
        self.linear = linear

    def _embed_text(self, prompts):
        codes = torch.tensor([[float(sum(map(ord, p)) % 97) / 97.0 - 0.5] for p in prompts])
        return codes[:, None, :].expand(-1, 3, 4).clone(), None

    def _denoise(self, x_t, t, tokens, mask, cameras):
        e = torch.zeros_like(x_t) + tokens.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return e + 0.5 * x_t if self.linear else e


def _inputs(prior, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, prior.resolution, prior.resolution, generator=g)
    cond = prior.encode_prompts(PROMPTS[:n])
    return images, cond, g


def test_a_prior_consistent_along_its_trajectory_gives_no_gradient():
    """If the prior predicts the same noise all along the DDIM path, inverting reads that noise back exactly and
    SDI's gradient vanishes; SDS, with fresh noise, still pulls."""
    prior = ConstantPrior()
    images, cond, g = _inputs(prior)
    t = torch.tensor([100, 500, 900])
    x0 = prior.encode_images(images)
    e = prior.predict_noise(x0, t, cond, None, 1.0)
    sdi = InvertedScoreDistillation(prior, guidance_scale=1.0, inversion_steps=4)
    torch.testing.assert_close(sdi.noise_for(x0, torch.randn_like(x0), t, cond, None), e, rtol=1e-4, atol=1e-4)
    out = sdi(images.clone().requires_grad_(True), cond, None, t=t, generator=g)
    assert float(out.grad_norm) < 1e-4
    sds = ScoreDistillation(prior, guidance_scale=1.0)(images.clone().requires_grad_(True), cond, None, t=t,
                                                       generator=g)
    assert float(sds.grad_norm) > 0.1


def test_ddim_inversion_steps():
    prior = ConstantPrior(linear=True)
    images, cond, _ = _inputs(prior)
    x0 = prior.encode_images(images)
    t = torch.tensor([0, 300, 700])
    # one stride from 0 to t is the closed-form DDIM step; t = 0 leaves the sample as it is
    a = prior.alphas_cumprod
    eps = prior.predict_noise(x0, torch.zeros(3, dtype=torch.long), cond, None, 1.0)
    expected = a[t].view(-1, 1, 1, 1).sqrt() * x0 + (1 - a[t]).view(-1, 1, 1, 1).sqrt() * eps
    expected[0] = x0[0]
    torch.testing.assert_close(ddim_invert(prior, x0, t, 1, cond, None), expected, rtol=1e-5, atol=1e-5)
    # more steps: a different path to the same timesteps, the first item still untouched
    many = ddim_invert(prior, x0, t, 8, cond, None)
    torch.testing.assert_close(many[0], x0[0])
    assert not torch.allclose(many[1:], expected[1:], atol=1e-3)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        ddim_invert(prior, x0, t, 0, cond, None)


@pytest.fixture(scope="module")
def shapes_prior(tiny_prior_dir) -> ShapesPrior:
    return ShapesPrior.from_pretrained(tiny_prior_dir)


def test_the_gradient_is_the_prediction_minus_the_inverted_noise(shapes_prior):
    prior = shapes_prior
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, prior.resolution, prior.resolution, generator=g)
    cams = OrbitCameras.sample_training(4, g)
    cond = prior.encode_prompts([PROMPTS[i % 3] for i in range(4)])
    t = torch.tensor([50, 300, 600, 950])
    sdi = InvertedScoreDistillation(prior, guidance_scale=3.0, inversion_steps=5)
    x = images.clone().requires_grad_(True)
    sdi(x, cond, cams, t=t, generator=g).loss.backward()
    with torch.no_grad():
        x0 = prior.encode_images(images)
        x_t = ddim_invert(prior, x0, t, 5, cond, cams)
        a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps_inv = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        grad = sdi.weight(t).view(-1, 1, 1, 1) * (prior.predict_noise(x_t, t, cond, cams, 3.0) - eps_inv)
    y = images.clone().requires_grad_(True)
    (prior.encode_images(y) * grad / 4).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-3, atol=1e-5)
    assert sdi.replace(guidance_scale=1.0).inversion_steps == 5
    with pytest.raises(ValueError, match="inversion_steps"):
        InvertedScoreDistillation(prior, inversion_steps=0)


def test_config_and_training_steps(tiny_prior_dir, tmp_path):
    g = guidance_config("shapes")
    g["prior"]["path"] = str(tiny_prior_dir)
    g["method"], g["sdi"] = "sdi", {**g["sdi"], "inversion_steps": 3}
    sdi = build_guidance(g)
    assert isinstance(sdi, InvertedScoreDistillation) and sdi.inversion_steps == 3
    torch.manual_seed(0)
    AmortizedModel(tiny_config()).save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    run = tmp_path / "run"
    assert train_main([f"init_from={tmp_path / 'model'}", f"run_dir={run}", "prompts=file",
                       f"prompts.train={tmp_path / 'prompts.txt'}", f"guidance.prior.path={tiny_prior_dir}",
                       "guidance.method=sdi", "guidance.sdi.inversion_steps=3", "trainer.batch_size=2",
                       "trainer.resolution=32", "trainer.device=cpu", "trainer.threads=1", "progress=false",
                       "trainer.image_every=0", "trainer.log_every=1", "trainer.max_steps=2"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["sds_grad_norm"] > 0 and r["grad_norm"] > 0 for r in rows)
