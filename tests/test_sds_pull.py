"""scripts/sds_pull.py: where score distillation pulls a render, per guidance scale."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import load_script, tiny_config

from att3d.model import AmortizedModel


@pytest.fixture(scope="module")
def pull():
    return load_script("sds_pull")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pull-model")
    AmortizedModel(tiny_config()).save_pretrained(folder)
    return folder


def test_cosine_of_parallel_and_opposite_batches(pull):
    a = torch.randn(3, 2, 4, 4)
    assert pull.cosine(a, 2 * a) == pytest.approx(1.0)
    assert pull.cosine(a, -a) == pytest.approx(-1.0)


def test_expected_gradient_is_the_mean_of_the_sds_draws(pull, tiny_prior_dir):
    """One draw is exactly w(t) (eps_hat - eps) for that draw's t and noise; more draws average them."""
    from att3d.guidance.priors.shapes import ShapesPrior
    from att3d.render.cameras import OrbitCameras

    prior = ShapesPrior.from_pretrained(tiny_prior_dir)
    images = torch.rand(2, 3, prior.resolution, prior.resolution)
    cams = OrbitCameras.evaluation(2)
    cond = prior.encode_prompts(["a red cube"] * 2)
    g1 = pull.expected_gradient(prior, images, cond, cams, 2.0, reps=1, seed=3)
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(20, 981, (2,), generator=gen)
    eps = torch.randn(2, 3, prior.resolution, prior.resolution, generator=gen)
    x0 = prior.encode_images(images)
    eps_hat = prior.predict_noise(prior.add_noise(x0, eps, t), t, cond, cams, 2.0)
    want = (1 - prior.alphas_cumprod[t]).view(-1, 1, 1, 1) * (eps_hat - eps)
    assert torch.allclose(g1, want, atol=1e-5)
    g4 = pull.expected_gradient(prior, images, cond, cams, 2.0, reps=4, seed=3)
    assert g4.shape == g1.shape and not torch.allclose(g4, g1)


def test_report_has_a_row_per_shape_and_guidance(pull, tiny_prior_dir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pull"
    code = pull.main(["--model", str(tiny_model_dir), "--prior", str(tiny_prior_dir), "--shapes", "cube", "torus",
                      "--guidance", "1", "3", "--views", "2", "--reps", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((out / "pull.json").read_text())["rows"]
    assert [(r["shape"], r["guidance"]) for r in rows] == [("cube", 1.0), ("cube", 3.0), ("torus", 1.0),
                                                           ("torus", 3.0)]
    assert all(-1.0 <= r["model_towards_gt"] <= 1.0 and r["distance"] > 0 for r in rows)
    # the guidance scale changes the prior's pull
    assert rows[0]["model_towards_gt"] != rows[1]["model_towards_gt"]
    md = (out / "pull.md").read_text()
    assert "| cube |" in md and "guidance 3" in md


def test_t_range_restricts_the_timesteps(pull, tiny_prior_dir, tiny_model_dir, tmp_path, capsys):
    """``--t-range`` reaches the draws: a low band and a high band give different cosines, and the report says which."""
    rows = {}
    for band in (("0.02", "0.3"), ("0.6", "0.98")):
        out = tmp_path / "_".join(band)
        code = pull.main(["--model", str(tiny_model_dir), "--prior", str(tiny_prior_dir), "--shapes", "cube",
                          "--guidance", "1", "--views", "2", "--reps", "2", "--t-range", *band, "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        rows[band] = json.loads((out / "pull.json").read_text())["rows"][0]
        assert f"t uniform in [{float(band[0]):g}, {float(band[1]):g}] T" in (out / "pull.md").read_text()
    low, high = rows.values()
    assert low["model_towards_gt"] != high["model_towards_gt"]


@pytest.mark.parametrize("args", [["--shapes", "blob"], ["--guidance", "0"], ["--reps", "0"], ["--colour", "teal"],
                                  ["--t-range", "0.5", "0.2"], ["--t-range", "0", "0.5"]])
def test_bad_input_is_one_line(pull, tiny_prior_dir, tiny_model_dir, tmp_path, capsys, args):
    assert pull.main(["--model", str(tiny_model_dir), "--prior", str(tiny_prior_dir), "--out", str(tmp_path),
                      *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert pull.main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
