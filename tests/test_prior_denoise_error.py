"""scripts/prior_denoise_error.py: the clean-image error of a prior from noised ground-truth renders."""

from __future__ import annotations

import json

import pytest
from _tiny import load_script


@pytest.fixture(scope="module")
def den():
    return load_script("prior_denoise_error")


class _ExactPrior:
    """Wraps a prior so that its noise prediction is the true noise of the noised truth (a perfect prior)."""

    def __init__(self, prior, shift: float = 0.0):
        self.prior, self.shift, self.x0 = prior, shift, None

    def __getattr__(self, name):
        return getattr(self.prior, name)

    def encode_images(self, rgb):
        self.x0 = self.prior.encode_images(rgb)
        return self.x0

    def predict_noise(self, x_t, t, cond, cameras, guidance_scale=1.0):
        a = self.prior.alphas_cumprod[t].view(-1, 1, 1, 1)
        # the noise that maps x_t back to x0 (+ shift: a prior whose estimate is off by a constant)
        return (x_t - a.sqrt() * (self.x0 + self.shift)) / (1 - a).sqrt()


def test_a_perfect_prior_scores_zero_and_an_offset_scores_the_offset(den, tiny_prior_dir):
    from att3d.guidance.priors.shapes import ShapesPrior

    prior = ShapesPrior.from_pretrained(tiny_prior_dir)
    errors = den.denoise_error(_ExactPrior(prior), "cube", [100, 900], views=2, colours=["red"])
    assert errors == pytest.approx([0.0, 0.0], abs=1e-4)
    # an estimate off by 0.2 in [-1, 1] units is off by 0.1 in [0, 1] units
    errors = den.denoise_error(_ExactPrior(prior, shift=0.2), "cube", [100, 900], views=2, colours=["red"])
    assert errors == pytest.approx([0.1, 0.1], abs=1e-3)
    # the real (random-weight) tiny prior is far from perfect, more so at high noise
    real = den.denoise_error(prior, "cube", [100, 900], views=2, colours=["red"])
    assert real[1] > real[0] > 0.01


def test_report_has_a_row_per_prior_and_shape(den, tiny_prior_dir, tmp_path, capsys):
    out = tmp_path / "den"
    code = den.main(["--prior", str(tiny_prior_dir), "--prior", str(tiny_prior_dir), "--shapes", "cube", "torus",
                     "--timesteps", "200", "800", "--views", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "denoise.json").read_text())
    assert [r["shape"] for r in data["rows"]] == ["cube", "torus", "cube", "torus"]
    # same views and noise for every prior: the same prior twice gives the same errors
    assert data["rows"][0]["errors"] == data["rows"][2]["errors"]
    assert all(len(r["errors"]) == 2 for r in data["rows"])
    assert "| cube |" in (out / "denoise.md").read_text()


@pytest.mark.parametrize("args", [["--shapes", "blob"], ["--colours", "teal"], ["--views", "0"],
                                  ["--timesteps", "5000"]])
def test_bad_input_is_one_line(den, tiny_prior_dir, tmp_path, capsys, args):
    assert den.main(["--prior", str(tiny_prior_dir), "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert den.main(["--prior", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
