"""scripts/ship_model.py: a trained model folder's weights written in fp16 into a shipped folder."""

from __future__ import annotations

import torch

import att3d
from att3d.model import AmortizedModel
from att3d.utils.checkpoint import load_tensors
from tests._tiny import load_script, tiny_config


def tiny_model() -> AmortizedModel:
    torch.manual_seed(0)
    return AmortizedModel(tiny_config())


def test_ship_writes_half_weights_and_keeps_the_folder_s_other_files(tmp_path, capsys):
    ship = load_script("ship_model")
    tiny_model().save_pretrained(tmp_path / "run" / "model", extra={"steps": 7, "stage": "nerf"})
    dest = tmp_path / "asset"
    dest.mkdir()
    (dest / "README.md").write_text("model card")
    assert ship.main([str(tmp_path / "run" / "model"), str(dest)]) == 0
    assert "largest change" in capsys.readouterr().out
    assert (dest / "README.md").read_text() == "model card"
    assert {v.dtype for v in load_tensors(dest / "model.safetensors").values()} == {torch.float16}
    shipped, trained = att3d.load(dest).config, att3d.load(tmp_path / "run" / "model").config
    assert shipped["field"] == trained["field"] and shipped["extra"] == {"steps": 7, "stage": "nerf"}
    # a folder that holds a model already: refused without --overwrite, nothing changed
    before = (dest / "model.safetensors").read_bytes()
    assert ship.main([str(tmp_path / "run" / "model"), str(dest), "--dtype", "float32"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--overwrite" in errors[0]
    assert (dest / "model.safetensors").read_bytes() == before
    assert ship.main([str(tmp_path / "run" / "model"), str(dest), "--dtype", "float32", "--overwrite"]) == 0
    assert {v.dtype for v in load_tensors(dest / "model.safetensors").values()} == {torch.float32}
    # bad input: one line, exit 2
    assert ship.main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert ship.main([str(tmp_path / "run" / "model"), str(tmp_path / "y"), "--dtype", "int8"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "int8" in errors[1]
