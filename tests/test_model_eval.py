"""`att3d eval model` on a tiny model: files, metric ranges, splits, exported-mesh scoring."""

from __future__ import annotations

import json

import torch
from test_model import tiny_config

from att3d.cli import main as cli_main
from att3d.eval.model_eval import summarise
from att3d.model import AmortizedModel


def test_eval_model_cli_writes_its_report(tmp_path, capsys):
    torch.manual_seed(0)
    AmortizedModel(tiny_config()).save_pretrained(tmp_path / "m")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red sphere\na blue cube\n")
    code = cli_main(["eval", "model", "--checkpoint", str(tmp_path / "m"), "--prompts", str(prompts),
                     "--heldout", "shapes64_heldout", "--resolution", "16", "--meshes", "--threshold", "1.0",
                     "--out", str(tmp_path / "ev")])
    assert code == 0
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert (tmp_path / "ev" / "metrics.md").is_file() and (tmp_path / "ev" / "renders.png").is_file()
    rows = {r["prompt"]: r for r in report["per_prompt"]}
    assert rows["a red sphere"]["split"] == "heldout" and rows["a blue cube"]["split"] == "train"
    for r in rows.values():
        assert 0.0 <= r["volume_iou"] <= 1.0 and 0.0 <= r["colour_error"] <= 1.0
        assert 0.0 <= r["mesh_volume_iou"] <= 1.0
    assert set(report["summary"]) == {"train", "heldout", "all"}
    # one table per shape: each mean is its prompts' own score (here one prompt per shape)
    assert set(report["per_shape"]) == {"sphere", "cube"}
    for shape, prompt in (("sphere", "a red sphere"), ("cube", "a blue cube")):
        assert rows[prompt]["shape"] == shape and report["per_shape"][shape]["count"] == 1
        assert report["per_shape"][shape]["mesh_volume_iou"] == rows[prompt]["mesh_volume_iou"]
        assert report["per_shape"][shape]["retrieval_accuracy"] == float(rows[prompt]["retrieved"])
    out = capsys.readouterr().out
    assert "| heldout | 1 |" in out and "| cube | 1 |" in out
    assert "| cube | 1 |" in (tmp_path / "ev" / "metrics.md").read_text()


def test_summarise_averages_each_key_and_names_the_retrieval_rates():
    rows = [{"volume_iou": 0.5, "retrieved": True, "mesh_retrieved": False},
            {"volume_iou": 1.0, "retrieved": False, "mesh_retrieved": False}]
    assert summarise(rows, ["volume_iou", "retrieved", "mesh_retrieved"]) == {
        "volume_iou": 0.75, "count": 2, "retrieval_accuracy": 0.5, "mesh_retrieval_accuracy": 0.0}
    assert summarise([], ["volume_iou", "retrieved"]) == {}
    assert summarise(rows, ["volume_iou"]) == {"volume_iou": 0.75, "count": 2}  # no flags: no rates


def test_eval_model_rejects_a_caption_outside_the_world(tmp_path, capsys):
    AmortizedModel(tiny_config()).save_pretrained(tmp_path / "m")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red dragon\n")
    assert cli_main(["eval", "model", "--checkpoint", str(tmp_path / "m"), "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("att3d: error: not a shapes-world caption: 'a red dragon'")
