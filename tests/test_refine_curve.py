"""scripts/refine_curve.py: both starts scored over the steps, per-start schedules, resume keeps only the runs
whose start's settings are unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny import load_script, tiny_config

from att3d.model import AmortizedModel

TINY_CONFIG = tiny_config()


@pytest.fixture(scope="module")
def rc():
    return load_script("refine_curve")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("rc") / "model"
    AmortizedModel(TINY_CONFIG).save_pretrained(folder)
    return folder


def _argv(ckpt: Path, prior: Path, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(ckpt), "--prior", str(prior), "--out", str(out), "--prompts", "a red sphere",
            "--steps", "2", "--every", "1", "--batch-views", "2", "--resolution", "16", "--eval-resolution", "16",
            "--device", "cpu", *extra]


def test_refine_curve_end_to_end_and_resume(rc, checkpoint, tiny_prior_dir, tmp_path, capsys):
    out = tmp_path / "curve"
    extra = ("--amortized-guidance-scale", "2", "--amortized-t-max", "0.5", "--amortized-lr-final", "0.1")
    assert rc.main(_argv(checkpoint, tiny_prior_dir, out, *extra)) == 0
    res = json.loads((out / "refine_curve.json").read_text())
    assert sorted(res["runs"]) == ["amortized|a red sphere", "scratch|a red sphere"]
    for run in res["runs"].values():
        assert [e["step"] for e in run["evals"]] == [0, 1, 2]
        assert all(0.0 <= e[m] <= 1.0 for e in run["evals"] for m in rc.METRICS)
    sched = res["settings"]["schedules"]
    assert sched["amortized"] == {"guidance_scale": 2.0, "guidance_scale_low": None, "low_t": None, "t_max": 0.5,
                                  "lr_final": 0.1}
    assert sched["scratch"] == {"guidance_scale": None, "guidance_scale_low": None, "low_t": None, "t_max": None,
                                "lr_final": 1.0}
    # the two starts differ at step 0: the trained (here: tiny) model's output vs a fresh initialisation
    a0 = res["runs"]["amortized|a red sphere"]["evals"][0]
    s0 = res["runs"]["scratch|a red sphere"]["evals"][0]
    assert a0 != s0
    assert (out / "refine_curve.png").stat().st_size > 1000
    assert "| 2 |" in (out / "refine_curve.md").read_text()

    # resume with another amortized schedule: the scratch run is kept, the amortized one is redone
    capsys.readouterr()
    before = res["runs"]["scratch|a red sphere"]["seconds"]
    assert rc.main(_argv(checkpoint, tiny_prior_dir, out, "--resume", "--amortized-guidance-scale", "3")) == 0
    err = capsys.readouterr().err
    assert "keeping the finished runs of ['scratch']" in err
    again = json.loads((out / "refine_curve.json").read_text())
    assert again["runs"]["scratch|a red sphere"]["seconds"] == before
    assert again["settings"]["schedules"]["amortized"]["guidance_scale"] == 3.0
