"""Multi-resolution grid encodings in pure torch: dense levels and Instant-NGP hash levels.

Conventions shared by every function here:

- Points are normalised to ``[-1, 1]^3`` (see :func:`normalize_points`); a level of
  resolution ``R`` has ``R`` vertices per axis at ``-1 + 2 i / (R - 1)``, ``i = 0..R-1``
  (``align_corners=True``), so the corner vertices sit exactly on the box faces.
- A dense level is stored as a volume ``(B, F, R, R, R)`` indexed ``[b, f, ix, iy, iz]``
  (x first, the same order as :func:`att3d.world.render.voxel_centres`).
- A hash level is a table ``(B, T, F)``; vertex ``(ix, iy, iz)`` lives in row
  ``(ix * 1 ^ iy * 2654435761 ^ iz * 805459861) mod T`` (Instant-NGP's spatial hash).
- A batch dimension of 1 in a grid or table means one grid shared by all ``B`` point sets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: Instant-NGP's spatial hash primes (the first is 1 so that x stays coherent in memory).
HASH_PRIMES: tuple[int, int, int] = (1, 2654435761, 805459861)

# The 8 corners of a cell as (8, 3) integer offsets, x varying slowest.
_CORNERS = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=torch.long)


def level_resolutions(num_levels: int, base_resolution: int, max_resolution: int) -> list[int]:
    """Geometric series of grid resolutions from ``base_resolution`` to ``max_resolution`` (inclusive).

    >>> level_resolutions(3, 8, 32)
    [8, 16, 32]
    """
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")
    if base_resolution < 2 or max_resolution < base_resolution:
        raise ValueError(f"need 2 <= base_resolution <= max_resolution, got {base_resolution}, {max_resolution}")
    if num_levels == 1:
        return [int(base_resolution)]
    growth = math.exp((math.log(max_resolution) - math.log(base_resolution)) / (num_levels - 1))
    return [int(round(base_resolution * growth**i)) for i in range(num_levels)]


def normalize_points(points: torch.Tensor, bound: float) -> torch.Tensor:
    """Map points of the box ``[-bound, bound]^3`` to ``[-1, 1]^3``. (..., 3) -> (..., 3)."""
    return points / bound


def inside_box(points: torch.Tensor, bound: float) -> torch.Tensor:
    """(..., 3) -> (...) bool: whether each point lies in the closed box ``[-bound, bound]^3``."""
    return (points.abs() <= bound).all(dim=-1)


def dense_level_size(resolution: int, features: int) -> int:
    """Number of values of a dense level: ``F * R^3``."""
    return features * resolution**3


def dense_grid_sample(grid: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of per-prompt dense grids.

    Args:
        grid: (B, F, R, R, R) or (1, F, R, R, R) values at the vertices, indexed ``[b, f, ix, iy, iz]``.
        points: (B, N, 3) points in ``[-1, 1]^3`` (outside: clamped to the border).

    Returns:
        (B, N, F) interpolated features.
    """
    B, N, _ = points.shape
    if grid.shape[0] == 1 and B != 1:
        # One shared grid: sample all point sets in one call.
        return dense_grid_sample(grid, points.reshape(1, B * N, 3)).reshape(B, N, -1)
    if grid.shape[0] != B:
        raise ValueError(f"grid batch {grid.shape[0]} does not match points batch {B}")
    # grid_sample reads the last coordinate as the index of dim 2 (D) and the first as dim 4 (W);
    # our volumes are [x, y, z] = [D, H, W], so pass (z, y, x).
    coords = points.flip(-1).reshape(B, N, 1, 1, 3).to(grid.dtype)
    out = F.grid_sample(grid, coords, mode="bilinear", padding_mode="border", align_corners=True)  # (B, F, N, 1, 1)
    return out.reshape(B, -1, N).transpose(1, 2)


def grid_cell_coords(points: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower cell corner and position inside the cell for a level of ``resolution`` vertices per axis.

    Args:
        points: (..., 3) points in ``[-1, 1]^3`` (outside: clamped).

    Returns:
        corner: (..., 3) long indices in ``[0, R - 2]``; frac: (..., 3) in ``[0, 1]``.
    """
    pos = ((points + 1.0) * 0.5 * (resolution - 1)).clamp(0.0, resolution - 1)
    corner = pos.detach().floor().long().clamp(0, resolution - 2)
    frac = pos - corner.to(pos.dtype)
    return corner, frac


def spatial_hash(ijk: torch.Tensor, table_size: int) -> torch.Tensor:
    """Instant-NGP spatial hash of integer vertex coordinates.

    Args:
        ijk: (..., 3) long vertex indices (non-negative).
        table_size: T, the number of rows of the table.

    Returns:
        (...) long row indices in ``[0, T)``.
    """
    h = ijk[..., 0] * HASH_PRIMES[0]
    h = h ^ (ijk[..., 1] * HASH_PRIMES[1])
    h = h ^ (ijk[..., 2] * HASH_PRIMES[2])
    return h % table_size


def trilinear_corner_weights(frac: torch.Tensor) -> torch.Tensor:
    """Trilinear weights of the 8 cell corners (in the order of the offsets used by the samplers).

    Args:
        frac: (..., 3) position inside the cell in ``[0, 1]^3``.

    Returns:
        (..., 8) weights summing to 1.
    """
    corners = _CORNERS.to(frac.device, frac.dtype)  # (8, 3)
    f = frac[..., None, :]  # (..., 1, 3)
    w = torch.where(corners.bool(), f, 1.0 - f)  # (..., 8, 3)
    return w.prod(dim=-1)


def table_lookup(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Gather rows of per-prompt tables.

    Args:
        table: (B, T, F) or (1, T, F) tables.
        rows: (B, M) long row indices.

    Returns:
        (B, M, F) gathered rows (differentiable w.r.t. ``table``).
    """
    B, M = rows.shape
    Bt, T, Fdim = table.shape
    if Bt == 1:
        return F.embedding(rows.reshape(-1), table[0]).reshape(B, M, Fdim)
    if Bt != B:
        raise ValueError(f"table batch {Bt} does not match points batch {B}")
    offset = torch.arange(B, device=rows.device)[:, None] * T
    return F.embedding((rows + offset).reshape(-1), table.reshape(B * T, Fdim)).reshape(B, M, Fdim)


def hash_grid_sample(table: torch.Tensor, points: torch.Tensor, resolution: int) -> torch.Tensor:
    """Trilinear interpolation of a hashed grid level.

    The 8 corner vertices of each point's cell are hashed into the table with
    :func:`spatial_hash`; their features are blended with trilinear weights.

    Args:
        table: (B, T, F) or (1, T, F) hash tables.
        points: (B, N, 3) points in ``[-1, 1]^3``.
        resolution: R, vertices per axis of the virtual grid.

    Returns:
        (B, N, F) interpolated features.
    """
    B, N, _ = points.shape
    corner, frac = grid_cell_coords(points, resolution)  # (B, N, 3)
    verts = corner[..., None, :] + _CORNERS.to(corner.device)  # (B, N, 8, 3)
    rows = spatial_hash(verts, table.shape[1]).reshape(B, N * 8)
    feats = table_lookup(table, rows).reshape(B, N, 8, -1)  # (B, N, 8, F)
    w = trilinear_corner_weights(frac).to(feats.dtype)  # (B, N, 8)
    return (feats * w[..., None]).sum(dim=2)


def dense_grid_sample_gather(grid: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Reference trilinear interpolation of dense grids by explicit corner gathering.

    Same contract and result as :func:`dense_grid_sample` (used to cross-check it).

    Args:
        grid: (B, F, R, R, R) or (1, F, R, R, R) indexed ``[b, f, ix, iy, iz]``.
        points: (B, N, 3) in ``[-1, 1]^3``.

    Returns:
        (B, N, F).
    """
    B, N, _ = points.shape
    Bg, Fdim, R = grid.shape[0], grid.shape[1], grid.shape[2]
    corner, frac = grid_cell_coords(points, R)
    verts = corner[..., None, :] + _CORNERS.to(corner.device)  # (B, N, 8, 3)
    rows = ((verts[..., 0] * R + verts[..., 1]) * R + verts[..., 2]).reshape(B, N * 8)
    table = grid.reshape(Bg, Fdim, R**3).transpose(1, 2)  # (Bg, R^3, F)
    feats = table_lookup(table, rows).reshape(B, N, 8, Fdim)
    w = trilinear_corner_weights(frac).to(feats.dtype)
    return (feats * w[..., None]).sum(dim=2)


def level_layout(resolutions: Sequence[int], features: int, hashmap_size: int) -> list[tuple[str, int, int]]:
    """How each level is stored: dense when ``R^3 <= hashmap_size``, else hashed into ``hashmap_size`` rows.

    Returns:
        one ``(kind, resolution, num_values)`` per level, kind ``"dense"`` or ``"hash"``.
    """
    out = []
    for r in resolutions:
        if r**3 <= hashmap_size:
            out.append(("dense", int(r), dense_level_size(r, features)))
        else:
            out.append(("hash", int(r), hashmap_size * features))
    return out


def encode_levels(values: Sequence[torch.Tensor], layout: Sequence[tuple[str, int, int]],
                  points: torch.Tensor) -> torch.Tensor:
    """Features of every level, concatenated.

    Args:
        values: per level, a dense volume (B|1, F, R, R, R) or a hash table (B|1, T, F).
        layout: from :func:`level_layout`.
        points: (B, N, 3) in ``[-1, 1]^3``.

    Returns:
        (B, N, levels * F).
    """
    feats = []
    for v, (kind, res, _) in zip(values, layout):
        feats.append(dense_grid_sample(v, points) if kind == "dense" else hash_grid_sample(v, points, res))
    return torch.cat(feats, dim=-1)


def split_levels(flat: torch.Tensor, layout: Sequence[tuple[str, int, int]], features: int) -> list[torch.Tensor]:
    """Cut a flat parameter vector into per-level grids.

    Args:
        flat: (B, P) with ``P = sum of num_values`` over the layout.

    Returns:
        per level a (B, F, R, R, R) volume (dense) or a (B, T, F) table (hash); views of ``flat``.
    """
    B = flat.shape[0]
    total = sum(n for _, _, n in layout)
    if flat.shape[1] != total:
        raise ValueError(f"expected {total} grid values per prompt, got {flat.shape[1]}")
    out = []
    start = 0
    for kind, res, n in layout:
        chunk = flat[:, start:start + n]
        start += n
        if kind == "dense":
            out.append(chunk.reshape(B, features, res, res, res))
        else:
            out.append(chunk.reshape(B, n // features, features))
    return out
