"""scripts/prior_shape_bias.py: the denoising-error matrix of a prior over caption x rendered shape."""

from __future__ import annotations

import json

import pytest
from _tiny import load_script

from att3d.world.shapes import SDFS


@pytest.fixture(scope="module")
def sb():
    return load_script("prior_shape_bias")


def test_shape_bias_matrix_and_report(sb, tiny_prior_dir, tmp_path, capsys):
    out = tmp_path / "bias"
    assert sb.main(["--prior", str(tiny_prior_dir), "--out", str(out), "--views", "2", "--t", "50", "400"]) == 0
    res = json.loads((out / "shape_bias.json").read_text())
    n = len(SDFS)
    assert sorted(res["matrices"]) == ["400", "50"]
    for m in res["matrices"].values():
        assert len(m) == n and all(len(row) == n and all(v > 0 for v in row) for row in m)
    # more noise, more to predict: a denoiser's error is not the same at two noise levels
    assert res["matrices"]["50"] != res["matrices"]["400"]
    rows = {r["caption_shape"]: r for r in res["summary"]}
    assert set(rows) == set(SDFS)
    for shape, r in rows.items():
        assert r["rival"] != shape and r["rival"] in SDFS
        assert r["margin"] == pytest.approx((r["rival_error"] - r["own"]) / r["own"])
    text = (out / "shape_bias.md").read_text()
    assert "## t = 50" in text and "## t = 400" in text and "Caption as a classifier" in text


def test_shape_bias_rejects_bad_input(sb, tiny_prior_dir, tmp_path, capsys):
    assert sb.main(["--prior", str(tiny_prior_dir), "--out", str(tmp_path), "--colour", "teal"]) == 2
    assert sb.main(["--prior", str(tiny_prior_dir), "--out", str(tmp_path), "--t", "5000"]) == 2
    assert sb.main(["--prior", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "Traceback" not in err
