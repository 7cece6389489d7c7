"""The one video writer (att3d.infer.video): frame count, GIF fallback, atomic and interrupt-safe writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from att3d.infer import video


def ramp_frames(count: int = 13, height: int = 33, width: int = 34) -> torch.Tensor:
    """Random frames whose red channel ramps over time (each frame distinct, order visible)."""
    frames = torch.rand(count, height, width, 3, generator=torch.Generator().manual_seed(0))
    frames[:, :, :, 0] = torch.linspace(0, 1, count)[:, None, None]
    return frames


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_video_has_the_asked_frame_count(tmp_path, suffix):
    path = video.write_video(ramp_frames(), tmp_path / f"video{suffix}", fps=10)
    assert path == tmp_path / f"video{suffix}" and path.is_file()
    back = video.read_video(path)
    assert back.shape[0] == 13 and back.shape[3] == 3
    assert back.shape[1] >= 33 and back.shape[2] >= 34  # odd sizes padded for H.264
    red = back[:, :33, :34, 0].reshape(13, -1).mean(1)  # frames in order, none dropped or duplicated
    assert (np.diff(red) > 0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


def test_uint8_and_float_frames_give_the_same_file_content(tmp_path):
    frames = ramp_frames(4, 8, 8)
    a = video.read_video(video.write_video(frames, tmp_path / "float.gif"))
    b = video.read_video(video.write_video(video.to_uint8(frames), tmp_path / "uint8.gif"))
    assert np.array_equal(a, b)


def test_odd_sizes_are_padded_with_the_edge():
    frames = np.zeros((2, 3, 5, 3), np.uint8)
    frames[:, -1, :, 1] = 200
    padded = video.pad_even(frames)
    assert padded.shape == (2, 4, 6, 3)
    assert (padded[:, -1, :5, 1] == 200).all() and np.array_equal(padded[:, :3, :5], frames)
    assert video.pad_even(np.zeros((1, 4, 6, 3), np.uint8)).shape == (1, 4, 6, 3)


def test_without_ffmpeg_a_gif_is_written_beside_the_mp4(tmp_path, monkeypatch):
    import imageio.v2 as imageio

    def no_ffmpeg(*args, **kwargs):
        raise RuntimeError("no ffmpeg here")

    monkeypatch.setattr(imageio, "get_writer", no_ffmpeg)
    path = video.write_video(ramp_frames(5, 8, 8), tmp_path / "turntable.mp4")
    assert path == tmp_path / "turntable.gif" and video.read_video(path).shape[0] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["turntable.gif"]


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import imageio.v2 as imageio

    path = tmp_path / "clip.gif"
    video.write_video(ramp_frames(3, 8, 8), path)
    before = path.read_bytes()

    def interrupted(tmp, *args, **kwargs):
        with open(tmp, "wb") as f:
            f.write(b"GIF89a half a video")
        raise KeyboardInterrupt

    monkeypatch.setattr(imageio, "mimsave", interrupted)
    with pytest.raises(KeyboardInterrupt):
        video.write_video(ramp_frames(5, 8, 8), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif"]


@pytest.mark.parametrize("shape", [(0, 8, 8, 3), (4, 8, 8), (4, 8, 8, 4)])
def test_bad_frames_are_a_clear_error(tmp_path, shape):
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        video.write_video(np.zeros(shape, np.uint8), tmp_path / "bad.mp4")
    assert not any(tmp_path.iterdir())
