"""Variational score distillation (att3d.guidance.vsd): the learned baseline, the estimator's training, the config
switch, and an exact resume of a training run whose checkpoints carry the estimator."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import tiny_config

import att3d
from att3d.cli.train import main as train_main
from att3d.config import build_guidance, guidance_config
from att3d.guidance import ScoreDistillation, ShapesPrior
from att3d.guidance.vsd import VariationalScoreDistillation
from att3d.model import AmortizedModel
from att3d.render.cameras import OrbitCameras
from att3d.train.trainer import GUIDANCE_STATE_NAME
from att3d.utils.errors import Att3dError

PROMPTS = ["a red cube", "a blue sphere", "a green torus"]


@pytest.fixture(scope="module")
def prior(tiny_prior_dir) -> ShapesPrior:
    return ShapesPrior.from_pretrained(tiny_prior_dir)


def _batch(prior, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, prior.resolution, prior.resolution, generator=g)
    cams = OrbitCameras.sample_training(n, g)
    cond = prior.encode_prompts([PROMPTS[i % len(PROMPTS)] for i in range(n)])
    t = torch.randint(20, 980, (n,), generator=g)
    noise = torch.randn(n, 3, prior.resolution, prior.resolution, generator=g)
    return images, cond, cams, t, noise


def test_the_gradient_is_the_prior_minus_the_estimator(prior):
    vsd = VariationalScoreDistillation(prior, guidance_scale=1.0, estimator_lr=1e-3)
    images, cond, cams, t, noise = _batch(prior)
    # the estimator starts as the prior: no gradient at guidance 1, where SDS has one
    x = images.clone().requires_grad_(True)
    out = vsd(x, cond, cams, t=t, noise=noise, generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    assert float(out.grad_norm) == 0 and x.grad.abs().max() == 0
    sds = ScoreDistillation(prior, guidance_scale=1.0)(images.clone().requires_grad_(True), cond, cams, t=t,
                                                       noise=noise)
    assert float(sds.grad_norm) > 0
    # after that call's update, d loss / d x0 = w(t) (eps_prior - eps_estimator) / B
    x = images.clone().requires_grad_(True)
    with torch.no_grad():
        x_t = prior.add_noise(prior.encode_images(images), noise, t)
        expected = vsd.weight(t).view(-1, 1, 1, 1) * (prior.predict_noise(x_t, t, cond, cams, 1.0)
                                                      - vsd.estimator.predict_noise(x_t, t, cond, cams, 1.0))
    out = vsd(x, cond, cams, t=t, noise=noise, generator=torch.Generator().manual_seed(2))
    out.loss.backward()
    assert expected.abs().max() > 0
    y = images.clone().requires_grad_(True)  # the same gradient through encode_images ([0, 1] -> [-1, 1])
    (prior.encode_images(y) * expected / len(images)).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rank, lr, ratio", [(4, 1e-2, 0.9), (0, 1e-3, 0.7)])  # LoRA adapters, the whole copy
def test_the_estimator_learns_the_renders_and_leaves_the_prior_alone(prior, rank, lr, ratio):
    torch.manual_seed(0)  # the adapters' initial values
    vsd = VariationalScoreDistillation(prior, guidance_scale=1.0, estimator_lr=lr, estimator_rank=rank,
                                       estimator_steps=4)
    before = {k: v.clone() for k, v in prior.unet.state_dict().items()}
    _, cond, cams, t, noise = _batch(prior, n=4, seed=3)
    images = torch.ones(4, 3, prior.resolution, prior.resolution)  # what the model "renders": a red square
    images[:, 1:, 8:24, 8:24] = 0.1
    x0 = prior.encode_images(images)
    with torch.no_grad():
        start = float(vsd.estimator_loss(x0, cond, cams, t, noise))
    for i in range(15):
        vsd(images.clone().requires_grad_(True), cond, cams, generator=torch.Generator().manual_seed(i))
    with torch.no_grad():
        end = float(vsd.estimator_loss(x0, cond, cams, t, noise))
    assert end < ratio * start, (start, end)
    assert all(torch.equal(v, before[k]) for k, v in prior.unet.state_dict().items())
    assert vsd.estimator.unet is not prior.unet
    assert all(m is getattr(prior, n) for n, m in vsd.estimator.named_children() if n != "unet")  # shared


def test_lora_starts_as_the_base_and_trains_only_its_adapters(prior):
    from att3d.guidance.vsd import LoRALinear, add_lora, denoiser_copy

    est = denoiser_copy(prior)
    images, cond, cams, t, noise = _batch(prior)
    x_t = prior.add_noise(prior.encode_images(images), noise, t)
    before = est.predict_noise(x_t, t, cond, cams, 1.0)
    params = add_lora(est.unet, 2)
    wrapped = [m for m in est.unet.modules() if isinstance(m, LoRALinear)]
    assert wrapped and len(params) == 2 * len(wrapped)
    assert {id(p) for p in est.unet.parameters() if p.requires_grad} == {id(p) for p in params}
    torch.testing.assert_close(est.predict_noise(x_t, t, cond, cams, 1.0), before)  # up = 0: the same function
    with torch.no_grad():
        wrapped[0].up.weight.fill_(0.1)
    assert not torch.allclose(est.predict_noise(x_t, t, cond, cams, 1.0), before)
    with pytest.raises(ValueError, match="no linear layer"):
        add_lora(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1)), 2)


def test_state_round_trip_and_replace(prior):
    a = VariationalScoreDistillation(prior, guidance_scale=1.0, estimator_lr=1e-3)
    images, cond, cams, _, _ = _batch(prior)
    a(images.clone().requires_grad_(True), cond, cams, generator=torch.Generator().manual_seed(0))
    b = VariationalScoreDistillation(prior, guidance_scale=1.0, estimator_lr=1e-3)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(v, b.estimator.unet.state_dict()[k]) for k, v in a.estimator.unet.state_dict().items())
    c = a.replace(guidance_scale=2.0)
    assert isinstance(c, VariationalScoreDistillation) and c.estimator_lr == 1e-3 and c.guidance_scale == 2.0
    assert ScoreDistillation(prior).state_dict() == {}
    with pytest.raises(ValueError, match="estimator_t_range"):
        VariationalScoreDistillation(prior, estimator_t_range=(0.5, 0.2))
    with pytest.raises(ValueError, match="estimator_lr"):
        VariationalScoreDistillation(prior, estimator_lr=0)


def test_config_switch(tiny_prior_dir):
    g = guidance_config("shapes")
    g["prior"]["path"] = str(tiny_prior_dir)
    assert type(build_guidance(g)) is ScoreDistillation  # the default method
    g["method"] = "vsd"
    g["vsd"] = {**g["vsd"], "estimator_lr": 3e-5, "estimator_t_range": [0.1, 0.9]}
    vsd = build_guidance(g)
    assert isinstance(vsd, VariationalScoreDistillation)
    assert vsd.estimator_lr == 3e-5 and vsd.estimator_t_range == (0.1, 0.9)
    with pytest.raises(Att3dError, match="guidance.method must be one of sds, vsd"):
        build_guidance({**g, "method": "magic"})


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_prior_dir):
    root = tmp_path_factory.mktemp("vsd")
    torch.manual_seed(0)
    AmortizedModel(tiny_config()).save_pretrained(root / "model")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root, tiny_prior_dir


def _argv(files, run, *extra: str, resume: bool = False) -> list[str]:
    root, prior = files
    return [f"init_from={root / 'model'}", f"{'resume' if resume else 'run_dir'}={run}", "prompts=file",
            f"prompts.train={root / 'prompts.txt'}", f"guidance.prior.path={prior}", "guidance.method=vsd",
            "guidance.vsd.estimator_lr=1e-3", "guidance.guidance_scale=1", "trainer.batch_size=2",
            "trainer.resolution=32", "trainer.device=cpu", "trainer.threads=1", "progress=false",
            "trainer.image_every=0", "trainer.log_every=1", *extra]


def test_training_with_vsd_checkpoints_the_estimator_and_resumes_exactly(files, tmp_path):
    run = tmp_path / "run"
    assert train_main(_argv(files, run, "trainer.max_steps=2", "trainer.checkpoint_every=2")) == 0
    assert (run / "checkpoints" / "step-0000002" / GUIDANCE_STATE_NAME).is_file()
    assert train_main(_argv(files, run, "trainer.max_steps=4", resume=True)) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["sds_grad_norm"] == 0 and rows[-1]["sds_grad_norm"] > 0  # the estimator moved off the prior
    assert all(r["vsd_estimator_loss"] > 0 for r in rows)
    straight = tmp_path / "straight"
    assert train_main(_argv(files, straight, "trainer.max_steps=4")) == 0
    a, b = att3d.load(run / "model").state_dict(), att3d.load(straight / "model").state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items())
