"""`att3d eval prior` end to end on a tiny untrained prior."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from att3d.cli._args import UsageError
from att3d.cli.eval import prior_main
from att3d.eval import prior_eval
from att3d.world import metrics
from att3d.world.prior_training import PriorArchitecture, build_scheduler, build_unet, save_prior
from att3d.world.shapes import all_captions, all_objects


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-prior")
    arch = PriorArchitecture(block_out_channels=(16, 32), attention_head_dim=8, norm_num_groups=8)
    torch.manual_seed(0)
    save_prior(folder, build_unet(arch), build_scheduler(arch), arch)
    return folder


def test_select_prompts():
    assert prior_eval.select_prompts(None) == list(range(64))
    assert prior_eval.select_prompts(100) == list(range(64))
    assert prior_eval.select_prompts(1) == [0]
    assert prior_eval.select_prompts(2) == [0, 63]
    sel = prior_eval.select_prompts(16)
    assert len(set(sel)) == 16 and sel == sorted(sel) and sel[0] == 0 and sel[-1] == 63
    with pytest.raises(ValueError):
        prior_eval.select_prompts(0)


def test_score_samples_of_the_ground_truth_is_perfect():
    gt = metrics.ground_truth_views(None, 16, 8)
    idx = [5, 40]
    scores = prior_eval.score_samples(gt["rgb"][idx], idx, gt)
    assert scores["retrieved"].all()
    assert torch.equal(scores["best_match"], torch.tensor(idx)[:, None].expand(2, 8))
    assert (scores["colour_error"] < 1e-6).all()
    assert (scores["silhouette_iou"] > 0.95).all()
    # Blank white samples: nothing in the foreground, no shared pixel -> IoU 0, colour error 1.
    blank = torch.ones(2, 8, 16, 16, 3)
    scores = prior_eval.score_samples(blank, idx, gt)
    assert (scores["silhouette_iou"] == 0).all() and (scores["colour_error"] == 1).all()


def test_eval_prior_on_a_tiny_prior(tiny_prior, tmp_path):
    out = tmp_path / "eval"
    rc = prior_main(["--prior", str(tiny_prior), "--out", str(out), "--prompts", "2", "--steps", "2",
                          "--batch-size", "8", "--device", "cpu", "--no-progress"])
    assert rc == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["n_prompts"] == 2 and result["n_views"] == 8 and result["resolution"] == 32
    assert set(result["per_prompt"]) == {all_captions()[0], all_captions()[63]}
    for k in ("silhouette_iou", "colour_error", "retrieval_accuracy"):
        v = result["mean"][k]
        assert math.isfinite(v) and 0.0 <= v <= 1.0
    for m in result["per_prompt"].values():
        assert len(m["per_view"]["silhouette_iou"]) == 8
        assert all(0.0 <= x <= 1.0 for x in m["per_view"]["colour_error"])
        assert m["most_matched_as"] in all_captions()
    means = [m["silhouette_iou"] for m in result["per_prompt"].values()]
    assert result["mean"]["silhouette_iou"] == pytest.approx(sum(means) / 2, abs=1e-6)
    assert result["settings"]["steps"] == 2 and result["settings"]["eta"] == 1.0  # ancestral by default
    assert result["settings"]["restarts"] == prior_eval.DEFAULT_RESTARTS
    assert result["settings"]["spacing"] == "trailing"
    assert result["settings"]["guidance_interval"] == list(prior_eval.DEFAULT_GUIDANCE_INTERVAL)
    md = (out / "metrics.md").read_text()
    assert "| a red sphere |" in md and "retrieval accuracy" in md
    grid = np.asarray(Image.open(out / "samples.png"))
    # 2 prompts x (sample row + ground-truth row) of 64 px tiles, 8 views.
    assert grid.ndim == 3 and grid.shape[0] >= 4 * 64 and grid.shape[1] >= 8 * 64


def test_eval_prior_rejects_bad_arguments(tiny_prior, tmp_path):
    with pytest.raises(UsageError):
        prior_main(["--prior", str(tiny_prior), "--out", str(tmp_path), "--eta", "2"])
    with pytest.raises(UsageError):
        prior_main(["--prior", str(tiny_prior), "--out", str(tmp_path), "--prompts", "0"])
    with pytest.raises(UsageError):
        prior_main(["--prior", str(tiny_prior), "--out", str(tmp_path), "--restarts", "-1"])
    with pytest.raises(UsageError):
        prior_main(["--prior", str(tiny_prior), "--out", str(tmp_path), "--restart-t", "0"])
    with pytest.raises(UsageError):
        prior_main(["--prior", str(tiny_prior), "--out", str(tmp_path), "--guidance-interval", "0.7", "0.2"])
    with pytest.raises(UsageError):
        prior_main(["--prior", str(tiny_prior), "--out", str(tmp_path), "--spacing", "backwards"])
    with pytest.raises(FileNotFoundError):
        prior_main(["--prior", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert len(all_objects()) == 64


def test_view_wordings_spread_over_the_vocabulary():
    from att3d.world.wordings import wordings_by_object

    owner = wordings_by_object()
    objects = all_objects()
    for p, obj in enumerate(objects):
        texts = prior_eval.view_wordings(obj, 8, p)
        assert len(set(texts)) == 8 and obj.caption not in texts
        assert all(owner[t] == obj for t in texts)
    # the rotation moves an object's views to other wordings
    assert prior_eval.view_wordings(objects[0], 8, 0) != prior_eval.view_wordings(objects[0], 8, 1)


def test_eval_prior_with_wordings_records_the_texts(tiny_prior, tmp_path):
    out = tmp_path / "eval"
    assert prior_main(["--prior", str(tiny_prior), "--out", str(out), "--prompts", "2", "--steps", "1",
                       "--batch-size", "16", "--device", "cpu", "--no-progress", "--wordings"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["wordings"] and result["settings"]["wordings"]
    first = result["per_prompt"][all_captions()[0]]
    assert first["texts"] == prior_eval.view_wordings(all_objects()[0], 8, 0)
    assert "another wording of the object" in (out / "metrics.md").read_text()
