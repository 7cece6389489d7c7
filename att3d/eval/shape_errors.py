"""Where an exported mesh's volume IoU goes: too much, too little, or turned.

Volume IoU alone cannot tell a cube whose faces bulge out from one whose corners are cut, or from a right cube
turned about the vertical axis. These functions split the error (shapes-world occupancies on the 64^3 voxel
centres of :mod:`att3d.world.metrics`, the world's +y up):

- :func:`volume_error_split`: the share of the prediction outside the truth (``excess``), the share of the truth
  the prediction misses (``shortfall``) and the volume ratio;
- :func:`best_azimuth`: the turn about +y that best aligns a mesh with the truth, and its IoU;
- :func:`slice_image`: a horizontal cut of both occupancies as an image (shared voxels grey, excess red,
  shortfall blue);
- :func:`offset_occupancy`, :func:`equivalent_offset`: how far the true surface must move outward (every face
  by the same distance) to hold a given volume, and what volume IoU such a surface scores: how sensitive each
  shape's IoU is to a uniform error in where its surface sits, in world units or in pixels of the prior
  (:func:`pixel_size`).

``python scripts/shape_errors.py --meshes EVAL/meshes --out DIR`` runs them over the GLBs that ``att3d eval model
--meshes`` wrote.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

from att3d.world import metrics
from att3d.world.render import voxel_centres

__all__ = ["best_azimuth", "equivalent_offset", "offset_occupancy", "pixel_size", "rotate_about_up", "slice_image",
           "volume_error_split"]


def volume_error_split(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Split the disagreement of two occupancies.

    Args:
        pred: (R, R, R) bool occupancy of the prediction.
        target: (R, R, R) bool occupancy of the truth (not empty).

    Returns:
        ``excess`` = |pred \\ target| / |pred| (0 for an empty prediction), ``shortfall`` = |target \\ pred| /
        |target|, ``volume_ratio`` = |pred| / |target|, and ``volume_iou``.
    """
    pred, target = pred.bool(), target.bool()
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(f"need two (R, R, R) grids, got {tuple(pred.shape)} and {tuple(target.shape)}")
    n_pred, n_target = int(pred.sum()), int(target.sum())
    if n_target == 0:
        raise ValueError("the target occupancy is empty")
    inter = int((pred & target).sum())
    return {"excess": (n_pred - inter) / n_pred if n_pred else 0.0, "shortfall": (n_target - inter) / n_target,
            "volume_ratio": n_pred / n_target, "volume_iou": inter / (n_pred + n_target - inter)}


def rotate_about_up(verts: torch.Tensor, degrees: float) -> torch.Tensor:
    """Turn points about the +y axis (right-handed: +x towards -z for a positive angle). (V, 3) -> (V, 3)."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    rot = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=verts.dtype, device=verts.device)
    return verts @ rot.T


def best_azimuth(verts: torch.Tensor, faces: torch.Tensor, target: torch.Tensor,
                 angles: Sequence[float] = tuple(range(-45, 46, 3))) -> dict[str, float]:
    """The turn about +y that makes a closed mesh overlap the truth most.

    Args:
        verts: (V, 3) float vertices; faces: (F, 3) long indices of a closed mesh.
        target: (R, R, R) bool occupancy of the truth on :func:`att3d.world.metrics.mesh_occupancy`'s grid.
        angles: the turns tried, in degrees (keep 0 among them to compare with the mesh as it is).

    Returns:
        ``angle`` (degrees; :func:`rotate_about_up` by it aligns the mesh), ``volume_iou`` at that angle and
        ``volume_iou_as_is`` (at 0 degrees, or nan when 0 is not tried).
    """
    ious = []
    for a in angles:
        occ = metrics.mesh_occupancy(rotate_about_up(verts, float(a)), faces, target.shape[0])
        ious.append(metrics.volume_iou(occ, target))
    best = int(np.argmax(ious))
    as_is = ious[list(angles).index(0)] if 0 in angles else float("nan")
    return {"angle": float(angles[best]), "volume_iou": float(ious[best]), "volume_iou_as_is": float(as_is)}


def slice_image(pred: torch.Tensor, target: torch.Tensor, y_index: int | None = None, scale: int = 4) -> np.ndarray:
    """A horizontal cut (constant y) of two occupancies as an RGB image.

    Args:
        pred, target: (R, R, R) bool occupancies indexed ``[ix, iy, iz]``.
        y_index: the voxel layer (default: the middle one).
        scale: pixels per voxel.

    Returns:
        (R * scale, R * scale, 3) uint8, rows along z and columns along x: white outside both, grey where both
        hold the voxel, red where only the prediction does (excess), blue where only the truth does (shortfall).
    """
    pred, target = pred.bool(), target.bool()
    y = pred.shape[1] // 2 if y_index is None else int(y_index)
    p, t = pred[:, y, :].T.numpy(), target[:, y, :].T.numpy()  # (z, x)
    img = np.full(p.shape + (3,), 255, dtype=np.uint8)
    img[p & t] = (150, 150, 150)
    img[p & ~t] = (220, 40, 40)
    img[~p & t] = (40, 80, 220)
    return img.repeat(scale, axis=0).repeat(scale, axis=1)


def pixel_size(resolution: int, radius: float | None = None, fov_deg: float | None = None) -> float:
    """World units per pixel at the origin's depth in a ``resolution``-pixel image of the world's camera.

    Args:
        resolution: image height = width (the shapes prior's is 32).
        radius, fov_deg: the camera's distance and vertical field of view (default: the world's, 2.2 and 40).

    Returns:
        ``2 radius tan(fov / 2) / resolution`` (0.050 at 32 px).
    """
    from att3d.render.cameras import DEFAULT_FOV_DEG, DEFAULT_RADIUS

    radius = DEFAULT_RADIUS if radius is None else float(radius)
    fov_deg = DEFAULT_FOV_DEG if fov_deg is None else float(fov_deg)
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    return 2.0 * radius * math.tan(math.radians(fov_deg) / 2.0) / resolution


@functools.lru_cache(maxsize=16)
def _voxel_sdf(shape: str, resolution: int) -> torch.Tensor:
    """(R, R, R) a shape's signed distance on the metric's voxel centres (cached: it depends on the shape alone;
    do not modify the returned tensor)."""
    from att3d.world.shapes import SDFS

    return SDFS[shape](voxel_centres(resolution))


def offset_occupancy(obj, offset: float, resolution: int = metrics.VOXEL_RESOLUTION) -> torch.Tensor:
    """(R, R, R) bool: the voxel centres where ``obj``'s signed distance is below ``offset``.

    For the exact SDFs (sphere, cube, cylinder, cone, torus, capsule) that is the true surface moved ``offset``
    along its normals (rounded at convex edges); for the pyramid and the octahedron, whose SDF is the largest
    face-plane distance, every face plane moved by ``offset`` (corners stay sharp). ``offset`` > 0 grows the
    object; 0 gives :func:`att3d.world.metrics.ground_truth_occupancy`.
    """
    return _voxel_sdf(obj.shape, int(resolution)) < float(offset)


def equivalent_offset(obj, volume_ratio: float, resolution: int = metrics.VOXEL_RESOLUTION,
                      limit: float = 0.25, iterations: int = 40) -> float:
    """The uniform outward offset of ``obj``'s surface at which it holds ``volume_ratio`` times its true volume.

    The voxel count of :func:`offset_occupancy` grows with the offset, so the offset is found by bisection in
    ``[-limit, limit]`` (world units); it is resolved to the spacing at which the voxel count changes.

    Args:
        obj: a shapes-world object; volume_ratio: > 0, e.g. a mesh's ``|pred| / |truth|``.

    Returns:
        the offset in world units (> 0: larger than the truth), clamped to ``[-limit, limit]``.
    """
    if not volume_ratio > 0:
        raise ValueError(f"volume_ratio must be > 0, got {volume_ratio}")
    sdf = _voxel_sdf(obj.shape, int(resolution))
    target = volume_ratio * float((sdf < 0).sum())
    lo, hi = -float(limit), float(limit)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if float((sdf < mid).sum()) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
