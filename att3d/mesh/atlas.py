"""A fast UV atlas for extracted meshes: box-projection charts and shelf packing, vectorised in torch.

xatlas (:func:`att3d.mesh.texture.uv_unwrap`) builds beautiful charts but needs minutes for the
~10^5 triangles of a 128^3 extraction on a CPU; generation would spend almost all its time
there. Iso-surfaces of a field are smooth and their colour varies slowly, so a much simpler
atlas serves as well:

1. **Charts by dominant axis.** Every face is assigned to the axis direction
   (+x, -x, +y, -y, +z, -z) its normal is closest to; a few rounds of neighbour voting smooth
   the assignment (a face may only join a direction its normal makes an angle below ~70 degrees
   with), and the connected parts of each class are the charts.
2. **Orthographic projection.** A chart is projected along its axis. All its faces face that
   axis, so the projection never folds; it can still overlap itself globally (a spiral ramp).
3. **Shelf packing.** Chart bounding boxes (plus ``padding`` texels of gutter on every side)
   are packed in rows, tallest first, at the largest common scale (texels per world unit)
   that fits the texture.
4. **Overlap check.** The packed atlas is rasterized twice with the projection depth, once
   keeping the nearest and once the farthest layer; a chart whose two rasterizations disagree
   covers some texels twice. Such charts are split at their median depth and everything is
   packed again (after a few rounds, the remaining offenders are cut into single triangles,
   which cannot overlap).

The result has the same shape as :func:`att3d.mesh.texture.uv_unwrap`'s: vertices on chart
seams are split (``vmapping``), faces keep their order, uvs are in [0, 1] with ``v`` up.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from att3d.mesh.cleanup import connected_components, face_normals
from att3d.mesh.rasterize import rasterize_screen

#: The six chart directions, in class order.
AXES = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0],
                     [0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
# In-plane (u, v) of each direction as signed coordinate picks: the chart is seen from outside,
# not mirrored (u = right, v = up as seen looking along -axis).
_U = [(2, -1.0), (2, 1.0), (0, 1.0), (0, 1.0), (0, 1.0), (0, -1.0)]
_V = [(1, 1.0), (1, 1.0), (2, -1.0), (2, 1.0), (1, 1.0), (1, 1.0)]


class AtlasError(ValueError):
    """The mesh cannot be packed into the requested texture (too many charts for its texels)."""


def face_adjacency(faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of faces that share an edge.

    Args:
        faces: (F, 3) long.

    Returns:
        a, b: (E,) long face indices, each shared edge once (for a non-manifold edge, consecutive
        faces around it are paired).
    """
    F = faces.shape[0]
    if F == 0:
        empty = torch.zeros(0, dtype=torch.long, device=faces.device)
        return empty, empty
    e = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    e = torch.sort(e, dim=1).values
    n = int(faces.max()) + 1
    key = e[:, 0] * n + e[:, 1]
    order = torch.argsort(key)
    key = key[order]
    owner = torch.arange(F, device=faces.device).repeat_interleave(3)[order]
    same = key[1:] == key[:-1]
    return owner[:-1][same], owner[1:][same]


def chart_classes(verts: torch.Tensor, faces: torch.Tensor, smooth_iterations: int = 3,
                  min_dot: float = 0.35, neighbour_weight: float = 0.5) -> torch.Tensor:
    """Direction class (index into :data:`AXES`) of every face.

    Args:
        verts: (V, 3); faces: (F, 3) long.
        smooth_iterations: rounds of neighbour voting.
        min_dot: a face may only take a direction whose dot product with its unit normal exceeds
            this (keeps the projection far from degenerate; the best direction always exceeds
            1/sqrt(3) > ``min_dot``).
        neighbour_weight: weight of the fraction of edge-neighbours in a class against the dot.

    Returns:
        (F,) long classes in [0, 6).
    """
    axes = AXES.to(device=verts.device, dtype=verts.dtype)
    dots = face_normals(verts.detach(), faces) @ axes.T  # (F, 6)
    cls = dots.argmax(dim=1)
    if smooth_iterations <= 0 or faces.shape[0] == 0:
        return cls
    a, b = face_adjacency(faces)
    allowed = dots > min_dot
    allowed[torch.arange(cls.shape[0], device=cls.device), cls] = True
    for _ in range(smooth_iterations):
        votes = torch.zeros_like(dots)
        votes.index_put_((a, cls[b]), torch.ones_like(a, dtype=dots.dtype), accumulate=True)
        votes.index_put_((b, cls[a]), torch.ones_like(a, dtype=dots.dtype), accumulate=True)
        frac = votes / votes.sum(dim=1, keepdim=True).clamp(min=1.0)
        score = (dots + neighbour_weight * frac).masked_fill(~allowed, -math.inf)
        new = score.argmax(dim=1)
        if torch.equal(new, cls):
            break
        cls = new
    return cls


def project(points: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthographic projection along each point's chart direction.

    Args:
        points: (..., 3); cls: (...) long classes.

    Returns:
        uv: (..., 2) in-plane coordinates (world units); depth: (...) coordinate along the
        direction (larger = farther out).
    """
    comps = []
    for table in (_U, _V):
        idx = torch.tensor([t[0] for t in table], device=points.device)[cls]
        sign = torch.tensor([t[1] for t in table], device=points.device, dtype=points.dtype)[cls]
        comps.append(points.gather(-1, idx[..., None]).squeeze(-1) * sign)
    axes = AXES.to(device=points.device, dtype=points.dtype)[cls]
    return torch.stack(comps, dim=-1), (points * axes).sum(-1)


def shelf_pack(sizes: np.ndarray, size: int) -> np.ndarray | None:
    """Pack rectangles into a ``size x size`` square, in rows (shelves), in the given order.

    Args:
        sizes: (K, 2) int widths and heights in texels (sorted tallest first for a good packing).

    Returns:
        (K, 2) int top-left corners (x, y), or None if they do not fit.
    """
    pos = np.zeros_like(sizes)
    x = y = row_h = 0
    for i, (w, h) in enumerate(sizes.tolist()):
        if w > size:
            return None
        if x + w > size:
            y += row_h
            x, row_h = 0, 0
        if y + h > size:
            return None
        pos[i] = (x, y)
        x += w
        row_h = max(row_h, h)
    return pos


def _fit(ext: np.ndarray, size: int, pad: int, steps: int = 24) -> tuple[float, np.ndarray] | None:
    """Largest scale (bisection) at which boxes ``ceil(ext * scale) + 2 pad + 1`` shelf-pack, and their corners."""

    def place(scale: float) -> np.ndarray | None:
        return shelf_pack(np.ceil(ext * scale).astype(np.int64) + 2 * pad + 1, size)

    area = float(np.sum(ext[:, 0] * ext[:, 1]))
    longest = max(float(ext.max()) if ext.size else 0.0, 1e-12)
    # Upper bound: the charts' total area fills the square, and the longest side fits.
    hi = min(size / math.sqrt(max(area, 1e-12)), (size - 2 * pad - 1) / longest)
    if hi <= 0:
        return None
    pos = place(hi)
    if pos is not None:
        return hi, pos
    lo, best = 0.0, None
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        pos = place(mid)
        if pos is not None:
            lo, best = mid, (mid, pos)
        else:
            hi = mid
    return best


def _pack(extent: np.ndarray, size: int, padding: int) -> tuple[float, np.ndarray, int]:
    """Scale (texels per world unit), placement and gutter of the chart boxes.

    The gutter is ``padding`` unless a smaller one buys a much larger scale (small textures):
    the largest gutter whose scale is at least 80% of the best over all gutters is used.

    Args:
        extent: (K, 2) world-unit widths and heights of the charts.

    Returns:
        scale; corners (K, 2) top-left of each chart's box (gutter included), in the input order;
        the padding used.
    """
    order = np.argsort(-extent[:, 1], kind="stable")
    ext = extent[order]
    pads = [padding]
    while pads[-1] > 0:
        pads.append(pads[-1] // 2)
    fits = {pads[0]: _fit(ext, size, pads[0]), 0: _fit(ext, size, 0)}
    if fits[0] is None:
        raise AtlasError(f"{len(extent)} charts do not fit a {size}x{size} texture; use a larger texture")
    best = fits[0][0]  # no gutter: (about) the largest scale
    for pad in pads:
        if pad not in fits:
            fits[pad] = _fit(ext, size, pad)
        f = fits[pad]
        if f is not None and f[0] >= 0.8 * best:
            corners = np.zeros_like(f[1])
            corners[order] = f[1]
            return f[0], corners, pad
    raise AssertionError("unreachable")


def _layer_mismatch(xy: torch.Tensor, depth: torch.Tensor, faces: torch.Tensor, chart: torch.Tensor,
                    n_charts: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chart: texels whose nearest and farthest covering faces differ, and texels covered.

    Args:
        xy: (V', 2) texel coordinates; depth: (V',) projection depth; faces: (F, 3); chart: (F,).

    Returns:
        mismatch, covered: (K,) long counts.
    """
    offset = float(depth.abs().max()) + 1.0
    near = rasterize_screen(xy, offset - depth, faces, size).face_id[0]  # outermost layer
    far = rasterize_screen(xy, offset + depth, faces, size).face_id[0]  # innermost layer
    hit = near >= 0
    c = chart[near[hit]]
    covered = torch.zeros(n_charts, dtype=torch.long, device=xy.device).index_add(0, c, torch.ones_like(c))
    bad = (near[hit] != far[hit]).long()
    mismatch = torch.zeros(n_charts, dtype=torch.long, device=xy.device).index_add(0, c, bad)
    return mismatch, covered


def _components(faces: torch.Tensor, group: torch.Tensor, num_vertices: int) -> torch.Tensor:
    """(F,) connected parts of the faces of each group (faces of different groups never join)."""
    key = group[:, None] * num_vertices + faces
    _, inverse = torch.unique(key.reshape(-1), return_inverse=True)
    return connected_components(inverse.reshape(faces.shape), int(inverse.max()) + 1)


def box_atlas(verts: torch.Tensor, faces: torch.Tensor, size: int = 512, padding: int = 4,
              smooth_iterations: int = 3, max_rounds: int = 4,
              overlap_tolerance: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UV atlas by box-projection charts (see the module docstring).

    Args:
        verts: (V, 3) positions; faces: (F, 3) long (F >= 1).
        size: texture size the atlas is packed for (texels per side).
        padding: texels of gutter around every chart (half the gap between two charts).
        smooth_iterations: neighbour-voting rounds of :func:`chart_classes`.
        max_rounds: pack / check / split rounds before overlapping charts are cut into single faces.
        overlap_tolerance: a chart overlaps itself when more than this fraction of its texels
            (and at least 3) have two layers (exact ties on shared edges cause a few).

    Returns:
        vmapping: (V',) long input vertex of every output vertex; new_faces: (F, 3) long;
        uvs: (V', 2) float32 in [0, 1], ``v`` up. On the device of ``verts``.

    Raises:
        AtlasError: the charts do not fit at any scale (far more charts than texels).
    """
    device = verts.device
    faces = faces.to(device=device, dtype=torch.long)
    V, F = verts.shape[0], faces.shape[0]
    if F == 0:
        raise AtlasError("cannot build a UV atlas for a mesh without faces")
    v = verts.detach().to(torch.float64)
    cls = chart_classes(v, faces, smooth_iterations)
    # Charts: connected parts of each class (vertices duplicated per class so classes never join).
    chart = _components(faces, cls, V)
    centroid_depth = project(v[faces].mean(dim=1), cls)[1]  # (F,)
    for rnd in range(max_rounds + 1):
        K = int(chart.max()) + 1
        # Seam split: one output vertex per (chart, input vertex).
        key = chart[:, None] * V + faces  # (F, 3)
        uniq, inverse = torch.unique(key.reshape(-1), return_inverse=True)
        new_faces = inverse.reshape(F, 3)
        vmapping = uniq % V
        vchart = torch.div(uniq, V, rounding_mode="floor")
        vcls = torch.zeros(K, dtype=torch.long, device=device).index_put((chart,), cls)[vchart]
        uv, depth = project(v[vmapping], vcls)  # (V', 2), (V',)
        lo = torch.full((K, 2), math.inf, dtype=v.dtype, device=device).scatter_reduce(
            0, vchart[:, None].expand(-1, 2), uv, "amin")
        hi = torch.full((K, 2), -math.inf, dtype=v.dtype, device=device).scatter_reduce(
            0, vchart[:, None].expand(-1, 2), uv, "amax")
        extent = (hi - lo).cpu().numpy()
        scale, corners, pad = _pack(extent, size, padding)
        # Texel coordinates: x = column (u right), y = row (v up = smaller row). Flip v inside the box.
        corner_t = torch.as_tensor(corners, dtype=v.dtype, device=device)
        box_h = torch.as_tensor(np.ceil(extent[:, 1] * scale), dtype=v.dtype, device=device)
        local = (uv - lo[vchart]) * scale
        x = corner_t[vchart, 0] + pad + 0.5 + local[:, 0]
        y = corner_t[vchart, 1] + pad + 0.5 + (box_h[vchart] - local[:, 1])
        xy = torch.stack([x, y], dim=-1)
        if rnd == max_rounds:
            break
        mismatch, covered = _layer_mismatch(xy, depth, new_faces, chart, K, size)
        bad = mismatch > torch.clamp(overlap_tolerance * covered, min=3)
        if not bool(bad.any()):
            break
        face_bad = bad[chart]
        if rnd == max_rounds - 1:  # last resort: single-triangle charts never overlap
            idx = face_bad.nonzero().squeeze(1)
            chart = chart.clone()
            chart[idx] = K + torch.arange(idx.shape[0], device=device)
            # a chart whose every face was cut out is empty now: relabel so that every label has faces
            # (an empty chart's bounding box would be (inf, -inf) and fit nowhere)
            chart = torch.unique(chart, return_inverse=True)[1]
        else:  # split each offending chart at its median centroid depth
            med = torch.zeros(K, dtype=v.dtype, device=device)
            for k in bad.nonzero().squeeze(1).tolist():
                med[k] = centroid_depth[chart == k].median()
            upper = face_bad & (centroid_depth > med[chart])
            chart = torch.where(upper, chart + K, chart)
            # Halves need not be connected: relabel to connected parts again.
            chart = _components(faces, chart, V)
    uvs = torch.stack([xy[:, 0] / size, 1.0 - xy[:, 1] / size], dim=-1).to(torch.float32)
    return vmapping, new_faces, uvs
