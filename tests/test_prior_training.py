"""Training the shapes-world prior: a few steps on a tiny config reduce the loss; resume is exact."""

from __future__ import annotations

import json
import math

import pytest
import torch

from att3d.utils.checkpoint import load_tensors
from att3d.world.prior_training import PriorArchitecture, PriorTrainingConfig, train_prior


def tiny(out, steps, prediction_type="epsilon", **kw) -> PriorTrainingConfig:
    arch = PriorArchitecture(resolution=16, block_out_channels=(16, 32), attention_head_dim=8, norm_num_groups=8,
                             text_max_length=8, prediction_type=prediction_type)
    return PriorTrainingConfig(out_dir=str(out), arch=arch, max_steps=steps, batch_size=8, lr=2e-3, warmup_steps=5,
                               checkpoint_every=10, log_every=5, seed=0, **kw)


def test_a_few_steps_reduce_the_loss(tmp_path):
    folder = train_prior(tiny(tmp_path, 60), progress=False)
    history = json.loads((folder / "prior_config.json").read_text())["training"]["history"]
    first, last = history[0]["loss"], min(h["loss"] for h in history[-3:])
    assert last < 0.6 * first, history
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_resume_continues_exactly(tmp_path):
    train_prior(tiny(tmp_path / "a", 20), progress=False)
    train_prior(tiny(tmp_path / "b", 20, stop_at=10), progress=False)  # interrupted at step 10
    train_prior(tiny(tmp_path / "b", 20), progress=False)  # resumes from step 10
    a = load_tensors(tmp_path / "a" / "checkpoint" / "unet.safetensors")
    b = load_tensors(tmp_path / "b" / "checkpoint" / "unet.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("prediction_type", ["v_prediction"])
def test_v_prediction_trains_and_loads(tmp_path, prediction_type):
    from att3d.guidance.priors.shapes import ShapesPrior
    from att3d.render.cameras import OrbitCameras

    folder = train_prior(tiny(tmp_path, 5, prediction_type), progress=False)
    prior = ShapesPrior.from_pretrained(folder)
    assert prior.scheduler.config.prediction_type == "v_prediction"
    x = prior.sample(["a red cube"], OrbitCameras.evaluation(1), num_inference_steps=2,
                     generator=torch.Generator().manual_seed(0))
    assert x.shape == (1, 3, 16, 16) and torch.isfinite(x).all()


def test_init_from_fine_tunes_an_epsilon_prior_into_v_prediction(tmp_path):
    source = train_prior(tiny(tmp_path / "eps", 5), progress=False)
    # zero steps: the exported weights are exactly the source's (fp16 round trip both ways)
    same = train_prior(tiny(tmp_path / "v0", 0, "v_prediction", init_from=str(source)), progress=False)
    a = load_tensors(source / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_tensors(same / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((same / "prior_config.json").read_text())
    assert record["arch"]["prediction_type"] == "v_prediction"
    assert record["training"]["init_from"]["prediction_type"] == "epsilon"
    assert record["training"]["init_from"]["training"]["steps"] == 5
    # a few steps move away from the source; a fresh start (no init_from) differs from both
    tuned = train_prior(tiny(tmp_path / "v", 5, "v_prediction", init_from=str(source)), progress=False)
    c = load_tensors(tuned / "unet" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # a checkpoint exported mid-way keeps the record of where the fine-tune started
    from att3d.world.prior_training import export_checkpoint

    exported = export_checkpoint(tmp_path / "v", tmp_path / "v-export")
    assert json.loads((exported / "prior_config.json").read_text())["training"]["init_from"]["path"] == str(source)


def test_init_from_rejects_a_different_network(tmp_path):
    source = train_prior(tiny(tmp_path / "eps", 2), progress=False)
    wider = tiny(tmp_path / "w", 2, init_from=str(source))
    wider.arch.block_out_channels = (16, 48)
    with pytest.raises(ValueError, match="block_out_channels"):
        train_prior(wider, progress=False)
    with pytest.raises(ValueError, match="not a prior folder"):
        train_prior(tiny(tmp_path / "x", 2, init_from=str(tmp_path)), progress=False)


def test_camera_features_append_exact_azimuth_harmonics():
    from att3d.render.cameras import OrbitCameras, camera_feature_dim, camera_features

    cams = OrbitCameras.sample_training(16, torch.Generator().manual_seed(0))
    vec = cams.as_vector().double()
    assert torch.equal(camera_features(vec, 1), vec)
    f = camera_features(vec, 4)
    assert f.shape == (16, camera_feature_dim(4)) == (16, 10) and torch.equal(f[:, :4], vec)
    phi = cams.phi.double()
    for k, col in ((2, 4), (3, 6), (4, 8)):
        assert torch.allclose(f[:, col], torch.sin(k * phi), atol=1e-12)
        assert torch.allclose(f[:, col + 1], torch.cos(k * phi), atol=1e-12)
    # a cube's views 90 degrees apart look the same: their 4th harmonics agree, their first ones do not
    quarter = OrbitCameras(phi=cams.phi + math.pi / 2, theta=cams.theta, radius=cams.radius)
    g = camera_features(quarter.as_vector().double(), 4)
    assert torch.allclose(g[:, 8:], f[:, 8:], atol=1e-9) and not torch.allclose(g[:, :2], f[:, :2], atol=1e-3)
    with pytest.raises(ValueError, match="harmonics"):
        camera_features(vec, 0)


def test_init_from_adds_camera_harmonics_without_changing_the_network(tmp_path):
    from att3d.guidance.priors.shapes import ShapesPrior
    from att3d.render.cameras import OrbitCameras

    source = train_prior(tiny(tmp_path / "plain", 3), progress=False)
    cfg = tiny(tmp_path / "harm", 0, init_from=str(source))
    cfg.arch.camera_harmonics = 4
    harm = train_prior(cfg, progress=False)  # zero steps: the source's network with zero weights on the harmonics
    a, b = ShapesPrior.from_pretrained(source), ShapesPrior.from_pretrained(harm)
    assert b.unet.class_embedding.linear_1.in_features == 10 and b.arch["camera_harmonics"] == 4
    cams = OrbitCameras.sample_training(4, torch.Generator().manual_seed(1))
    x, t = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2)), torch.full((4,), 300)
    tokens, mask = a._embed_text(["a red cube"] * 4)
    assert torch.allclose(a._denoise(x, t, tokens, mask, cams), b._denoise(x, t, tokens, mask, cams), atol=1e-5)
    # trained, the harmonics' weights move; going back to fewer harmonics than the folder's is refused
    cfg = tiny(tmp_path / "harm5", 5, init_from=str(source))
    cfg.arch.camera_harmonics = 4
    tuned = load_tensors(train_prior(cfg, progress=False) / "unet" / "diffusion_pytorch_model.safetensors")
    assert tuned["class_embedding.linear_1.weight"][:, 4:].abs().sum() > 0
    with pytest.raises(ValueError, match="camera_harmonics"):
        train_prior(tiny(tmp_path / "back", 1, init_from=str(harm)), progress=False)


def test_camera_ray_map_against_a_hand_computed_camera():
    from att3d.render.cameras import OrbitCameras, camera_map, camera_map_channels

    # azimuth 0, elevation 0: the eye at (0, 0, 2.2) looking down -z; R = 2 puts the pixel centres at
    # (+-1/2, +-1/2) of the image half-width tan(20 deg), so every ray is (+-h, +-h, -1) normalised
    cams = OrbitCameras.from_angles([0.0], [0.0])
    m = camera_map(cams, 2, "ray").double()
    assert m.shape == (1, camera_map_channels("ray"), 2, 2) == (1, 6, 2, 2)
    h = math.tan(math.radians(20.0)) / 2
    n = math.sqrt(2 * h * h + 1)
    for row, y in ((0, h), (1, -h)):  # row 0 is the top: +y
        for col, x in ((0, -h), (1, h)):
            d = torch.tensor([x, y, -1.0], dtype=torch.float64) / n
            o = torch.tensor([0.0, 0.0, 2.2], dtype=torch.float64)
            p = o - (o @ d) * d  # the ray's point nearest the origin
            assert torch.allclose(m[0, 3:, row, col], d, atol=1e-6)
            assert torch.allclose(m[0, :3, row, col], p, atol=1e-6)
            assert abs(float(m[0, :3, row, col] @ d)) < 1e-6  # p is perpendicular to the ray
    # turning the camera by 90 degrees about +y turns the map with it: (x, y, z) -> (z, y, -x)
    q = camera_map(OrbitCameras.from_angles([math.pi / 2], [0.0]), 2, "ray").double()
    for a, b in ((0, 3), (3, 6)):
        turned = torch.stack([m[0, a + 2], m[0, a + 1], -m[0, a]])
        assert torch.allclose(q[0, a:b], turned, atol=1e-6)
    assert camera_map(cams, 2, "none") is None and camera_map_channels("none") == 0
    with pytest.raises(ValueError, match="camera_map"):
        camera_map_channels("plucker")


def test_init_from_adds_a_camera_map_without_changing_the_network(tmp_path):
    from att3d.guidance.priors.shapes import ShapesPrior
    from att3d.render.cameras import OrbitCameras

    source = train_prior(tiny(tmp_path / "plain", 3), progress=False)
    cfg = tiny(tmp_path / "ray", 0, init_from=str(source))
    cfg.arch.camera_map = "ray"
    ray = train_prior(cfg, progress=False)  # zero steps: the map's input channels start at zero
    a, b = ShapesPrior.from_pretrained(source), ShapesPrior.from_pretrained(ray)
    assert b.unet.conv_in.in_channels == 9 and b.arch["camera_map"] == "ray"
    cams = OrbitCameras.sample_training(4, torch.Generator().manual_seed(1))
    x, t = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2)), torch.full((4,), 300)
    tokens, mask = a._embed_text(["a red cube"] * 4)
    assert torch.allclose(a._denoise(x, t, tokens, mask, cams), b._denoise(x, t, tokens, mask, cams), atol=1e-5)
    # trained, the map's weights move and the prior reads the camera through them: turning the camera changes
    # the prediction more than with the 4-vector alone at the same weights
    cfg = tiny(tmp_path / "ray5", 5, init_from=str(source))
    cfg.arch.camera_map = "ray"
    tuned_folder = train_prior(cfg, progress=False)
    tuned = load_tensors(tuned_folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert tuned["conv_in.weight"][:, 3:].abs().sum() > 0
    c = ShapesPrior.from_pretrained(tuned_folder)
    assert c.sample(["a red cube"] * 2, OrbitCameras.evaluation(2), num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0)).shape == (2, 3, 16, 16)
    # a prior with a map cannot be fine-tuned back into one without it
    with pytest.raises(ValueError, match="camera_map"):
        train_prior(tiny(tmp_path / "back", 1, init_from=str(ray)), progress=False)
    bad = tiny(tmp_path / "bad", 1)
    bad.arch.camera_map = "depth"
    with pytest.raises(ValueError, match="camera_map"):
        train_prior(bad, progress=False)


def test_train_prior_script_reports_a_bad_init_from_in_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "train_prior.py"
    proc = subprocess.run([sys.executable, str(script), f"out_dir={tmp_path / 'run'}", "max_steps=1",
                           f"init_from={tmp_path}", "arch.block_out_channels=[16,32]", "arch.norm_num_groups=8",
                           "arch.attention_head_dim=8", "arch.resolution=16"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"train_prior: error: init_from={tmp_path}: no prior_config.json (not a prior folder)"]
    assert "Traceback" not in proc.stderr


def test_caption_table_holds_every_wording_once_with_the_caption_first():
    from att3d.world.prior_training import caption_table
    from att3d.world.shapes import all_objects
    from att3d.world.wordings import all_wordings, wordings_by_object

    objects = all_objects()
    texts, rows = caption_table(objects, "canonical")
    assert texts == [o.caption for o in objects] and rows == [[i] for i in range(64)]
    texts, rows = caption_table(objects, "wordings")
    owner = wordings_by_object()
    assert len(texts) == len(set(texts))
    # every wording once; the captions that are not wordings ("a orange cube": the article rule) added
    assert set(all_wordings()) <= set(texts) and len(texts) == 5760 + sum(o.caption not in owner for o in objects)
    for i, obj in enumerate(objects):
        assert texts[rows[i][0]] == obj.caption
        assert all(owner[texts[r]] == obj for r in rows[i][1:])
    assert sorted(r for rs in rows for r in rs) == list(range(len(texts)))
    with pytest.raises(ValueError, match="captions must be one of"):
        caption_table(objects, "paraphrases")


def test_sample_rows_mixes_captions_and_wordings():
    from att3d.world.prior_training import caption_table, sample_rows
    from att3d.world.shapes import all_objects

    _, rows = caption_table(all_objects(), "wordings")
    idx = torch.arange(64).repeat(20)
    always = sample_rows(idx, rows, 1.0, torch.Generator().manual_seed(0))
    assert always.tolist() == [rows[i][0] for i in idx.tolist()]
    some = sample_rows(idx, rows, 0.25, torch.Generator().manual_seed(0))
    assert all(r in rows[i] for r, i in zip(some.tolist(), idx.tolist()))
    share = sum(r == rows[i][0] for r, i in zip(some.tolist(), idx.tolist())) / len(idx)
    assert 0.15 < share < 0.4  # 0.25 + 0.75 / ~90 expected
    assert len(set(some.tolist())) > 600
    assert torch.equal(some, sample_rows(idx, rows, 0.25, torch.Generator().manual_seed(0)))
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    sample_rows(idx, [[i] for i in range(64)], 0.25, gen)  # canonical: the random stream is untouched
    assert torch.equal(gen.get_state(), state)


def test_the_prior_trains_on_wordings_and_records_it(tmp_path):
    cfg = tiny(tmp_path / "w", 6, captions="wordings")
    cfg.arch.text_max_length = 16
    folder = train_prior(cfg, progress=False)
    training = json.loads((folder / "prior_config.json").read_text())["training"]
    assert training["captions"] == "wordings" and training["canonical_prob"] == 0.25
    short = tiny(tmp_path / "s", 2, captions="wordings")  # 8 tokens cannot hold "a 3d model of a ..."
    with pytest.raises(ValueError, match="tokens, more than text_max_length 8"):
        train_prior(short, progress=False)


def test_shape_weights_draw_objects_in_proportion_and_keep_the_uniform_stream():
    from att3d.world.prior_training import object_weights, sample_objects
    from att3d.world.shapes import SHAPE_NAMES, all_objects

    objects = all_objects()
    assert object_weights(objects, {}) is None
    assert object_weights(objects, {s: 1.0 for s in SHAPE_NAMES}) is None  # the YAML default: uniform
    gen = torch.Generator().manual_seed(0)
    uniform = sample_objects(64, 32, None, gen)
    assert torch.equal(uniform, torch.randint(0, 64, (32,), generator=torch.Generator().manual_seed(0)))

    w = object_weights(objects, {"pyramid": 3.0, "sphere": 0.0})
    assert w.shape == (64,) and float(w.sum()) == 6 * 8 + 3 * 8
    idx = sample_objects(64, 20000, w, torch.Generator().manual_seed(1))
    shapes = [objects[i].shape for i in idx.tolist()]
    assert shapes.count("sphere") == 0
    share = shapes.count("pyramid") / len(shapes)
    assert abs(share - 3 / 9) < 0.02, share  # 3 of the 9 units of weight
    assert abs(shapes.count("cube") / len(shapes) - 1 / 9) < 0.02

    for bad, match in [({"bogus": 2.0}, "unknown shape"), ({"cube": -1.0}, "finite number >= 0"),
                       ({"cube": float("nan")}, "finite number >= 0"), ({s: 0.0 for s in SHAPE_NAMES}, "weight 0")]:
        with pytest.raises(ValueError, match=match):
            object_weights(objects, bad)


def test_the_prior_records_its_shape_weights(tmp_path):
    folder = train_prior(tiny(tmp_path / "w", 4, shape_weights={"cube": 2.0}), progress=False)
    assert json.loads((folder / "prior_config.json").read_text())["training"]["shape_weights"] == {"cube": 2.0}


def test_supersampled_training_renders_are_the_box_filtered_fine_render():
    from att3d.render.cameras import OrbitCameras
    from att3d.world.prior_training import training_renders
    from att3d.world.render import render_objects
    from att3d.world.shapes import all_objects

    objects = all_objects()[:2]
    cams = OrbitCameras.sample_training(2, torch.Generator().manual_seed(3))
    plain = training_renders(objects, cams, 16)
    assert torch.equal(plain, render_objects(objects, cams, 16)["rgb"].permute(0, 3, 1, 2) * 2 - 1)
    fine = render_objects(objects, cams, 64)["rgb"].permute(0, 3, 1, 2) * 2 - 1
    aa = training_renders(objects, cams, 16, supersample=4)
    assert aa.shape == plain.shape
    # each pixel is the mean of its 4 x 4 block of the 64 px render: the block's top-left corner ...
    assert torch.allclose(aa[:, :, 5, 7], fine[:, :, 20:24, 28:32].mean(dim=(2, 3)), atol=1e-6)
    # ... and the sub-pixel rays spread over the pixel, so the mean ink equals the plain render's within a few pixels
    ink = lambda x: (1 - x).sum().item()  # noqa: E731
    assert abs(ink(aa) - ink(plain)) < 0.1 * ink(plain)
    # edges take values between the object and the background: fractional coverage that the plain render lacks
    edge = (aa > -1 + 1e-3) & (aa < 1 - 1e-3) & ((aa - plain).abs() > 1e-3)
    assert edge.any()
    with pytest.raises(ValueError, match="supersample"):
        training_renders(objects, cams, 16, supersample=0)


def test_the_prior_records_its_supersampling(tmp_path):
    folder = train_prior(tiny(tmp_path / "s", 4, supersample=2), progress=False)
    assert json.loads((folder / "prior_config.json").read_text())["training"]["supersample"] == 2


def test_a_bad_supersample_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="supersample"):
        train_prior(tiny(tmp_path / "bad", 4, supersample=0), progress=False)
    assert not (tmp_path / "bad" / "config.json").exists()
