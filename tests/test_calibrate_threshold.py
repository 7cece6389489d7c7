"""scripts/calibrate_threshold.py: the extraction threshold chosen by the mesh's agreement with the field's renders."""

from __future__ import annotations

import torch

from att3d.model import AmortizedModel
from tests._tiny import load_script, tiny_config


def test_mesh_that_covers_the_rendered_object_scores_high_and_an_empty_one_zero(tmp_path, capsys):
    calibrate = load_script("calibrate_threshold")
    torch.manual_seed(0)
    cfg = tiny_config(num_samples=32)
    model = AmortizedModel(cfg).eval()  # a fresh field: the centre bump, a soft ball that the renders show
    prompts = ["a red cube", "a blue torus"]
    scores = calibrate.self_consistency(model, prompts, [2.0, 1e6], resolution=24, views=4)
    assert set(scores) == {2.0, 1e6}
    assert scores[1e6] == 0.0  # no surface at that density: the mesh is empty where the renders show the ball
    assert 0.5 < scores[2.0] <= 1.0
    # the command: a table and the best threshold written; bad input is one line and exit 2
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "prompts.txt").write_text("a red cube\n")
    assert calibrate.main(["--checkpoint", str(tmp_path / "m"), "--prompts", str(tmp_path / "prompts.txt"),
                           "--thresholds", "2", "1e6", "--resolution", "16", "--out", str(tmp_path / "out")]) == 0
    assert "**best**" in (tmp_path / "out" / "threshold_opacity.md").read_text()
    assert calibrate.main(["--checkpoint", str(tmp_path / "m"), "--prompts", str(tmp_path / "prompts.txt"),
                           "--thresholds", "2", "--resolution", "16", "--surface", "density",
                           "--out", str(tmp_path / "out")]) == 0
    assert "surface `density`" in (tmp_path / "out" / "threshold_density.md").read_text()
    assert calibrate.main(["--checkpoint", str(tmp_path / "m"), "--thresholds", "0"]) == 2
    assert calibrate.main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert calibrate.main(["--checkpoint", str(tmp_path / "m"), "--surface", "iso"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3
