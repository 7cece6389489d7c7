"""Marching tetrahedra in torch: the shared extraction core and DMTet-style differentiable extraction.

A tetrahedral grid is a set of vertices ``(V, 3)`` and tetrahedra ``(T, 4)`` (indices into the
vertices). Given a scalar per vertex, every tetrahedron whose corners straddle the threshold is
cut by one triangle (1 or 3 corners inside) or by a quad split into two triangles (2 inside).

Properties of the output (for a conforming tetrahedral grid and a closed level set):

* **welded**: one output vertex per crossed grid *edge*, shared by every tetrahedron that has
  that edge, so neighbouring triangles share vertex indices and the surface is closed;
* **outward oriented**: triangles are wound counter-clockwise seen from outside, i.e. their
  normals ``(v1 - v0) x (v2 - v0)`` point away from the inside region. The triangle table is
  built for positively oriented tetrahedra; tetrahedra of negative orientation get their
  triangles flipped, so any vertex order of the input is handled;
* **differentiable**: the vertex on an edge ``(a, b)`` sits at the linear zero crossing
  ``p_a + (thr - s_a) / (s_b - s_a) (p_b - p_a)``, differentiable w.r.t. the scalars ``s`` and
  the positions ``p`` (e.g. DMTet's per-vertex deformation). The topology (which tetrahedra
  and edges are crossed) is discrete and carries no gradient.

Inside convention: an SDF is negative inside, so ``marching_tetrahedra`` treats ``sdf < 0`` as
inside; the general core takes the inside mask explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations, permutations

import torch

#: The 6 edges of a tetrahedron as pairs of local corner indices.
TET_EDGES: tuple[tuple[int, int], ...] = tuple(combinations(range(4), 2))


def _build_triangle_table() -> tuple[torch.Tensor, torch.Tensor]:
    """Triangle table over the 16 inside/outside patterns of a positively oriented tetrahedron.

    Returns:
        table: (16, 2, 3) long local edge indices (into ``TET_EDGES``) of up to two triangles,
            -1 where unused; num: (16,) long number of triangles per pattern.

    Pattern bit ``i`` is set when corner ``i`` is inside. The winding is fixed once, here,
    on the reference tetrahedron (0,0,0), (1,0,0), (0,1,0), (0,0,1) with crossings at the edge
    midpoints: its sign is invariant under orientation-preserving affine maps and under moving
    the crossings along the edges, so the table holds for every positive tetrahedron.
    """
    ref = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    edge_index = {e: i for i, e in enumerate(TET_EDGES)}

    def edge(a: int, b: int) -> int:
        return edge_index[(min(a, b), max(a, b))]

    table = torch.full((16, 2, 3), -1, dtype=torch.long)
    num = torch.zeros(16, dtype=torch.long)
    for code in range(1, 15):
        inside = [i for i in range(4) if code >> i & 1]
        outside = [i for i in range(4) if not code >> i & 1]
        if len(inside) == 1:
            a = inside[0]
            tris = [[edge(a, b) for b in outside]]
        elif len(inside) == 3:
            a = outside[0]
            tris = [[edge(a, b) for b in inside]]
        else:
            (a, b), (c, d) = inside, outside
            # The quad (ac, ad, bd, bc) is cyclic: consecutive edges share a corner.
            tris = [[edge(a, c), edge(a, d), edge(b, d)], [edge(a, c), edge(b, d), edge(b, c)]]
        out_corner = ref[outside[0]]
        for k, tri in enumerate(tris):
            pts = torch.stack([ref[list(TET_EDGES[e])].mean(0) for e in tri])
            normal = torch.linalg.cross(pts[1] - pts[0], pts[2] - pts[0])
            if float((normal * (out_corner - pts[0])).sum()) < 0:  # must face the outside corner
                tri = [tri[0], tri[2], tri[1]]
            table[code, k] = torch.tensor(tri)
        num[code] = len(tris)
    return table, num


TRIANGLE_TABLE, NUM_TRIANGLES = _build_triangle_table()


def _kuhn_tets() -> torch.Tensor:
    """(6, 4) the Kuhn (Freudenthal) split of the unit cube into 6 positively oriented tetrahedra.

    Corners are cube-local offsets encoded as ``4 dx + 2 dy + dz``. Each tetrahedron is a
    monotone path from (0,0,0) to (1,1,1); the split is conforming across neighbouring cubes
    (every cube face is cut along the same diagonal from both sides).
    """
    tets = []
    for perm in permutations(range(3)):
        corner = [0, 0, 0]
        path = [tuple(corner)]
        for axis in perm:
            corner[axis] = 1
            path.append(tuple(corner))
        pts = torch.tensor(path, dtype=torch.float64)
        det = torch.linalg.det(pts[1:] - pts[0])
        if det < 0:
            path[1], path[2] = path[2], path[1]
        tets.append([4 * x + 2 * y + z for x, y, z in path])
    return torch.tensor(tets, dtype=torch.long)


KUHN_TETS = _kuhn_tets()


def tet_orientation(positions: torch.Tensor, tets: torch.Tensor) -> torch.Tensor:
    """Signed volumes (times 6) of tetrahedra.

    Args:
        positions: (V, 3) vertex positions; tets: (T, 4) long.

    Returns:
        (T,) determinant ``det[p1 - p0, p2 - p0, p3 - p0]`` (positive for positive orientation).
    """
    p = positions[tets]  # (T, 4, 3)
    e = p[:, 1:] - p[:, :1]
    return (e[:, 0] * torch.linalg.cross(e[:, 1], e[:, 2])).sum(-1)


def march_tets(tets: torch.Tensor, values: torch.Tensor, inside: torch.Tensor,
               positions: torch.Tensor | Callable[[torch.Tensor], torch.Tensor], threshold: float = 0.0,
               flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The extraction core shared by marching cubes and marching tetrahedra.

    Args:
        tets: (T, 4) long vertex indices (only tetrahedra that may be crossed need be passed).
        values: (V,) float scalar per vertex (differentiable).
        inside: (V,) bool inside mask (``values < threshold`` for an SDF); vertices with
            ``inside`` differing across an edge must have ``values`` on opposite sides of
            ``threshold`` (or equal to it on the outside end).
        positions: (V, 3) vertex positions (differentiable), or a function mapping (K,) long
            vertex indices to (K, 3) positions (used by implicit grids).
        threshold: the iso value.
        flip: (T,) bool, tetrahedra of negative orientation (their triangles are flipped);
            None when all are positively oriented.

    Returns:
        verts: (V', 3) one vertex per crossed edge; faces: (F, 3) long, outward oriented.
    """
    device = values.device
    n_vertices = values.shape[0]
    occ = inside[tets]  # (T, 4)
    weights = torch.tensor([1, 2, 4, 8], device=device)
    code = (occ.long() * weights).sum(-1)
    keep = (code > 0) & (code < 15)
    tets, code = tets[keep], code[keep]
    if flip is not None:
        flip = flip[keep]
    if tets.shape[0] == 0:
        dtype = values.dtype
        return torch.zeros(0, 3, device=device, dtype=dtype), torch.zeros(0, 3, device=device, dtype=torch.long)

    edges = torch.tensor(TET_EDGES, device=device)  # (6, 2)
    ev = tets[:, edges]  # (T, 6, 2)
    lo, hi = ev.min(-1).values, ev.max(-1).values
    crossed = inside[lo] != inside[hi]  # (T, 6)
    keys = lo * n_vertices + hi
    unique_keys, inverse = torch.unique(keys[crossed], return_inverse=True)
    edge_to_vert = torch.full_like(keys, -1)
    edge_to_vert[crossed] = inverse

    table = TRIANGLE_TABLE.to(device)[code]  # (T, 2, 3)
    num = NUM_TRIANGLES.to(device)[code]  # (T,)
    rows = torch.arange(tets.shape[0], device=device)[:, None]
    tri0 = edge_to_vert[rows, table[:, 0]]  # (T, 3)
    two = num == 2
    tri1 = edge_to_vert[rows[two], table[two, 1]]
    if flip is not None:
        tri0 = torch.where(flip[:, None], tri0[:, [0, 2, 1]], tri0)
        tri1 = torch.where(flip[two][:, None], tri1[:, [0, 2, 1]], tri1)
    faces = torch.cat([tri0, tri1], dim=0)

    a = torch.div(unique_keys, n_vertices, rounding_mode="floor")
    b = unique_keys - a * n_vertices
    if callable(positions):
        pa, pb = positions(a), positions(b)
    else:
        pa, pb = positions[a], positions[b]
    sa, sb = values[a], values[b]
    # Clamped: were ``values`` and ``inside`` to disagree by rounding, the vertex still stays on its edge.
    t = ((threshold - sa) / (sb - sa)).clamp(0.0, 1.0)[:, None]
    verts = pa + t * (pb - pa)
    return verts, faces


def tet_grid(resolution: int, bound: float = 1.0, device: torch.device | str | None = None,
             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A regular tetrahedral grid over ``[-bound, bound]^3``: every grid cube split into 6 tetrahedra.

    Args:
        resolution: R, grid vertices per axis (vertex ``(i, j, k)`` sits at
            ``-bound + 2 bound (i, j, k) / (R - 1)``, i.e. ``linspace(-bound, bound, R)``, and has
            index ``(i R + j) R + k``).

    Returns:
        verts: (R^3, 3) positions; tets: (6 (R-1)^3, 4) long, all positively oriented.
    """
    if resolution < 2:
        raise ValueError(f"tet_grid needs resolution >= 2, got {resolution}")
    R = resolution
    verts = grid_vertices(R, bound, device=device, dtype=dtype)
    c = torch.arange(R - 1, device=device)
    ci, cj, ck = torch.meshgrid(c, c, c, indexing="ij")
    base = ((ci * R + cj) * R + ck).reshape(-1)  # (C,) index of each cube's (0,0,0) corner
    tets = base[:, None, None] + _corner_offsets(R, device)[KUHN_TETS.to(device)][None]  # (C, 6, 4)
    return verts, tets.reshape(-1, 4)


def grid_vertices(resolution: int, bound: float = 1.0, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(R^3, 3) the vertices of :func:`tet_grid` (``linspace(-bound, bound, R)`` per axis, index ``(i R + j) R + k``)
    without its tetrahedra (:func:`crossed_cell_tets` builds those near a surface)."""
    lin = torch.linspace(-bound, bound, resolution, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), dim=-1).reshape(-1, 3)


def crossed_cell_tets(inside: torch.Tensor) -> torch.Tensor:
    """The tetrahedra of :func:`tet_grid` in the grid cubes that a surface crosses, without building the whole grid.

    A tetrahedron can only be crossed if its cube is (its 4 vertices are 4 of the cube's 8 corners), so
    ``marching_tetrahedra(verts, crossed_cell_tets(sdf < 0), sdf)`` gives the same mesh as with every tetrahedron
    of ``tet_grid(R)`` (the same faces, in another order), at the cost of the narrow band around the surface only.

    Args:
        inside: (R, R, R) bool, vertex ``(i, j, k)`` of ``tet_grid(R)`` inside (indexed ``[x, y, z]``).

    Returns:
        tets: (6 C', 4) long, the Kuhn tetrahedra of the C' cubes whose corners are neither all inside nor all
        outside, indexing ``tet_grid(R)``'s vertices, positively oriented.
    """
    if inside.dim() != 3 or len(set(inside.shape)) != 1 or inside.shape[0] < 2:
        raise ValueError(f"inside must be (R, R, R) with R >= 2, got {tuple(inside.shape)}")
    R, device = inside.shape[0], inside.device
    corners = [inside[dx:R - 1 + dx, dy:R - 1 + dy, dz:R - 1 + dz] for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)]
    any_in, all_in = corners[0].clone(), corners[0].clone()
    for c in corners[1:]:
        any_in |= c
        all_in &= c
    ci, cj, ck = (any_in & ~all_in).nonzero(as_tuple=True)
    base = (ci * R + cj) * R + ck  # (C',) index of each crossed cube's (0,0,0) corner
    return (base[:, None, None] + _corner_offsets(R, device)[KUHN_TETS.to(device)][None]).reshape(-1, 4)


def _corner_offsets(resolution: int, device: torch.device | str | None) -> torch.Tensor:
    """(8,) index offsets of the cube corners ``4 dx + 2 dy + dz`` in a grid of R^3 vertices."""
    R = resolution
    d = torch.tensor([0, 1], device=device)
    dx, dy, dz = torch.meshgrid(d, d, d, indexing="ij")
    return ((dx * R + dy) * R + dz).reshape(-1)


def marching_tetrahedra(verts: torch.Tensor, tets: torch.Tensor, sdf: torch.Tensor,
                        deform: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DMTet-style differentiable surface extraction from a tetrahedral grid.

    Args:
        verts: (V, 3) grid vertex positions.
        tets: (T, 4) long tetrahedra (any orientation; conforming, e.g. from :func:`tet_grid`).
        sdf: (V,) signed distance per vertex, negative inside.
        deform: (V, 3) optional per-vertex offsets added to ``verts`` before extraction.

    Returns:
        mesh_verts: (V', 3), differentiable w.r.t. ``sdf`` and ``deform`` (and ``verts``);
        faces: (F, 3) long, outward oriented (normals towards increasing ``sdf``).
    """
    if sdf.dim() != 1 or sdf.shape[0] != verts.shape[0]:
        raise ValueError(f"sdf must be (V,) = ({verts.shape[0]},), got {tuple(sdf.shape)}")
    positions = verts if deform is None else verts + deform
    inside = sdf < 0
    with torch.no_grad():
        occ = inside[tets]
        crossed = occ.any(-1) & ~occ.all(-1)
        tets = tets[crossed]
        flip = tet_orientation(positions.detach(), tets) < 0
    return march_tets(tets, sdf, inside, positions, threshold=0.0, flip=flip)
