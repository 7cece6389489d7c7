"""Score distillation: gradient routing, timestep sampling and annealing, weighting, CFG, NaN guard, clamping."""

from __future__ import annotations

import pytest
import torch

from att3d.guidance import PromptConditioning, ScoreDistillation, ShapesPrior
from att3d.guidance.priors import DiffusionPrior
from att3d.render.cameras import OrbitCameras


class ToyPrior(DiffusionPrior):
    """A pixel prior with an analytic denoiser ``eps = 0.5 x_t + mean(tokens)``; items in ``nan_items`` give NaN."""

    def __init__(self, resolution: int = 16, nan_items: tuple[int, ...] = ()):
        from diffusers import DDPMScheduler

        super().__init__(DDPMScheduler(num_train_timesteps=1000), resolution=resolution)
        self.nan_items = list(nan_items)
        self.calls = 0

    def _embed_text(self, prompts):
        codes = torch.tensor([[float(sum(map(ord, p)) % 97) / 97.0] for p in prompts])
        return codes[:, None, :].expand(-1, 3, 4).clone(), None

    def _denoise(self, x_t, t, tokens, mask, cameras):
        self.calls += 1
        eps = 0.5 * x_t + tokens.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        if self.nan_items:
            eps = eps.clone()
            b = x_t.shape[0] // 2 if x_t.shape[0] > 1 else 1
            for i in self.nan_items:
                eps[i] = float("nan")
                if x_t.shape[0] == 2 * b:
                    eps[b + i] = float("nan")
        return eps


@pytest.fixture(scope="module")
def shapes_prior(tiny_prior_dir) -> ShapesPrior:
    return ShapesPrior.from_pretrained(tiny_prior_dir)


def _images(b: int, res: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, res, res, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def test_sds_gradient_reaches_images(shapes_prior):
    b = 3
    images = _images(b, 64)  # rendered larger than the prior: resized inside encode_images
    cams = OrbitCameras.sample_training(b, torch.Generator().manual_seed(0))
    cond = shapes_prior.encode_prompts(["a red cube", "a blue sphere", "a green torus"])
    sds = ScoreDistillation(shapes_prior, guidance_scale=3.0)
    out = sds(images, cond, cams, step=0, generator=torch.Generator().manual_seed(0))
    assert out.loss.dim() == 0 and torch.isfinite(out.loss) and out.num_nonfinite == 0
    assert out.t.shape == (b,) and out.t.dtype == torch.long
    assert out.grad_norm > 0
    out.loss.backward()
    assert images.grad.shape == images.shape and torch.isfinite(images.grad).all()
    assert (images.grad.flatten(1).abs().sum(1) > 0).all()
    with pytest.raises(ValueError, match="cameras"):
        sds(_images(b, 32), cond, None)


def test_reparametrised_loss_gives_exact_sds_gradient():
    """d loss / d images equals 2 * w(t) (eps_hat - eps) / B (the 2 from images -> [-1, 1])."""
    prior = ToyPrior(resolution=16)
    b, s = 4, 5.0
    cond = prior.encode_prompts(["a red cube", "a blue sphere", "a red cube", "a gray cone"])
    sds = ScoreDistillation(prior, guidance_scale=s, weighting="sds")
    images = _images(b, 16)
    out = sds(images, cond, None, generator=torch.Generator().manual_seed(7))
    out.loss.backward()
    # replay the same random draws
    g = torch.Generator().manual_seed(7)
    t = sds.sample_t(b, 0, g)
    torch.testing.assert_close(t, out.t, rtol=0, atol=0)
    x0 = images.detach() * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    e_c = 0.5 * x_t + cond.cond.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    e_u = 0.5 * x_t + cond.uncond.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    grad = (1 - a) * (e_u + s * (e_c - e_u) - noise)
    torch.testing.assert_close(images.grad, 2 * grad / b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, 0.5 * grad.pow(2).sum() / b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.grad_norm, grad.flatten(1).norm(dim=1).mean(), rtol=1e-4, atol=1e-6)


def test_cfg_scale_changes_gradient(shapes_prior):
    cams = OrbitCameras.sample_training(2, torch.Generator().manual_seed(1))
    cond = shapes_prior.encode_prompts(["a red cube", "a blue sphere"])
    grads = []
    for scale in (1.0, 7.5):
        images = _images(2, 32, seed=3)
        ScoreDistillation(shapes_prior, guidance_scale=scale)(
            images, cond, cams, generator=torch.Generator().manual_seed(0)).loss.backward()
        grads.append(images.grad)
    assert (grads[0] - grads[1]).abs().max() > 1e-6


def test_low_noise_guidance_scale_per_item():
    """With guidance_scale_low, items at t <= low_t T are guided with it, the others with guidance_scale."""
    prior = ToyPrior(resolution=16)
    b = 6
    cond = prior.encode_prompts(["a red cube", "a blue sphere", "a gray cone", "a", "b", "c"])
    sds = ScoreDistillation(prior, guidance_scale=7.0, guidance_scale_low=2.0, low_t=0.5)
    t = torch.tensor([10, 499, 500, 501, 800, 990])
    assert sds.scales(t).tolist() == [2.0, 2.0, 2.0, 7.0, 7.0, 7.0]
    images = _images(b, 16)
    out = sds(images, cond, None, t=t, noise=torch.zeros(b, 3, 16, 16))
    out.loss.backward()
    x0 = images.detach() * 2 - 1
    a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0
    e_c = 0.5 * x_t + cond.cond.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    e_u = 0.5 * x_t + cond.uncond.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    s = torch.tensor([2.0, 2.0, 2.0, 7.0, 7.0, 7.0]).view(-1, 1, 1, 1)
    torch.testing.assert_close(images.grad, 2 * (1 - a) * (e_u + s * (e_c - e_u)) / b, rtol=1e-5, atol=1e-6)
    # a per-item tensor of scales equals the scalar path where all scales agree
    x = torch.randn(3, 3, 16, 16)
    c3 = cond.index(torch.arange(3))
    torch.testing.assert_close(prior.predict_noise(x, t[:3], c3, None, torch.full((3,), 4.0)),
                               prior.predict_noise(x, t[:3], c3, None, 4.0))
    with pytest.raises(ValueError, match="guidance_scale"):
        prior.predict_noise(x, t[:3], c3, None, torch.ones(2))
    for bad in ({"guidance_scale_low": 0.0}, {"low_t": 1.5}):
        with pytest.raises(ValueError):
            ScoreDistillation(prior, **bad)
    assert ScoreDistillation(prior, guidance_scale=3.0).scales(t) == 3.0  # off by default: one scalar


class ViewToyPrior(ToyPrior):
    """ToyPrior plus ``k cos(4 phi)`` from the camera's azimuth (a view-conditioned prior whose objects have the
    4-fold turn of a pyramid), or nothing when ``k`` is 0 (every view looks the same)."""

    uses_cameras = True

    def __init__(self, k: float):
        super().__init__(resolution=16)
        self.k = k

    def _denoise(self, x_t, t, tokens, mask, cameras):
        eps = super()._denoise(x_t, t, tokens, mask, cameras)
        phi = cameras.phi.repeat(x_t.shape[0] // len(cameras))  # CFG stacks the batch
        return eps + self.k * torch.cos(4 * phi).view(-1, 1, 1, 1)


def test_view_guidance_adds_the_contrast_with_the_turned_views():
    """eps_hat += w (eps_c(view) - mean eps_c(view turned by +-d)); nothing when no view differs."""
    b, w, d = 3, 2.0, 30.0
    cams = OrbitCameras.from_angles([0.1, 1.0, 2.5], 0.3)
    noise, t = torch.zeros(b, 3, 16, 16), torch.tensor([100, 400, 900])
    for k in (0.0, 0.7):
        prior = ViewToyPrior(k)
        cond = prior.encode_prompts(["a red cube", "a blue sphere", "a gray cone"])
        grads = []
        for vg in (0.0, w):
            images = _images(b, 16)
            sds = ScoreDistillation(prior, guidance_scale=5.0, view_guidance=vg, view_guidance_azimuth=d)
            sds(images, cond, cams, t=t, noise=noise).loss.backward()
            grads.append(images.grad)
        a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
        r = torch.deg2rad(torch.tensor(d))
        contrast = k * (torch.cos(4 * cams.phi) - 0.5 * (torch.cos(4 * (cams.phi + r)) + torch.cos(4 * (cams.phi - r))))
        expected = (2 * (1 - a) * w * contrast.view(-1, 1, 1, 1) / b).expand_as(grads[0])
        torch.testing.assert_close(grads[1] - grads[0], expected, rtol=1e-4, atol=1e-6)
        assert (grads[1] - grads[0]).abs().max() > 0 if k else torch.equal(grads[1], grads[0])
    for bad in ({"view_guidance": -1.0}, {"view_guidance_azimuth": 0.0}, {"view_guidance_azimuth": 200.0}):
        with pytest.raises(ValueError, match="view_guidance"):
            ScoreDistillation(ViewToyPrior(0.0), **bad)


def test_replace_makes_a_validated_copy_on_the_same_prior():
    prior = ToyPrior()
    sds = ScoreDistillation(prior, guidance_scale=7.0, t_range=(0.1, 0.9), weighting="uniform")
    other = sds.replace(guidance_scale_low=2.0, per_item_t=False)
    assert other.prior is prior and other is not sds
    assert (other.guidance_scale, other.t_range, other.weighting) == (7.0, (0.1, 0.9), "uniform")
    assert other.guidance_scale_low == 2.0 and not other.per_item_t
    assert sds.guidance_scale_low is None and sds.per_item_t  # the original is untouched
    with pytest.raises(ValueError):
        sds.replace(t_range=(0.9, 0.1))
    with pytest.raises(TypeError):
        sds.replace(prior=prior)


def test_record_names_the_prior_and_every_resolved_argument():
    sds = ScoreDistillation(ToyPrior(), guidance_scale=7.0, t_range=(0.1, 0.9))
    record = sds.record()
    assert record["prior"] == {"class": "ToyPrior"} and record["method"] == "sds"
    assert record["guidance_scale"] == 7.0 and record["t_range"] == [0.1, 0.9]  # a list: JSON-ready
    assert record["weighting"] == "sds" and record["low_t"] == 0.5  # defaults are recorded too
    assert set(record) == {"prior", "method", *sds.init_args()}
    sds.prior_source = {"name": "shapes", "path": "assets/shapes-prior"}
    other = sds.replace(guidance_scale=2.0)
    assert other.record()["prior"] == {"name": "shapes", "path": "assets/shapes-prior"}  # replace keeps it
    assert other.record()["guidance_scale"] == 2.0


def test_cfg_uses_one_batched_forward():
    prior = ToyPrior()
    cond = prior.encode_prompts(["a", "b", "c"])
    prior.predict_noise(torch.zeros(3, 3, 16, 16), torch.tensor([1, 2, 3]), cond, None, 7.5)
    assert prior.calls == 1


def test_timesteps_per_item_and_annealing():
    prior = ToyPrior()
    sds = ScoreDistillation(prior, t_range=(0.02, 0.98), t_anneal=(0.98, 0.5, 100))
    assert sds.t_bounds(0) == (20, 980)
    assert sds.t_bounds(50) == (20, 740)
    assert sds.t_bounds(100) == sds.t_bounds(10_000) == (20, 500)
    g = torch.Generator().manual_seed(0)
    early = sds.sample_t(256, 0, g)
    late = sds.sample_t(256, 1000, g)
    assert early.min() >= 20 and early.max() <= 980 and early.max() > 500
    assert late.min() >= 20 and late.max() <= 500
    assert len(early.unique()) > 100  # one timestep per item
    shared = ScoreDistillation(prior, per_item_t=False).sample_t(16, 0, g)
    assert len(shared.unique()) == 1
    narrow = ScoreDistillation(prior, t_range=(0.3, 0.4), t_anneal=(0.4, 0.1, 10))
    assert narrow.t_bounds(10) == (300, 300)  # the max never drops below the min
    with pytest.raises(ValueError):
        ScoreDistillation(prior, t_range=(0.9, 0.1))


def test_weightings():
    prior = ToyPrior()
    t = torch.tensor([0, 500, 999])
    a = prior.alphas_cumprod[t]
    torch.testing.assert_close(ScoreDistillation(prior, weighting="sds").weight(t), 1 - a)
    torch.testing.assert_close(ScoreDistillation(prior, weighting="uniform").weight(t), torch.ones(3))
    torch.testing.assert_close(ScoreDistillation(prior, weighting="snr").weight(t), a.sqrt() * (1 - a))
    with pytest.raises(ValueError, match="weighting"):
        ScoreDistillation(prior, weighting="nope")


def test_nan_guard_zeroes_bad_items():
    prior = ToyPrior(nan_items=(1,))
    cond = prior.encode_prompts(["a", "b", "c"])
    images = _images(3, 16)
    out = ScoreDistillation(prior)(images, cond, None, generator=torch.Generator().manual_seed(0))
    assert out.num_nonfinite == 1 and torch.isfinite(out.loss) and torch.isfinite(out.grad_norm)
    out.loss.backward()
    assert torch.isfinite(images.grad).all()
    assert images.grad[1].abs().max() == 0
    assert images.grad[0].abs().max() > 0 and images.grad[2].abs().max() > 0


def test_grad_clip_bounds_each_element():
    prior = ToyPrior()
    cond = prior.encode_prompts(["a", "b"])
    clip = 0.01
    images = _images(2, 16)
    ScoreDistillation(prior, weighting="uniform", grad_clip=clip)(
        images, cond, None, generator=torch.Generator().manual_seed(0)).loss.backward()
    # d loss / d images = 2 * clamp(grad) / B
    bound = torch.tensor(2 * clip / 2)
    assert images.grad.abs().max() <= bound * (1 + 1e-6)
    assert torch.isclose(images.grad.abs().max(), bound)  # the clamp is active


def test_mixed_conditioning(shapes_prior):
    cams = OrbitCameras.sample_training(2, torch.Generator().manual_seed(2))
    a = shapes_prior.encode_prompts(["a red cube", "a blue sphere"])
    b = shapes_prior.encode_prompts(["a green torus", "a red cube"])
    sds = ScoreDistillation(shapes_prior, guidance_scale=5.0)

    def grad_of(cond: PromptConditioning) -> torch.Tensor:
        images = _images(2, 32, seed=4)
        sds(images, cond, cams, generator=torch.Generator().manual_seed(0)).loss.backward()
        return images.grad

    torch.testing.assert_close(grad_of(a.mix(b, 1.0)), grad_of(a))
    mixed = grad_of(a.mix(b, torch.tensor([0.3, 0.6])))
    assert torch.isfinite(mixed).all() and (mixed - grad_of(a)).abs().max() > 1e-6
