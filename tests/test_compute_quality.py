"""scripts/compute_quality.py: frames-per-prompt arithmetic, the "times fewer frames" interpolation, and a tiny
end-to-end run (two snapshots, tiny prior, 1 prompt per split, 2 steps) with resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _tiny import load_script, tiny_config

from att3d.model import AmortizedModel
from att3d.world.shapes import heldout_captions, train_captions

TINY_CONFIG = tiny_config()


@pytest.fixture(scope="module")
def cq():
    return load_script("compute_quality")


# ---------------------------------------------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------------------------------------------

def test_frames_per_prompt(cq):
    assert cq.amortized_frames_per_prompt(4000, 8, 56) == pytest.approx(4000 * 8 / 56)
    assert cq.amortized_frames_per_prompt(250, 8, 56) == pytest.approx(35.714285, rel=1e-6)
    assert cq.amortized_frames_per_prompt(0, 8, 56) == 0.0
    assert cq.per_prompt_frames(500, 4) == 2000.0
    with pytest.raises(ValueError):
        cq.amortized_frames_per_prompt(10, 8, 0)
    with pytest.raises(ValueError):
        cq.per_prompt_frames(10, 0)


def test_evenly_spaced(cq):
    items = list(range(56))
    assert cq.evenly_spaced(items, 8) == [3, 10, 17, 24, 31, 38, 45, 52]
    assert cq.evenly_spaced(items, 1) == [28]
    assert cq.evenly_spaced(items, 0) == items and cq.evenly_spaced(items, 99) == items
    sub = cq.evenly_spaced(items, 5)
    assert len(set(sub)) == 5 and sub == sorted(sub)


def test_frames_to_reach_interpolates_in_log_frames(cq):
    frames, iou = [10.0, 100.0, 1000.0], [0.2, 0.5, 0.8]
    r = cq.frames_to_reach(frames, iou, 0.65, higher_is_better=True)
    assert r["reached"] and not r["at_first_point"]
    assert r["frames"] == pytest.approx(math.sqrt(100.0 * 1000.0))  # halfway in log between 100 and 1000
    assert cq.times_fewer(2000.0, r) == pytest.approx(2000.0 / math.sqrt(1e5))
    # an exact hit lands on the point; unsorted input and NaN values are handled
    r = cq.frames_to_reach([1000.0, float(10), 100.0, 50.0], [0.8, 0.2, 0.5, float("nan")], 0.5)
    assert r["frames"] == pytest.approx(100.0)
    # lower is better (colour error)
    r = cq.frames_to_reach(frames, [0.3, 0.2, 0.1], 0.15, higher_is_better=False)
    assert r["reached"] and r["frames"] == pytest.approx(math.sqrt(1e5))
    # the first crossing counts, even if the curve dips afterwards
    r = cq.frames_to_reach([10.0, 100.0, 1000.0], [0.2, 0.9, 0.1], 0.5)
    assert 10.0 < r["frames"] < 100.0 and r["best"] == pytest.approx(0.9)


def test_frames_to_reach_not_reached_and_first_point(cq):
    r = cq.frames_to_reach([10.0, 100.0], [0.2, 0.4], 0.9)
    assert r == {"reached": False, "frames": None, "at_first_point": False, "best": pytest.approx(0.4)}
    assert cq.times_fewer(2000.0, r) is None
    r = cq.frames_to_reach([10.0, 100.0], [0.3, 0.25], 0.35, higher_is_better=False)
    assert r["reached"] and r["at_first_point"] and r["frames"] == 10.0
    assert cq.times_fewer(2000.0, r) == pytest.approx(200.0)
    assert cq.frames_to_reach([], [], 0.5)["reached"] is False


def test_heldout_fraction(cq):
    fr = cq.heldout_fraction({"volume_iou": 0.8, "colour_error": 0.2}, {"volume_iou": 0.6, "colour_error": 0.4})
    assert fr["volume_iou"]["fraction"] == pytest.approx(0.75)
    assert fr["colour_error"]["fraction"] == pytest.approx(0.6 / 0.8)  # of colour accuracy 1 - error
    assert cq.heldout_fraction({"volume_iou": 0.0}, {"volume_iou": 0.3})["volume_iou"]["fraction"] is None


def _curve(frames, iou, colour, steps=None):
    n = len(frames)
    return {"steps": steps or list(range(1, n + 1)), "frames": frames, "prompts": 1, "volume_iou": iou,
            "colour_error": colour, "silhouette_iou": iou, "retrieval_accuracy": [0.0] * n}


def test_answers_report_not_reached_without_crashing(cq, tmp_path):
    amort = {"train": _curve([10.0, 100.0], [0.1, 0.2], [0.5, 0.4]),
             "heldout": _curve([10.0, 100.0], [0.05, 0.1], [0.6, 0.5])}
    scratch = {"train": _curve([0.0, 400.0], [0.0, 0.7], [1.0, 0.45], steps=[0, 100]),
               "heldout": _curve([0.0, 400.0], [0.0, 0.6], [1.0, 0.2], steps=[0, 100])}
    ans = cq.answers(amort, amort, scratch)
    train = ans["frames_ratio"]["train"]
    assert not train["volume_iou"]["amortized_reached"] and train["volume_iou"]["times_fewer"] is None
    # colour error: the amortized 0.4 at 100 frames beats the per-prompt 0.45 -> reached between 10 and 100
    assert train["colour_error"]["amortized_reached"]
    assert train["colour_error"]["times_fewer"] == pytest.approx(400.0 / train["colour_error"]["amortized_frames"])
    assert 10.0 < train["colour_error"]["amortized_frames"] < 100.0
    assert ans["heldout_fraction"]["amortized"]["volume_iou"]["fraction"] == pytest.approx(0.5)
    summary = {"settings": {"batch_size": 8, "num_train_prompts": 56, "batch_views": 4, "resolution": 32,
                            "eval_resolution": 64, "mode": "params"},
               "curves": {"amortized": amort, "per_prompt": scratch}, "answers": ans}
    text = cq.markdown_report(summary)
    assert "not reached" in text and "times fewer" in text
    cq.plot(summary, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def snapshots(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("snapshots")
    torch.manual_seed(0)
    model = AmortizedModel(TINY_CONFIG)
    model.save_pretrained(root / "step-0000002")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root / "step-0000004")
    (root / "step-0000006").mkdir()  # an incomplete copy (no model yet) is not a snapshot
    return root


@pytest.fixture(scope="module")
def prior_folder(tiny_prior_dir) -> Path:
    return tiny_prior_dir


def _argv(snapshots: Path, prior: Path, out: Path, *extra: str) -> list[str]:
    return ["--snapshots", str(snapshots), "--prior", str(prior), "--out", str(out), "--prompts-per-split", "1",
            "--scratch-prompts-per-split", "1", "--steps", "2", "--every", "1", "--batch-views", "2",
            "--resolution", "16", "--eval-resolution", "16", "--device", "cpu", "--no-progress", *extra]


def test_end_to_end_and_resume(cq, snapshots, prior_folder, tmp_path, capsys):
    out = tmp_path / "cq"
    assert cq.main(_argv(snapshots, prior_folder, out)) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "compute_quality.json").read_text())
    assert sorted(res["amortized"]) == ["step-0000002", "step-0000004"]
    train_prompt = cq.evenly_spaced(train_captions(), 1)[0]
    held_prompt = cq.evenly_spaced(heldout_captions(), 1)[0]
    for unit in res["amortized"].values():
        assert {r["prompt"]: r["split"] for r in unit["per_prompt"]} == {train_prompt: "train",
                                                                        held_prompt: "heldout"}
    assert sorted(res["scratch"]) == sorted([train_prompt, held_prompt])
    assert [e["step"] for e in res["scratch"][train_prompt]["evals"]] == [0, 1, 2]
    amort = res["curves"]["amortized"]["train"]
    assert amort["frames"] == pytest.approx([2 * 8 / 56, 4 * 8 / 56])
    scratch = res["curves"]["per_prompt"]["heldout"]
    assert scratch["frames"] == [0.0, 2.0, 4.0] and scratch["prompts"] == 1
    for curves in res["curves"].values():
        for c in curves.values():
            assert all(0.0 <= v <= 1.0 for m in cq.METRICS for v in c[m])
    assert set(res["answers"]["frames_ratio"]) == {"train", "heldout"}
    for per in res["answers"]["frames_ratio"].values():
        for r in per.values():
            assert (r["times_fewer"] is None) == (not r["amortized_reached"])
    assert set(res["answers"]["heldout_fraction"]) == {"amortized", "per_prompt"}
    assert (out / "compute_quality.png").stat().st_size > 1000
    md = (out / "compute_quality.md").read_text()
    assert "## Answers" in md and md in printed

    # resume: nothing is recomputed
    seconds = {k: u["seconds"] for k, u in res["amortized"].items()}
    scratch_seconds = {k: u["seconds"] for k, u in res["scratch"].items()}
    assert cq.main(_argv(snapshots, prior_folder, out, "--resume")) == 0
    again = json.loads((out / "compute_quality.json").read_text())
    assert {k: u["seconds"] for k, u in again["amortized"].items()} == seconds
    assert {k: u["seconds"] for k, u in again["scratch"].items()} == scratch_seconds

    # resume with other per-prompt settings is refused, not silently mixed
    capsys.readouterr()
    assert cq.main(_argv(snapshots, prior_folder, out, "--resume", "--parts", "amortized", "--steps", "3")) == 2
    assert "steps" in capsys.readouterr().err


def test_resume_scores_only_new_snapshots(cq, snapshots, prior_folder, tmp_path):
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    (snaps / "step-0000002").symlink_to(snapshots / "step-0000002", target_is_directory=True)
    out = tmp_path / "cq"
    assert cq.main(_argv(snaps, prior_folder, out, "--parts", "amortized")) == 0
    first = json.loads((out / "compute_quality.json").read_text())
    assert list(first["amortized"]) == ["step-0000002"] and first["scratch"] == {}
    assert first["answers"]["frames_ratio"] == {}  # no per-prompt runs: no ratio, no crash
    (snaps / "step-0000004").symlink_to(snapshots / "step-0000004", target_is_directory=True)
    assert cq.main(_argv(snaps, prior_folder, out, "--parts", "amortized", "--resume")) == 0
    second = json.loads((out / "compute_quality.json").read_text())
    assert sorted(second["amortized"]) == ["step-0000002", "step-0000004"]
    assert second["amortized"]["step-0000002"]["seconds"] == first["amortized"]["step-0000002"]["seconds"]
    assert len(second["curves"]["amortized"]["train"]["steps"]) == 2


def test_missing_snapshots_is_an_error(cq, prior_folder, tmp_path, capsys):
    assert cq.main(_argv(tmp_path / "none", prior_folder, tmp_path / "out", "--parts", "amortized")) == 2
    assert "no snapshot" in capsys.readouterr().err
