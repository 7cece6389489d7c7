"""The amortized model container: build from configs, save/load folders, architecture checks."""

from __future__ import annotations

import pytest
import torch

import att3d
from att3d.model import AmortizedModel
from att3d.render.cameras import OrbitCameras
from att3d.utils.checkpoint import CheckpointError


def tiny_config(max_resolution: int = 8, latent_dim: int = 4) -> dict:
    return {
        "text_encoder": {"name": "minilm", "max_length": 8},
        "mapping": {"name": "hypernetwork", "hidden_dim": 8},
        "field": {"name": "grid", "num_levels": 2, "base_resolution": 4, "max_resolution": max_resolution,
                  "hidden_dim": 8, "latent_dim": latent_dim},
        "renderer": {"name": "volume", "num_samples": 16, "backend": "torch"},
    }


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AmortizedModel(tiny_config())


def test_one_model_serves_many_prompts(model):
    cond = model.conditioning(["a red cube", "a blue torus", "a green cone"])
    assert cond["grid"].shape[0] == 3 and cond["latent"].shape == (3, 4)
    assert not torch.allclose(cond["grid"][0], cond["grid"][1])
    out = model.render(cond, OrbitCameras.evaluation(3), 8)
    assert out["rgb"].shape == (3, 8, 8, 3) and torch.isfinite(out["rgb"]).all()


def test_text_encoder_is_frozen_and_not_saved(model):
    assert all(not k.startswith("text_encoder") for k in model.state_dict())
    assert all(p.requires_grad for p in model.parameters())  # only mapping + field


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "model_config.json").is_file()
    back = att3d.load(tmp_path / "m")
    prompts = ["a red cube", "a pink sphere"]
    with torch.no_grad():
        a, b = model.eval().conditioning(prompts), back.conditioning(prompts)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6)


def test_checkpoint_from_another_architecture_is_a_one_line_error(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    other = AmortizedModel(tiny_config(max_resolution=12), text_encoder=model.text_encoder)
    from att3d.model import load_state_checked
    from att3d.utils.checkpoint import load_tensors

    with pytest.raises(CheckpointError, match="another architecture") as e:
        load_state_checked(other, load_tensors(tmp_path / "m" / "model.safetensors"), tmp_path / "m")
    assert "\n" not in str(e.value)


def test_loading_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(CheckpointError, match="not an att3d model folder"):
        att3d.load(tmp_path)
