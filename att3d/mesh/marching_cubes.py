"""Iso-surface extraction from a dense scalar volume, fully vectorised in torch (CPU and GPU).

Sampling convention: a volume of shape (R, R, R) indexed ``[x, y, z]`` holds samples at the
grid points ``linspace(-bound, bound, R)`` on every axis (:func:`grid_points`), i.e. sample
``[i, j, k]`` sits at ``-bound + 2 bound (i, j, k) / (R - 1)``. The grid corners are on the
box faces. (Not the voxel *centres* of ``att3d.world.render.voxel_centres``.)

Method: every grid cube that the level set crosses is split into 6 tetrahedra (the Kuhn split,
conforming across neighbouring cubes) and cut by marching tetrahedra. Compared with the classic
256-case table this has no ambiguous cases, so the output is always closed for a closed level
set, at the price of about twice as many triangles. Vertices are welded per grid edge.
"""

from __future__ import annotations

import torch

from att3d.mesh.marching_tets import KUHN_TETS, _corner_offsets, march_tets


def grid_points(resolution: int, bound: float = 1.0, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The sample points of a volume for :func:`marching_cubes`.

    Returns:
        (R, R, R, 3) points, ``[i, j, k] -> (x_i, y_j, z_k)`` with ``x = linspace(-bound, bound, R)``.
    """
    lin = torch.linspace(-bound, bound, resolution, device=device, dtype=dtype)
    x, y, z = torch.meshgrid(lin, lin, lin, indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def marching_cubes(volume: torch.Tensor, threshold: float = 0.0, bound: float = 1.0,
                   inside: str = "below") -> tuple[torch.Tensor, torch.Tensor]:
    """Extract the ``threshold`` level set of a volume as a closed, outward-oriented triangle mesh.

    Args:
        volume: (R, R, R) float samples indexed ``[x, y, z]`` at :func:`grid_points` (R >= 2).
        threshold: iso value.
        bound: the grid spans ``[-bound, bound]^3``.
        inside: ``"below"`` when values under the threshold are inside (an SDF, negative
            inside) or ``"above"`` when values over it are inside (a density / occupancy).

    Returns:
        verts: (V, 3) world positions (dtype of ``volume``; differentiable w.r.t. ``volume``);
        faces: (F, 3) long, wound counter-clockwise seen from outside (normals point away from
        the inside region, i.e. towards decreasing "insideness"). Empty tensors when the level
        set does not cross the volume. Samples exactly at the threshold count as outside
        (strict comparisons) in both modes.
    """
    if volume.dim() != 3 or len(set(volume.shape)) != 1 or volume.shape[0] < 2:
        raise ValueError(f"volume must be (R, R, R) with R >= 2, got {tuple(volume.shape)}")
    if inside not in ("below", "above"):
        raise ValueError(f"inside must be 'below' or 'above', got {inside!r}")
    device = volume.device
    R = volume.shape[0]
    occ = volume < threshold if inside == "below" else volume > threshold  # (R, R, R)

    # Cubes that the level set crosses: some corner inside and some outside.
    with torch.no_grad():
        occ_f = occ.to(torch.uint8)
        any_in = torch.zeros(R - 1, R - 1, R - 1, dtype=torch.uint8, device=device)
        all_in = torch.ones_like(any_in)
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    c = occ_f[dx:R - 1 + dx, dy:R - 1 + dy, dz:R - 1 + dz]
                    any_in |= c
                    all_in &= c
        cubes = (any_in & (1 - all_in)).nonzero()  # (C, 3)
        if cubes.shape[0] == 0:
            return volume.new_zeros(0, 3), torch.zeros(0, 3, dtype=torch.long, device=device)
        base = (cubes[:, 0] * R + cubes[:, 1]) * R + cubes[:, 2]
        tets = (base[:, None, None] + _corner_offsets(R, device)[KUHN_TETS.to(device)][None]).reshape(-1, 4)

    step = 2.0 * bound / (R - 1)

    def positions(index: torch.Tensor) -> torch.Tensor:
        k = index % R
        j = torch.div(index, R, rounding_mode="floor") % R
        i = torch.div(index, R * R, rounding_mode="floor")
        return torch.stack([i, j, k], dim=-1).to(volume.dtype) * step - bound

    values = volume.reshape(-1)
    return march_tets(tets, values, occ.reshape(-1), positions, threshold=threshold)


#: Iso-surface methods: ``lewiner`` (scikit-image's marching cubes, Lewiner et al. 2003: the 256-case table
#: with the ambiguous cases resolved, about a third of the triangles of ``tets``; CPU, not differentiable) and
#: ``tets`` (:func:`marching_cubes` above: torch, any device, differentiable in the volume).
METHODS = ("lewiner", "tets")


def marching_cubes_lewiner(volume: torch.Tensor, threshold: float = 0.0, bound: float = 1.0,
                           inside: str = "below") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``threshold`` level set by scikit-image's Lewiner marching cubes, with :func:`marching_cubes`'s contract.

    Same sampling, orientation (counter-clockwise seen from outside) and return types as
    :func:`marching_cubes` (tensors on the volume's device, float32 vertices welded per grid edge), but
    computed on the CPU without gradients. Measured on the shipped model's 96^3 grids (2-core CPU): 15 ms
    and 20k faces against 24 ms and 60k faces for ``tets``, so that cleanup and decimation after it are
    3 to 7 times faster.
    """
    if volume.dim() != 3 or len(set(volume.shape)) != 1 or volume.shape[0] < 2:
        raise ValueError(f"volume must be (R, R, R) with R >= 2, got {tuple(volume.shape)}")
    if inside not in ("below", "above"):
        raise ValueError(f"inside must be 'below' or 'above', got {inside!r}")
    from skimage import measure

    device = volume.device
    vol = volume.detach().float().cpu().numpy()
    # skimage treats values above the level as the object (gradient "descent"); an SDF is negated.
    vol, level = (vol, float(threshold)) if inside == "above" else (-vol, -float(threshold))
    if not ((vol > level).any() and (vol <= level).any()):
        return torch.zeros(0, 3, device=device), torch.zeros(0, 3, dtype=torch.long, device=device)
    R = volume.shape[0]
    step = 2.0 * bound / (R - 1)
    verts, faces, _, _ = measure.marching_cubes(vol, level, spacing=(step, step, step), allow_degenerate=False)
    verts = torch.from_numpy((verts - bound).astype("float32")).to(device)
    faces = torch.from_numpy(faces[:, ::-1].astype("int64")).to(device)  # skimage winds them inward
    return verts, faces
