"""scripts/prior_scale_pull.py: the size at which a prior's score distillation leaves a true object alone."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from _tiny import load_script

from att3d.world.prior_training import training_renders
from att3d.world.shapes import all_objects


@pytest.fixture(scope="module")
def sp():
    return load_script("prior_scale_pull")


class ExactPrior:
    """A stand-in prior whose noise prediction is exact for the true object drawn ``scale`` times its size: its
    score distillation pulls every render towards that image."""

    resolution = 16
    num_train_timesteps = 1000

    def __init__(self, scale: float):
        self.scale = scale
        self.alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
        self.objects = {o.caption: o for o in all_objects()}

    def encode_prompts(self, prompts):
        return list(prompts)

    def encode_images(self, images):
        return images * 2 - 1

    def add_noise(self, x0, noise, t):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_noise(self, x_t, t, cond, cameras, guidance):
        cams = dataclasses.replace(cameras, radius=cameras.radius / self.scale)
        x_true = training_renders([self.objects[c] for c in cond], cams, self.resolution, 4)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x_true) / (1 - a).sqrt()


@pytest.mark.parametrize("wanted", [1.0, 1.05])
def test_an_exact_prior_is_left_alone_at_the_size_it_draws(sp, wanted):
    scales = [0.94, 0.97, 1.0, 1.03, 1.06]
    for shape in ("cube", "pyramid"):
        pulls = sp.scale_pull(ExactPrior(wanted), shape, ["red"], scales, views=4, draws=2)
        assert pulls[0] > 0 > pulls[-1], pulls  # smaller than wanted: pulled larger; larger: pulled smaller
        assert sp.zero_crossing(scales, pulls) == pytest.approx(wanted, abs=0.01)


def test_zero_crossing(sp):
    assert sp.zero_crossing([1.0, 2.0, 3.0], [0.5, 0.25, -0.25]) == pytest.approx(2.5)
    assert sp.zero_crossing([1.0, 2.0], [-0.1, -0.2]) is None


def test_the_script_writes_its_report(sp, tiny_prior_dir, tmp_path):
    out = tmp_path / "pull"
    assert sp.main(["--prior", str(tiny_prior_dir), "--out", str(out), "--shapes", "cube", "--colours", "red",
                    "--scales", "0.9", "1.1", "--views", "2", "--draws", "1", "--supersample", "2"]) == 0
    res = json.loads((out / "scale_pull.json").read_text())
    r = res["results"][str(tiny_prior_dir)]["cube"]
    assert len(r["pull"]) == 2 and all(isinstance(p, float) for p in r["pull"])
    assert "| cube |" in (out / "scale_pull.md").read_text()


def test_bad_input_is_one_line(sp, tiny_prior_dir, tmp_path, capsys):
    assert sp.main(["--prior", str(tiny_prior_dir), "--out", str(tmp_path), "--shapes", "blob"]) == 2
    assert sp.main(["--prior", str(tiny_prior_dir), "--out", str(tmp_path), "--scales", "1.1", "0.9"]) == 2
    assert sp.main(["--prior", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "Traceback" not in err
