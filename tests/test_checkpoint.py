"""Atomic, pickle-free checkpoint files."""

from __future__ import annotations

import pytest
import torch

from att3d.utils.checkpoint import (
    CheckpointError,
    atomic_write,
    load_json,
    load_state,
    load_tensors,
    save_json,
    save_state,
    save_tensors,
)


def test_tensor_round_trip(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_tensors(tmp_path / "x.safetensors", t)
    back = load_tensors(tmp_path / "x.safetensors")
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])


def test_truncated_file_names_the_file(tmp_path):
    p = tmp_path / "x.safetensors"
    save_tensors(p, {"a": torch.randn(100)})
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="x.safetensors"):
        load_tensors(p)


def test_failed_write_leaves_the_old_file(tmp_path):
    p = tmp_path / "meta.json"
    save_json(p, {"step": 1})

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("{half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(p, broken)
    assert load_json(p) == {"step": 1}
    assert [q.name for q in tmp_path.iterdir()] == ["meta.json"]  # no temporary left behind


def test_optimizer_state_loads_without_pickled_code(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_state(tmp_path / "opt.pt", opt.state_dict())
    state = load_state(tmp_path / "opt.pt")
    opt2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    opt2.load_state_dict(state)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_pickled_object_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_state(tmp_path / "evil.pt")
