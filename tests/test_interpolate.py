"""Prompt interpolation: exact end points of the path, slerp vs linear, videos, smoothness and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _tiny import tiny_config

from att3d import cli
from att3d.infer import interpolate as interp
from att3d.infer.video import read_video
from att3d.model import AmortizedModel
from att3d.render.cameras import OrbitCameras
from att3d.text.encoders import TextEmbedding

TINY_CONFIG = tiny_config(12)
PROMPTS = ["a red cube", "a blue sphere", "a green torus"]


@pytest.fixture(scope="module")
def model() -> AmortizedModel:
    torch.manual_seed(0)
    return AmortizedModel(TINY_CONFIG).eval()


@pytest.fixture(scope="module")
def emb(model) -> TextEmbedding:
    return model.embed(PROMPTS)


def _equal(a: TextEmbedding, b: TextEmbedding) -> bool:
    return torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask) and torch.equal(a.pooled, b.pooled)


@pytest.mark.parametrize("mode", interp.MODES)
@pytest.mark.parametrize("frames", [7, 10, 60])
def test_path_hits_every_prompt_exactly(emb, mode, frames):
    path = interp.embedding_path(emb, frames, mode)
    assert path.tokens.shape == (frames, *emb.tokens.shape[1:]) and path.mask.shape == (frames, emb.mask.shape[1])
    assert path.pooled.shape == (frames, emb.pooled.shape[1])
    knots = interp.knot_frames(3, frames)
    assert knots[0] == 0 and knots[-1] == frames - 1 and len(set(knots)) == 3
    for i, f in enumerate(knots):
        assert _equal(path.index([f]), emb.index([i])), (mode, frames, f)
    # In between: a new embedding, different from both neighbours, with the union of their masks.
    mid = (knots[0] + knots[1]) // 2
    assert not torch.equal(path.tokens[mid], emb.tokens[0]) and not torch.equal(path.tokens[mid], emb.tokens[1])
    assert torch.equal(path.mask[mid], emb.mask[0] | emb.mask[1])
    assert torch.isfinite(path.tokens).all() and torch.isfinite(path.pooled).all()


def test_two_prompt_path_ends(emb):
    ab = emb.index([0, 1])
    path = interp.embedding_path(ab, 60, "slerp")
    assert _equal(path.index([0]), ab.index([0])) and _equal(path.index([59]), ab.index([1]))


def test_slerp_and_linear_agree_at_the_ends_and_differ_in_the_middle(emb):
    ab = emb.index([0, 1])
    lin = interp.embedding_path(ab, 9, "linear")
    sph = interp.embedding_path(ab, 9, "slerp")
    for f in (0, 8):
        assert _equal(lin.index([f]), sph.index([f]))
    diff = (lin.tokens[4] - sph.tokens[4]).abs().max()
    assert diff > 1e-3
    # slerp keeps the norms (linearly interpolated), linear cuts the chord: its middle vectors are shorter.
    real = ab.mask[0] & ab.mask[1]
    n_a, n_b = ab.tokens[0].norm(dim=-1), ab.tokens[1].norm(dim=-1)
    n_sph, n_lin = sph.tokens[4].norm(dim=-1), lin.tokens[4].norm(dim=-1)
    torch.testing.assert_close(n_sph[real], 0.5 * (n_a + n_b)[real], rtol=1e-4, atol=1e-4)
    assert (n_lin[real] < n_sph[real] - 1e-4).all()
    # pooled MiniLM vectors are unit vectors: slerp keeps them on the sphere
    torch.testing.assert_close(sph.pooled.norm(dim=-1), torch.ones(9), rtol=1e-5, atol=1e-5)
    assert (lin.pooled[4].norm() < 0.999)


def test_slerp_values_and_fallbacks():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    half = interp.slerp(a, b, torch.tensor([[0.5]]))
    torch.testing.assert_close(half, torch.tensor([[1.5 * math.sqrt(0.5), 1.5 * math.sqrt(0.5)]]))
    third = interp.slerp(a, b, torch.tensor([[1 / 3]]))  # angle 30 degrees, norm 4/3
    torch.testing.assert_close(third, (4 / 3) * torch.tensor([[math.cos(math.pi / 6), math.sin(math.pi / 6)]]))
    # zero vector (a padded token) and parallel vectors: linear interpolation, never NaN
    z = torch.zeros(1, 2)
    t = torch.tensor([[0.25]])
    torch.testing.assert_close(interp.slerp(z, b, t), interp.lerp(z, b, t))
    torch.testing.assert_close(interp.slerp(a, 3 * a, t), interp.lerp(a, 3 * a, t))
    torch.testing.assert_close(interp.slerp(a, -a, t), interp.lerp(a, -a, t))
    assert torch.isfinite(interp.slerp(z, z, t)).all()


def test_path_rejects_bad_arguments(emb):
    with pytest.raises(ValueError, match="at least 2"):
        interp.embedding_path(emb.index([0]), 5)
    with pytest.raises(ValueError, match="frames"):
        interp.embedding_path(emb, 2)
    with pytest.raises(ValueError, match="mode"):
        interp.embedding_path(emb, 5, "cubic")


def test_render_interpolation_starts_at_the_first_prompt(model):
    frames = interp.render_interpolation(model, PROMPTS[:2], frames=5, resolution=12, orbit=True, batch_size=2,
                                         progress=False)
    assert frames.shape == (5, 12, 12, 3) and frames.min() >= 0 and frames.max() <= 1
    with torch.no_grad():
        direct = model.renderer.render_chunked(model.field, model.conditioning(PROMPTS[1:2]),
                                               OrbitCameras.from_angles([2 * math.pi * 4 / 5], math.radians(20)),
                                               12)["rgb"][0]
    torch.testing.assert_close(frames[4], direct, atol=1e-5, rtol=1e-5)
    still = interp.render_interpolation(model, [PROMPTS[0], PROMPTS[0]], frames=3, resolution=12, orbit=False,
                                        progress=False)
    torch.testing.assert_close(still[0], still[2])  # same prompt, same camera
    assert not torch.allclose(frames[0], frames[4], atol=1e-3)


def test_smoothness_measures_the_change_along_the_path(model):
    same = interp.smoothness(model, [PROMPTS[0], PROMPTS[0]], frames=4, occupancy_resolution=16,
                             render_resolution=12, threshold=0.5)
    assert same["iou_min"] == 1.0 and same["colour_change_max"] == pytest.approx(0.0, abs=1e-6)
    assert len(same["iou_steps"]) == 3
    moved = interp.smoothness(model, PROMPTS, frames=5, occupancy_resolution=16, render_resolution=12,
                              threshold=0.5, return_renders=True)
    assert len(moved["iou_steps"]) == 4 and len(moved["colour_steps"]) == 4 and len(moved["occupancy"]) == 5
    assert moved["colour_change_max"] > 0 and moved["colour_change_max"] >= moved["colour_change_mean"]
    assert 0 <= moved["iou_min"] <= moved["iou_mean"] <= 1
    assert moved["renders"].shape == (5, 12, 12, 3)
    json.dumps({k: v for k, v in moved.items() if k != "renders"})


def test_cli_interpolate_writes_what_it_lists(model, tmp_path, capsys):
    ckpt = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "anim"
    rc = cli.main(["interpolate", *PROMPTS, "--frames", "6", "--out", str(out), "--checkpoint", str(ckpt),
                   "--resolution", "16", "--fps", "12", "--device", "cpu", "--mode", "slerp"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    video = out / "interpolation.mp4"
    assert f"wrote {video} (6 frames" in printed
    assert read_video(video).shape[:3] == (6, 16, 16)
    info = json.loads((out / "interpolation.json").read_text())
    assert info["prompts"] == PROMPTS and info["frames"] == 6 and info["mode"] == "slerp"
    assert info["knot_frames"] == [0, 2, 5] and info["files"] == ["interpolation.mp4"]


def test_cli_interpolate_meshes(model, tmp_path, capsys):
    pytest.importorskip("att3d.infer.generate")
    ckpt = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "anim"
    rc = cli.main(["interpolate", *PROMPTS[:2], "--frames", "3", "--out", str(out), "--checkpoint", str(ckpt),
                   "--resolution", "8", "--device", "cpu", "--meshes", "--mesh-resolution", "16",
                   "--texture-size", "64", "--mesh-format", "ply", "--threshold", "1.0"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    info = json.loads((out / "interpolation.json").read_text())
    meshes = [f for f in info["files"] if f.startswith("meshes/")]
    assert [m for m in meshes if m.endswith(".ply")] == [f"meshes/frame_{i:03d}.ply" for i in range(3)]
    for f in info["files"]:
        assert (out / f).is_file()


def test_cli_interpolate_user_errors(model, tmp_path, capsys):
    ckpt = model.save_pretrained(tmp_path / "model")
    assert cli.main(["interpolate", "a red cube", "--checkpoint", str(ckpt), "--out", str(tmp_path)]) == 2
    assert "at least 2 prompts" in capsys.readouterr().err
    assert cli.main(["interpolate", "a red cube", "a blue cube", "--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"att3d: error: model not found: {tmp_path / 'nope'}") and err.count("\n") == 1
    assert cli.main(["interpolate", *PROMPTS, "--frames", "2", "--checkpoint", str(ckpt)]) == 2
