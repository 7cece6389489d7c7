"""scripts/architecture_study.py: its model and training-config arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._tiny import load_script

study = load_script("architecture_study")


def test_model_spec_names_architecture_set_and_folder():
    assert study.parse_model("triplane5/shapes64=runs/x/model") == ("triplane5", "shapes64", Path("runs/x/model"))
    with pytest.raises(SystemExit, match="ARCH/SET=FOLDER"):
        study.parse_model("triplane5=runs/x/model")


def test_train_overrides_give_an_architecture_its_own_training_config():
    assert study.parse_train_overrides("triplane5=experiment=shapes64_triplane trainer.batch_size=4") == (
        "triplane5", ["experiment=shapes64_triplane", "trainer.batch_size=4"])
    for bad in ("triplane5", "=experiment=shapes64", "triplane5=  "):
        with pytest.raises(SystemExit, match="ARCH=OVERRIDES"):
            study.parse_train_overrides(bad)
