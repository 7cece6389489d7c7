"""Diffusion priors: tiny random-weight models saved in the diffusers layouts and loaded the way a user would."""

from __future__ import annotations

import json
import math

import pytest
import torch

from att3d.guidance.priors import (
    DeepFloydPrior,
    DiffusionPrior,
    PromptConditioning,
    ShapesPrior,
    StableDiffusionPrior,
    view_index,
)
from att3d.guidance.sds import ScoreDistillation
from att3d.registry import PRIORS
from att3d.render.cameras import OrbitCameras
from att3d.world.prior_training import PriorArchitecture, caption_embeddings

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "a", "red", "blue", "green", "cube", "sphere", "torus", ",", "front",
         "side", "back", "overhead", "view"]
TEXT_LEN = 12
TEXT_DIM = 32


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=TEXT_LEN)


@pytest.fixture(scope="module")
def shapes_folder(tiny_prior_dir):
    arch = PriorArchitecture.from_dict(json.loads((tiny_prior_dir / "prior_config.json").read_text())["arch"])
    return tiny_prior_dir, arch


@pytest.fixture(scope="module")
def shapes_prior(shapes_folder) -> ShapesPrior:
    return ShapesPrior.from_pretrained(shapes_folder[0])


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("tiny-sd")
    UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                         block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
                         attention_head_dim=8, norm_num_groups=8).save_pretrained(folder / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=8, sample_size=32).save_pretrained(folder / "vae")
    clip_cfg = CLIPTextConfig(vocab_size=len(WORDS), hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=TEXT_LEN, bos_token_id=2, eos_token_id=3,
                              pad_token_id=0)
    CLIPTextModel(clip_cfg).save_pretrained(folder / "text_encoder")
    _tokenizer().save_pretrained(folder / "tokenizer")
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False).save_pretrained(folder / "scheduler")
    return folder


@pytest.fixture(scope="module")
def sd_prior(sd_folder) -> StableDiffusionPrior:
    return StableDiffusionPrior.from_pretrained(sd_folder, device="cpu", dtype=torch.float32, resolution=32)


@pytest.fixture(scope="module")
def if_folder(tmp_path_factory):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(2)
    folder = tmp_path_factory.mktemp("tiny-if")
    UNet2DConditionModel(sample_size=16, in_channels=3, out_channels=6, layers_per_block=1,
                         block_out_channels=(16, 32), down_block_types=("DownBlock2D", "SimpleCrossAttnDownBlock2D"),
                         mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                         up_block_types=("SimpleCrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=24,
                         encoder_hid_dim=TEXT_DIM, encoder_hid_dim_type="text_proj", addition_embed_type="text",
                         addition_embed_type_num_heads=4, attention_head_dim=8, norm_num_groups=8,
                         resnet_time_scale_shift="scale_shift").save_pretrained(folder / "unet")
    T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=3,
                            decoder_start_token_id=0)).save_pretrained(folder / "text_encoder")
    _tokenizer().save_pretrained(folder / "tokenizer")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", thresholding=True,
                  sample_max_value=1.5).save_pretrained(folder / "scheduler")
    return folder


def _cams(n: int, seed: int = 0) -> OrbitCameras:
    return OrbitCameras.sample_training(n, torch.Generator().manual_seed(seed))


# ---- shapes prior -----------------------------------------------------------------------------


def test_shapes_prior_loads_saved_weights(shapes_folder, shapes_prior):
    from diffusers import UNet2DConditionModel

    folder, arch = shapes_folder
    assert shapes_prior.resolution == arch.resolution == 32
    assert shapes_prior.num_train_timesteps == arch.num_train_timesteps
    assert shapes_prior.alphas_cumprod.shape == (arch.num_train_timesteps,)
    assert shapes_prior.uses_cameras and shapes_prior.model_dtype == torch.float32
    saved = UNet2DConditionModel.from_pretrained(folder / "unet").state_dict()
    for k, v in shapes_prior.unet.state_dict().items():
        torch.testing.assert_close(v, saved[k].float(), rtol=0, atol=0)
    assert all(not p.requires_grad for p in shapes_prior.parameters())


def test_shapes_prior_conditioning_matches_training(shapes_folder, shapes_prior):
    """predict_noise conditions the UNet exactly as prior_training does (tokens, mask, camera, empty prompt)."""
    _, arch = shapes_folder
    prompts = ["a red cube", "a blue sphere", "a green torus"]
    emb = caption_embeddings(arch, prompts)  # the training path: prompts + "" as the last row
    cams = _cams(3)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([5, 400, 950])
    unet = shapes_prior.unet
    with torch.no_grad():
        e_c = unet(x, t, encoder_hidden_states=emb.tokens[:3], class_labels=cams.as_vector(),
                   encoder_attention_mask=emb.mask[:3].float()).sample
        e_u = unet(x, t, encoder_hidden_states=emb.tokens[[3, 3, 3]], class_labels=cams.as_vector(),
                   encoder_attention_mask=emb.mask[[3, 3, 3]].float()).sample
    cond = shapes_prior.encode_prompts(prompts)
    torch.testing.assert_close(shapes_prior.predict_noise(x, t, cond, cams, 1.0), e_c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shapes_prior.predict_noise(x, t, cond, cams, 3.0), e_u + 3.0 * (e_c - e_u),
                               rtol=1e-4, atol=1e-5)


def test_shapes_prior_camera_changes_prediction(shapes_prior):
    cond = shapes_prior.encode_prompts(["a red cube", "a red cube"])
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    cams = OrbitCameras.from_angles([0.0, math.pi], 0.3)
    eps = shapes_prior.predict_noise(x, torch.tensor([300, 300]), cond, cams, 3.0)
    assert eps.shape == (2, 3, 32, 32)
    assert (eps[0] - eps[1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="cameras"):
        shapes_prior.predict_noise(x, torch.tensor([300, 300]), cond, None, 3.0)


def test_shapes_prior_sample(shapes_prior):
    prompts = ["a red cube", "a blue sphere", "a green torus"]
    cams = _cams(3)
    img = shapes_prior.sample(prompts, cams, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                              batch_size=2)
    assert img.shape == (3, 3, 32, 32)
    assert img.min() >= 0 and img.max() <= 1 and torch.isfinite(img).all()
    again = shapes_prior.sample(prompts, cams, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(img, again)  # deterministic DDIM, independent of batch_size
    other = shapes_prior.sample(prompts, cams, num_inference_steps=4, generator=torch.Generator().manual_seed(1))
    assert (img - other).abs().max() > 1e-3


def test_shapes_prior_restart_sampling(shapes_prior):
    prompts = ["a red cube", "a blue sphere"]
    cams = _cams(2)
    kw = dict(num_inference_steps=10, eta=1.0)
    plain = shapes_prior.sample(prompts, cams, generator=torch.Generator().manual_seed(0), **kw)
    rs = shapes_prior.sample(prompts, cams, generator=torch.Generator().manual_seed(0), restarts=2, restart_t=0.3,
                             **kw)
    assert rs.shape == plain.shape and torch.isfinite(rs).all() and rs.min() >= 0 and rs.max() <= 1
    # the first trajectory is the same; the restarts change the result
    assert (rs - plain).abs().max() > 1e-3
    again = shapes_prior.sample(prompts, cams, generator=torch.Generator().manual_seed(0), restarts=2,
                                restart_t=0.3, batch_size=1, **kw)
    assert again.shape == rs.shape and torch.isfinite(again).all()
    with pytest.raises(ValueError, match="restart_t"):
        shapes_prior.sample(prompts, cams, restarts=1, restart_t=1.5, **kw)
    with pytest.raises(ValueError, match="below the first step"):
        shapes_prior.sample(prompts, cams, restarts=1, restart_t=0.01, num_inference_steps=4)
    with pytest.raises(ValueError, match="restarts"):
        shapes_prior.sample(prompts, cams, restarts=-1, **kw)


def test_shapes_prior_restart_rounds_are_counted(shapes_prior, monkeypatch):
    calls = []
    real = shapes_prior.predict_noise

    def counting(x, t, *a, **k):
        calls.append(int(t[0]))
        return real(x, t, *a, **k)

    monkeypatch.setattr(shapes_prior, "predict_noise", counting)
    shapes_prior.sample(["a red cube"], _cams(1), num_inference_steps=10, restarts=3, restart_t=0.35)
    # 10 steps of the trajectory, then 3 rounds over the grid steps at or below 350 (299, 199, 99 with the
    # "trailing" spacing of a 1000-step schedule)
    restart_grid = [t for t in calls[:10] if t <= 350]
    assert len(restart_grid) >= 1
    assert calls[10:] == restart_grid * 3


def _record_calls(prior, monkeypatch) -> list[tuple[int, float]]:
    calls = []
    real = prior.predict_noise

    def recording(x, t, cond, cams, scale, *a, **k):
        calls.append((int(t[0]), float(scale)))
        return real(x, t, cond, cams, scale, *a, **k)

    monkeypatch.setattr(prior, "predict_noise", recording)
    return calls


def test_shapes_prior_timestep_spacing(shapes_prior, monkeypatch):
    calls = _record_calls(shapes_prior, monkeypatch)
    shapes_prior.sample(["a red cube"], _cams(1), num_inference_steps=4)
    assert [t for t, _ in calls] == [999, 749, 499, 249]  # the scheduler config: trailing (no signal left at T-1)
    calls.clear()
    shapes_prior.sample(["a red cube"], _cams(1), num_inference_steps=4, timestep_spacing="leading")
    assert [t for t, _ in calls] == [750, 500, 250, 0]


def test_shapes_prior_guidance_interval(shapes_prior, monkeypatch):
    calls = _record_calls(shapes_prior, monkeypatch)
    cams = _cams(1)
    gen = torch.Generator().manual_seed(0)
    limited = shapes_prior.sample(["a red cube"], cams, guidance_scale=3.0, num_inference_steps=4,
                                  guidance_interval=(0.0, 0.5), generator=gen)
    # guidance only where t <= 0.5 T; the conditional prediction alone above
    assert calls == [(999, 1.0), (749, 1.0), (499, 3.0), (249, 3.0)]
    full = shapes_prior.sample(["a red cube"], cams, guidance_scale=3.0, num_inference_steps=4,
                               generator=torch.Generator().manual_seed(0))
    assert (limited - full).abs().max() > 1e-4
    for bad in [(0.5, 0.2), (0.0, 1.5), (0.1,)]:
        with pytest.raises(ValueError, match="guidance_interval"):
            shapes_prior.sample(["a red cube"], cams, num_inference_steps=2, guidance_interval=bad)


def test_registry_builds_shapes_prior(shapes_folder):
    assert {"shapes", "stable_diffusion", "deepfloyd_if"} <= set(PRIORS.names())
    prior = PRIORS.build("shapes", path=str(shapes_folder[0]), dtype="float32")
    assert isinstance(prior, ShapesPrior) and isinstance(prior, DiffusionPrior)


def test_shapes_prior_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="prior_config.json"):
        ShapesPrior.from_pretrained(tmp_path / "nowhere")


def test_prompt_cache(shapes_prior):
    calls = []
    embed = shapes_prior._embed_text

    def counting(prompts):
        calls.append(list(prompts))
        return embed(prompts)

    shapes_prior.clear_cache()
    shapes_prior._embed_text = counting
    try:
        a = shapes_prior.encode_prompts(["a red cube", "a blue sphere", "a red cube"])
        b = shapes_prior.encode_prompts(["a blue sphere"])
    finally:
        del shapes_prior._embed_text
    assert calls == [["a red cube", "a blue sphere"], [""]]
    torch.testing.assert_close(a.cond[0], a.cond[2])
    torch.testing.assert_close(b.cond[0], a.cond[1])
    assert a.prompts == ("a red cube", "a blue sphere", "a red cube")


# ---- prompt conditioning ----------------------------------------------------------------------


def _conditioning(b: int, seed: int, views: bool = False) -> PromptConditioning:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, 5, generator=g) > 0.5
    v = torch.randn(b, 3, 5, 4, generator=g) if views else None
    return PromptConditioning(torch.randn(b, 5, 4, generator=g), torch.randn(1, 5, 4, generator=g), mask,
                              torch.ones(1, 5, dtype=torch.bool), v, None, tuple(f"p{seed}-{i}" for i in range(b)))


def test_prompt_conditioning_index_cat_mix():
    a, b = _conditioning(3, 0), _conditioning(3, 1)
    assert a.uncond.shape == (3, 5, 4) and a.uncond_mask.shape == (3, 5)
    sub = a.index(torch.tensor([2, 0]))
    torch.testing.assert_close(sub.cond, a.cond[[2, 0]])
    assert sub.prompts == ("p0-2", "p0-0") and a[1].cond.shape == (1, 5, 4)
    both = PromptConditioning.cat([a, b])
    assert len(both) == 6 and both.prompts[3] == "p1-0"
    torch.testing.assert_close(a.mix(b, 1.0).cond, a.cond)
    torch.testing.assert_close(a.mix(b, 0.0).cond, b.cond)
    w = torch.tensor([0.25, 0.5, 1.0])
    m = a.mix(b, w)
    torch.testing.assert_close(m.cond, w[:, None, None] * a.cond + (1 - w[:, None, None]) * b.cond)
    assert torch.equal(m.cond_mask, a.cond_mask | (b.cond_mask & (w < 1)[:, None])) and m.prompts is None
    c = _conditioning(3, 2)
    dw = torch.distributions.Dirichlet(torch.ones(3)).sample((3,))
    k = PromptConditioning.combine([a, b, c], dw)
    expect = sum(dw[:, i, None, None] * x.cond for i, x in enumerate([a, b, c]))
    torch.testing.assert_close(k.cond, expect)
    raw = PromptConditioning.from_tensors(m.cond, a.uncond[:1])
    assert len(raw) == 3 and raw.cond_mask is None
    with pytest.raises(ValueError):
        PromptConditioning.combine([a, b], torch.ones(3, 3))


def test_view_index_and_view_conditioning():
    deg = math.radians
    cams = OrbitCameras.from_angles([0.0, deg(30), deg(90), deg(180), deg(-150), deg(300), 0.0],
                                    [0.2] * 6 + [deg(70)])
    assert view_index(cams, 3).tolist() == [0, 0, 1, 2, 2, 1, 0]
    assert view_index(cams, 4).tolist() == [0, 0, 1, 2, 2, 1, 3]
    a = _conditioning(3, 0, views=True)
    picked = a.for_cameras(OrbitCameras.from_angles([0.0, math.pi, math.pi / 2], 0.1))
    for i, v in enumerate([0, 2, 1]):
        torch.testing.assert_close(picked.cond[i], a.views[i, v])
    assert picked.views is None and a.for_cameras(None) is a


# ---- Stable Diffusion and DeepFloyd IF ------------------------------------------------------------


def test_stable_diffusion_prior_loads_and_distills(sd_prior):
    p = sd_prior
    assert p.resolution == 32 and p.latent_resolution == 16 and p.latent_channels == 4
    assert not p.uses_cameras and p.max_length == TEXT_LEN
    assert abs(float(p.alphas_cumprod[-1]) - 0.0047) < 1e-3  # scaled_linear schedule of SD
    cond = p.encode_prompts(["a red cube", "a blue sphere"])
    assert cond.cond.shape == (2, TEXT_LEN, TEXT_DIM) and cond.views.shape == (2, 4, TEXT_LEN, TEXT_DIM)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    x0 = p.encode_images(images)
    assert x0.shape == (2, 4, 16, 16) and x0.requires_grad
    cams = _cams(2)
    out = ScoreDistillation(p, guidance_scale=7.5)(images, cond, cams, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert images.grad is not None and images.grad.shape == images.shape
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert p.decode(x0.detach()).shape == (2, 3, 32, 32)


def test_stable_diffusion_view_prompts(sd_prior):
    cond = sd_prior.encode_prompts(["a red cube", "a red cube"])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    t = torch.tensor([500, 500])
    front_back = sd_prior.predict_noise(x, t, cond, OrbitCameras.from_angles([0.0, math.pi], 0.1), 7.5)
    assert (front_back[0] - front_back[1]).abs().max() > 1e-5
    no_cams = sd_prior.predict_noise(x, t, cond, None, 7.5)
    torch.testing.assert_close(no_cams[0], no_cams[1])
    with torch.no_grad():
        direct = sd_prior.unet(x, t, encoder_hidden_states=cond.views[:, 2]).sample
    back = sd_prior.predict_noise(x, t, cond, OrbitCameras.from_angles([math.pi, math.pi], 0.1), 1.0)
    torch.testing.assert_close(back, direct, rtol=1e-4, atol=1e-5)


def test_stable_diffusion_sample_and_cfg(sd_prior):
    cond = sd_prior.encode_prompts(["a blue sphere"])
    img = sd_prior.sample(cond, None, guidance_scale=7.5, num_inference_steps=3,
                          generator=torch.Generator().manual_seed(0))
    assert img.shape == (1, 3, 32, 32) and img.min() >= 0 and img.max() <= 1
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([700])
    e1 = sd_prior.predict_noise(x, t, cond, None, 1.0)
    e75 = sd_prior.predict_noise(x, t, cond, None, 7.5)
    assert (e1 - e75).abs().max() > 1e-5


def test_v_prediction_is_converted_to_epsilon(sd_folder, sd_prior):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_pretrained(sd_folder / "scheduler", prediction_type="v_prediction")
    p = StableDiffusionPrior(sd_prior.unet, sd_prior.vae, sd_prior.text_encoder, sd_prior.tokenizer, sched,
                             resolution=32, view_suffixes=())
    cond = p.encode_prompts(["a red cube"])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([600])
    with torch.no_grad():
        v = p.unet(x, t, encoder_hidden_states=cond.cond).sample
    a = p.alphas_cumprod[600]
    torch.testing.assert_close(p.predict_noise(x, t, cond, None, 1.0), a.sqrt() * v + (1 - a).sqrt() * x,
                               rtol=1e-4, atol=1e-5)


def test_deepfloyd_prior_loads_and_distills(if_folder):
    p = PRIORS.build("deepfloyd_if", path=str(if_folder), device="cpu", dtype="float32")
    assert isinstance(p, DeepFloydPrior)
    assert p.resolution == 16 and p.latent_channels == 3 and not p.uses_cameras
    cond = p.encode_prompts(["A Red Cube", "a blue sphere"])
    assert cond.cond.shape == (2, 77, TEXT_DIM)
    torch.testing.assert_close(cond.cond[0], p.encode_prompts(["a red cube"]).cond[0])  # lower-cased as in IF
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 900])
    with torch.no_grad():
        raw = p.unet(x, t, encoder_hidden_states=cond.cond).sample
    assert raw.shape == (2, 6, 16, 16)
    torch.testing.assert_close(p.predict_noise(x, t, cond, None, 1.0), raw[:, :3], rtol=1e-4, atol=1e-5)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = ScoreDistillation(p, guidance_scale=20.0)(images, cond, _cams(2), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    img = p.sample(["a red cube"], None, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert img.shape == (1, 3, 16, 16) and img.min() >= 0 and img.max() <= 1


class OraclePrior(DiffusionPrior):
    """The exact noise predictor of a data distribution that is one image per prompt."""

    def __init__(self, targets: dict[str, torch.Tensor]):
        from diffusers import DDPMScheduler

        res = next(iter(targets.values())).shape[-1]
        super().__init__(DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False), resolution=res)
        self.names = list(targets)
        self.targets = torch.stack(list(targets.values()))  # (K, 3, res, res) in [-1, 1]

    def _embed_text(self, prompts):
        return torch.tensor([[[float(self.names.index(p))]] if p in self.names else [[-1.0]] for p in prompts]), None

    def _denoise(self, x_t, t, tokens, mask, cameras):
        idx = tokens[:, 0, 0].long().clamp(min=0)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * self.targets[idx]) / (1 - a).sqrt()


@pytest.mark.parametrize("clip", [True, False])
def test_ddim_sampling_recovers_the_data_with_an_exact_prior(clip):
    g = torch.Generator().manual_seed(0)
    targets = {"a red cube": torch.rand(3, 8, 8, generator=g) * 2 - 1,
               "a blue sphere": torch.rand(3, 8, 8, generator=g) * 2 - 1}
    prior = OraclePrior(targets)
    img = prior.sample(["a blue sphere", "a red cube", "a blue sphere"], None, guidance_scale=1.0,
                       num_inference_steps=10, generator=g, batch_size=2, clip_denoised=clip)
    expect = (torch.stack([targets["a blue sphere"], targets["a red cube"], targets["a blue sphere"]]) + 1) / 2
    torch.testing.assert_close(img, expect, rtol=0, atol=1e-4)


def test_loading_a_prior_logs_no_accelerate_warning(shapes_folder, sd_folder):
    """Without accelerate, diffusers warns on every low-memory load; the priors ask for it only where it exists."""
    import logging

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("diffusers")  # the library's root logger (it does not propagate)
    logger.addHandler(handler)
    try:
        ShapesPrior.from_pretrained(shapes_folder[0])
        StableDiffusionPrior.from_pretrained(sd_folder, device="cpu")
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "accelerate" in r], records
