"""Prompt interpolation: objects along paths between prompts' text embeddings (ATT3D, section 3.3).

An amortized model maps *any* text embedding to a field, so a path through the embeddings of
K >= 2 prompts becomes an animation in one batched forward pass per chunk of frames, with no
per-frame optimisation::

    att3d interpolate "a red cube" "a blue sphere" "a green torus" --frames 60 --out anim/

- :func:`embedding_path`: the piecewise path (linear or per-token spherical) through K embeddings;
  frame 0 is exactly the first prompt's embedding, the last frame exactly the last prompt's, and
  every intermediate prompt sits exactly on its knot frame.
- :func:`render_interpolation`: the frames of the animation (F, H, W, 3), the camera orbiting while
  the object morphs.
- :func:`smoothness`: how much consecutive frames differ (volume IoU of consecutive occupancies,
  colour change from a fixed view): the measure of ATT3D's claim that interpolation training makes
  in-between prompts meaningful.
- videos of the frames: :func:`att3d.infer.video.write_video`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from att3d.infer.video import to_uint8
from att3d.text.encoders import TextEmbedding
from att3d.utils.errors import Att3dError

log = logging.getLogger(__name__)

MODES = ("linear", "slerp")
#: Below this norm (or sine of the angle) slerp falls back to linear interpolation.
SLERP_EPS = 1e-4


# ---------------------------------------------------------------------------------------------------------------
# The path through embeddings
# ---------------------------------------------------------------------------------------------------------------

def knot_frames(num_prompts: int, frames: int) -> list[int]:
    """Frame index of each prompt on a path of ``frames`` frames: ``round(i (F - 1) / (K - 1))``, i = 0..K-1.

    The first is 0 and the last ``frames - 1``; they are distinct when ``frames >= num_prompts``.
    """
    if num_prompts < 2:
        raise ValueError(f"an interpolation needs at least 2 prompts, got {num_prompts}")
    if frames < num_prompts:
        raise ValueError(f"{frames} frames cannot hold {num_prompts} prompts (need frames >= prompts)")
    return [int(round(i * (frames - 1) / (num_prompts - 1))) for i in range(num_prompts)]


def path_weights(num_prompts: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each frame lies on the piecewise path.

    Returns:
        segment: (F,) long, the segment ``s`` (between prompts s and s + 1) of each frame;
        t: (F,) float64 in [0, 1], the position inside the segment; exactly 0 on a knot frame
        (exactly 1 on the last frame), so knots reproduce the prompts' embeddings bit for bit.
    """
    knots = knot_frames(num_prompts, frames)
    seg = torch.zeros(frames, dtype=torch.long)
    t = torch.zeros(frames, dtype=torch.float64)
    for s in range(num_prompts - 1):
        a, b = knots[s], knots[s + 1]
        for f in range(a, b + 1):
            seg[f] = s
            t[f] = (f - a) / (b - a)
    return seg, t


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Linear interpolation ``(1 - t) a + t b``; a, b: (..., D), t broadcastable (..., 1)."""
    return (1 - t) * a + t * b


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, eps: float = SLERP_EPS) -> torch.Tensor:
    """Spherical interpolation of vectors along the last dimension, with linearly interpolated norms.

    The direction moves along the great circle from ``a / |a|`` to ``b / |b|`` while the norm goes
    linearly from ``|a|`` to ``|b|``. Where a vector is (near) zero, e.g. a padded token, or the two are
    (anti)parallel within ``eps``, the result is the linear interpolation instead (no NaN).

    Args:
        a, b: (..., D) vectors.
        t: (..., 1) (or broadcastable) positions in [0, 1].

    Returns:
        (..., D) interpolated vectors.
    """
    na = a.norm(dim=-1, keepdim=True)
    nb = b.norm(dim=-1, keepdim=True)
    ua = a / na.clamp(min=eps)
    ub = b / nb.clamp(min=eps)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    ok = (na > eps) & (nb > eps) & (sin > eps)
    safe_sin = torch.where(ok, sin, torch.ones_like(sin))
    direction = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / safe_sin
    spherical = direction * ((1 - t) * na + t * nb)
    return torch.where(ok, spherical, lerp(a, b, t))


def embedding_path(emb: TextEmbedding, frames: int, mode: str = "linear") -> TextEmbedding:
    """A piecewise path through K prompts' embeddings, sampled at ``frames`` frames.

    Frames are spread evenly over the K - 1 segments (:func:`knot_frames`). Inside a segment, tokens
    (per token vector) and pooled vectors are interpolated linearly or spherically (:func:`slerp`);
    the mask of an in-between frame is the union of its two prompts' masks. A knot frame is a copy of
    its prompt's embedding (tokens, pooled and mask), so the path starts exactly at the first prompt
    and ends exactly at the last.

    Args:
        emb: the K >= 2 prompts' embeddings: tokens (K, L, D), mask (K, L), pooled (K, D).
        frames: F >= K.
        mode: ``linear`` (the mixtures that ATT3D's interpolation training sees) or ``slerp``.

    Returns:
        TextEmbedding of F frames: tokens (F, L, D), mask (F, L), pooled (F, D).
    """
    if mode not in MODES:
        raise ValueError(f"unknown interpolation mode {mode!r}; choose one of {MODES}")
    k = len(emb)
    seg, t = path_weights(k, frames)
    seg = seg.to(emb.tokens.device)
    a, b = emb.index(seg), emb.index(seg + 1)
    t = t.to(device=emb.tokens.device, dtype=emb.tokens.dtype)
    fn = lerp if mode == "linear" else slerp
    tokens = fn(a.tokens, b.tokens, t[:, None, None])
    pooled = fn(a.pooled, b.pooled, t[:, None])
    mask = a.mask | b.mask
    # Knots are copies, not results of arithmetic: exact end points whatever the mode.
    at_a = (t == 0)
    at_b = (t == 1)
    tokens = torch.where(at_a[:, None, None], a.tokens, torch.where(at_b[:, None, None], b.tokens, tokens))
    pooled = torch.where(at_a[:, None], a.pooled, torch.where(at_b[:, None], b.pooled, pooled))
    mask = torch.where(at_a[:, None], a.mask, torch.where(at_b[:, None], b.mask, mask))
    return TextEmbedding(tokens, mask, pooled)


# ---------------------------------------------------------------------------------------------------------------
# Rendering and measuring the path
# ---------------------------------------------------------------------------------------------------------------

def _prompts_path(model, prompts: Sequence[str], frames: int, mode: str) -> TextEmbedding:
    from att3d.text.prompts import normalize_prompts

    prompts = normalize_prompts(list(prompts))  # one normalisation for every prompt: empty ones are errors
    if len(prompts) < 2:
        raise Att3dError(f"an interpolation needs at least 2 prompts, got {len(prompts)}")
    if frames < len(prompts):
        raise Att3dError(f"--frames {frames} is fewer than the {len(prompts)} prompts")
    if mode not in MODES:
        raise Att3dError(f"unknown interpolation mode {mode!r}; choose one of {', '.join(MODES)}")
    return embedding_path(model.embed(prompts), frames, mode)


def _cameras(frames: int, elevation_deg: float, orbit: bool, azimuth_deg: float, device):
    from att3d.render.cameras import OrbitCameras

    start = math.radians(azimuth_deg)
    if orbit:
        phi = start + torch.arange(frames, dtype=torch.float32) * (2.0 * math.pi / frames)
    else:
        phi = torch.full((frames,), start)
    return OrbitCameras.from_angles(phi, math.radians(elevation_deg), device=device)


@torch.no_grad()
def render_interpolation(model, prompts: Sequence[str], frames: int = 60, mode: str = "linear",
                         resolution: int = 128, elevation_deg: float = 20.0, orbit: bool = True,
                         azimuth_deg: float = 0.0, batch_size: int = 8, background=(1.0, 1.0, 1.0),
                         progress: bool = True) -> torch.Tensor:
    """Render the objects along the path through ``prompts``, one frame each.

    The camera makes one full orbit over the animation (``orbit``) or stays at ``azimuth_deg``.
    Frames are generated and rendered ``batch_size`` at a time (one mapping forward pass and one
    batched, chunked render per batch).

    Args:
        model: an amortized model (``att3d.load``).
        prompts: K >= 2 prompts, visited in order.
        frames: F >= K.
        mode: ``linear`` or ``slerp`` (see :func:`embedding_path`).
        resolution: H = W of the frames.

    Returns:
        (F, H, W, 3) float frames in [0, 1] on the CPU.
    """
    from tqdm import tqdm

    model.eval()
    path = _prompts_path(model, prompts, frames, mode)
    cams = _cameras(frames, elevation_deg, orbit, azimuth_deg, model.device)
    out = []
    for s in tqdm(range(0, frames, batch_size), disable=not progress, desc="interpolate", dynamic_ncols=True):
        idx = torch.arange(s, min(frames, s + batch_size), device=model.device)
        cond = model.conditioning(path.index(idx))
        rgb = model.renderer.render_chunked(model.field, cond, cams.index(idx), resolution, background=background)
        out.append(rgb["rgb"].clamp(0, 1).cpu())
    return torch.cat(out)


@torch.no_grad()
def smoothness(model, prompts: Sequence[str], frames: int = 30, mode: str = "linear",
               occupancy_resolution: int = 64, render_resolution: int = 64, azimuth_deg: float = 45.0,
               elevation_deg: float = 20.0, threshold: float | None = None, batch_size: int = 8,
               return_renders: bool = False, progress: bool = False) -> dict[str, Any]:
    """How smoothly the objects change along the path through ``prompts``.

    Between every pair of consecutive frames f, f + 1 it measures the volume IoU of their occupancies
    (density above the extraction threshold on the ``occupancy_resolution``^3 voxel centres, as
    :func:`att3d.world.metrics.field_occupancy`) and the mean absolute colour change of renders from
    one fixed view (all pixels, background included). A smooth path has IoU near 1 and a small colour
    change at every step; a jumpy one has a bad worst step.

    Returns:
        dict with ``iou_mean``, ``iou_min`` (worst step), ``colour_change_mean``, ``colour_change_max``
        (worst step), per-step lists ``iou_steps`` and ``colour_steps`` (F - 1 each), ``occupancy`` (F,
        occupied fraction per frame), ``frames``, ``mode``, ``prompts``; with ``return_renders`` also
        ``renders`` (F, H, W, 3) tensor of the fixed view.
    """
    from tqdm import tqdm

    from att3d.world.metrics import field_occupancy, volume_iou_batch

    model.eval()
    path = _prompts_path(model, prompts, frames, mode)
    cams = _cameras(frames, elevation_deg, False, azimuth_deg, model.device)
    occs, rgbs = [], []
    for s in tqdm(range(0, frames, batch_size), disable=not progress, desc="smoothness", dynamic_ncols=True):
        idx = torch.arange(s, min(frames, s + batch_size), device=model.device)
        cond = model.conditioning(path.index(idx))
        occs.append(field_occupancy(model, cond, occupancy_resolution, threshold))
        rgbs.append(model.renderer.render_chunked(model.field, cond, cams.index(idx), render_resolution)["rgb"]
                    .clamp(0, 1).cpu())
    occ = torch.cat(occs)  # (F, R, R, R)
    rgb = torch.cat(rgbs)  # (F, H, W, 3)
    iou = volume_iou_batch(occ[:-1], occ[1:])
    colour = (rgb[1:] - rgb[:-1]).abs().mean(dim=(1, 2, 3))
    result: dict[str, Any] = {
        "prompts": list(prompts), "frames": frames, "mode": mode,
        "iou_mean": float(iou.mean()), "iou_min": float(iou.min()),
        "colour_change_mean": float(colour.mean()), "colour_change_max": float(colour.max()),
        "iou_steps": [float(v) for v in iou], "colour_steps": [float(v) for v in colour],
        "occupancy": [float(v) for v in occ.flatten(1).float().mean(1)],
    }
    if return_renders:
        result["renders"] = rgb
    return result


# ---------------------------------------------------------------------------------------------------------------
# Frame strips
# ---------------------------------------------------------------------------------------------------------------

def frame_strip(frames: torch.Tensor | np.ndarray, count: int = 8) -> np.ndarray:
    """``count`` evenly spaced frames side by side (always including the first and last): (H, count W, 3) uint8."""
    arr = to_uint8(frames)
    idx = np.unique(np.round(np.linspace(0, len(arr) - 1, min(count, len(arr)))).astype(int))
    return np.concatenate(list(arr[idx]), axis=1)


# ---------------------------------------------------------------------------------------------------------------
# Meshes along the path
# ---------------------------------------------------------------------------------------------------------------

def export_frame_meshes(model, prompts: Sequence[str], frames: int, mode: str, out_dir: str | Path,
                        grid_resolution: int = 128, texture_size: int = 512, format: str = "glb",
                        threshold: float | None = None, batch_size: int = 4, progress: bool = True) -> list[Path]:
    """A textured mesh per frame of the path (``out_dir/frame_000.glb``, ...), via :mod:`att3d.mesh.extract`.

    A frame whose field has no surface (density never above the extraction threshold) gets no file
    (a warning says so).

    Returns:
        the files written.
    """
    from tqdm import tqdm

    from att3d.mesh.export import export_mesh
    from att3d.mesh.extract import is_empty, meshes_from_conditioning

    path = _prompts_path(model, prompts, frames, mode)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for s in tqdm(range(0, frames, batch_size), disable=not progress, desc="meshes", dynamic_ncols=True):
        idx = torch.arange(s, min(frames, s + batch_size), device=model.device)
        with torch.no_grad():
            cond = model.conditioning(path.index(idx))
        meshes = meshes_from_conditioning(model, cond, grid_resolution=grid_resolution, threshold=threshold,
                                          texture_size=texture_size)
        for i, mesh in zip(idx.tolist(), meshes):
            if is_empty(mesh):
                reason = mesh.metadata.get("att3d", {}).get("reason", "empty mesh")
                log.warning("frame %d: no mesh written (%s)", i, reason)
                continue
            written += export_mesh(mesh, out_dir / f"frame_{i:03d}.{format}", format=format)
    return written

