"""scripts/prior_azimuth.py: a prior's denoising error against the azimuth it is told."""

from __future__ import annotations

import json

import pytest
from _tiny import load_script


@pytest.fixture(scope="module")
def az():
    return load_script("prior_azimuth")


def test_summary_finds_the_lowest_delta_and_the_contrast(az):
    deltas = [-45.0, -22.5, 0.0, 22.5, 45.0]
    s = az.summary({"cube": [3.0, 2.0, 1.0, 1.5, 5.0], "pyramid": [1.0, 0.5, 2.0, 3.0, 3.0]}, deltas)
    assert s["cube"] == {"argmin_deg": 0.0, "contrast": pytest.approx(4.0)}
    assert s["pyramid"]["argmin_deg"] == -22.5 and s["pyramid"]["contrast"] == pytest.approx(1.0)


def test_azimuth_report_of_two_priors(az, tiny_prior_dir, tmp_path, capsys):
    out = tmp_path / "az"
    code = az.main(["--prior", str(tiny_prior_dir), "--prior", str(tiny_prior_dir), "--out", str(out),
                    "--views", "2", "--t", "400", "--colours", "red"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "azimuth.json").read_text())
    curves = res["priors"][str(tiny_prior_dir)]["curves"]
    assert set(curves) == set(az.SHAPES) and all(len(c) == len(res["deltas_deg"]) == 13 for c in curves.values())
    assert all(v > 0 for c in curves.values() for v in c)
    # the camera changes the prediction: the error is not the same at every told azimuth
    assert len({round(v, 9) for v in curves["cube"]}) > 1
    assert "| camera harmonics | camera map |" in (out / "azimuth.md").read_text() and (out / "azimuth.png").is_file()


@pytest.mark.parametrize("args", [["--colours", "teal"], ["--t", "5000"], ["--views", "0"]])
def test_azimuth_rejects_bad_input_in_one_line(az, tiny_prior_dir, tmp_path, capsys, args):
    assert az.main(["--prior", str(tiny_prior_dir), "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err  # (the text encoder's loading bar may come first)
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "Traceback" not in err
    assert az.main(["--prior", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
