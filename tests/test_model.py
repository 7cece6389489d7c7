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


def test_fp16_folder_holds_half_weights_and_loads_into_float32(model, tmp_path):
    from att3d.utils.checkpoint import load_tensors

    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "half", dtype=torch.float16)
    stored = load_tensors(tmp_path / "half" / "model.safetensors")
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    size = {k: (tmp_path / k / "model.safetensors").stat().st_size for k in ("full", "half")}
    assert size["half"] < 0.6 * size["full"]
    back = att3d.load(tmp_path / "half")
    own = model.state_dict()
    for k, v in back.state_dict().items():  # float32 again, equal to the model's weights rounded to fp16
        assert v.dtype == own[k].dtype
        torch.testing.assert_close(v, own[k].half().to(own[k].dtype), rtol=0, atol=0)
    prompts = ["a red cube", "a pink sphere"]
    with torch.no_grad():
        a, b = model.eval().conditioning(prompts), back.conditioning(prompts)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-2, atol=1e-3)
    with pytest.raises(ValueError, match="floating-point"):
        model.save_pretrained(tmp_path / "bad", dtype=torch.int8)


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


# -- every model folder is checked against the schema before use (issue 19, item 5) ---------------------------

def _folder(model, tmp_path, name: str = "m"):
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder


def _edit_config(folder, change) -> None:
    import json

    path = folder / "model_config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: {}, "no text_encoder section"),
    (lambda c: [c], "expected a mapping of the sections text_encoder, mapping, field, renderer, got list"),
    (lambda c: "model", "got str"),
    (lambda c: {**c, "fields": {}}, "unknown section(s) fields"),
    (lambda c: {**c, "field": {**c["field"], "name": "nope"}}, "field.name: unknown field 'nope'; choose one of:"),
    (lambda c: {**c, "field": {**c["field"], "name": 3}}, "field.name must name a registered field, got 3"),
    (lambda c: {**c, "mapping": "hypernetwork"}, "mapping must be a mapping with a name, got 'hypernetwork'"),
    (lambda c: {**c, "field": {**c["field"], "num_levls": 2}}, "field.num_levls: field 'grid' has no argument(s) "
                                                               "num_levls"),
    (lambda c: {**c, "renderer": {**c["renderer"], "backend": "nope"}}, "backend must be one of"),
    (lambda c: {**c, "extraction": {"threshold": "abc"}}, "extraction.threshold must be a number, got 'abc'"),
    (lambda c: {**c, "extraction": {"threshold": float("nan")}}, "extraction.threshold must be a finite density"),
    (lambda c: {**c, "extra": [1]}, "extra must be a mapping, got list"),
])
def test_a_model_config_of_the_wrong_shape_is_one_line_naming_the_file_and_the_key(model, tmp_path, change,
                                                                                   message):
    folder = _folder(model, tmp_path)
    _edit_config(folder, change)
    with pytest.raises(CheckpointError) as e:
        att3d.load(folder)
    text = str(e.value)
    assert text.startswith(f"{folder / 'model_config.json'}: ") and message in text and "\n" not in text, text


def test_weights_of_the_wrong_dtype_or_not_finite_are_refused(model, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _folder(model, tmp_path)
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    save_file({k: v.to(torch.int64) for k, v in state.items()}, str(weights))
    with pytest.raises(CheckpointError, match=r"tensor\(s\) of the wrong dtype \(e\.g\. .*: int64, the model has "
                                              r"float32\): not weights of this model") as e:
        att3d.load(folder)
    assert str(e.value).startswith(f"checkpoint {weights}: ")
    save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, str(weights))
    with pytest.raises(CheckpointError, match=r"hold NaN or inf values .*: the weights are damaged or from a "
                                              "diverged run"):
        att3d.load(folder)
    save_file({k: v.to(torch.float16) for k, v in state.items()}, str(weights))  # another precision: converted
    assert att3d.load(folder).field.mlp[0].weight.dtype == torch.float32


def test_conditioning_of_no_prompts_is_a_clear_error(model):
    from att3d.model import ModelConfigError
    from att3d.text.encoders import TextEmbedding

    with pytest.raises(ModelConfigError, match=r"^no prompts to embed \(an empty list\)$"):
        model.conditioning([])
    with pytest.raises(ModelConfigError, match="expected a list of prompts, got the string 'a red cube'"):
        model.conditioning("a red cube")
    empty = TextEmbedding(torch.zeros(0, 8, 384), torch.zeros(0, 8, dtype=torch.bool), torch.zeros(0, 384))
    with pytest.raises(ModelConfigError, match="no prompts to condition on"):
        model.conditioning(empty)


def test_saving_is_atomic_and_replaces_the_folder(model, tmp_path, monkeypatch):
    folder = _folder(model, tmp_path)
    (folder / "stale.txt").write_text("from an older save\n")
    model.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "model_config.json"]
    before = (folder / "model.safetensors").read_bytes()
    import att3d.model as model_module

    def broken(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(model_module, "save_json", broken)
    with pytest.raises(OSError, match=f"cannot write {folder}/model_config.json: No space left on device"):
        model.save_pretrained(folder)
    assert (folder / "model.safetensors").read_bytes() == before  # the old folder, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left
