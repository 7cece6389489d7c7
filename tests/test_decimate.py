"""Face budgets: quadric decimation keeps closed meshes closed, respects the budget, keeps corners."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from att3d.mesh import grid_points, marching_cubes
from att3d.mesh.cleanup import clean_mesh
from att3d.mesh.decimate import DecimationError, decimate, edge_face_counts, is_closed, make_manifold
from att3d.world.shapes import sdf_cube, sdf_octahedron
from tests.test_mesh import assert_closed_and_oriented


def sdf_mesh(sdf, resolution: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    verts, faces = marching_cubes(sdf(grid_points(resolution)), 0.0)
    return clean_mesh(verts, faces, 0.0)


@pytest.mark.parametrize("budget", [4000, 500])
def test_decimation_keeps_closed_mesh_closed_within_budget(budget):
    verts, faces = sdf_mesh(sdf_cube)
    assert faces.shape[0] > 4 * budget and is_closed(faces)
    v2, f2 = decimate(verts, faces, budget)
    assert f2.shape[0] <= budget
    mesh = assert_closed_and_oriented(v2, f2)
    src = trimesh.Trimesh(verts.numpy(), faces.numpy(), process=False)
    assert abs(mesh.volume - src.volume) / src.volume < 0.01
    # no degenerate or repeated triangles
    f = f2.numpy()
    assert (f[:, 0] != f[:, 1]).all() and (f[:, 1] != f[:, 2]).all() and (f[:, 2] != f[:, 0]).all()
    assert np.unique(np.sort(f, axis=1), axis=0).shape[0] == f.shape[0]
    assert (mesh.area_faces > 0).all()


def test_decimation_keeps_corners_and_flat_faces_cheap():
    """A cube's flat faces need few triangles: at 500 faces its 8 corners are still there (within 0.02)."""
    verts, faces = sdf_mesh(sdf_cube, 64)
    v2, _ = decimate(verts, faces, 500)
    corners = torch.tensor([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=v2.dtype) * 0.4
    nearest_src = torch.cdist(corners, verts).min(dim=1).values
    nearest = torch.cdist(corners, v2).min(dim=1).values
    assert (nearest <= nearest_src + 0.02).all(), (nearest_src, nearest)
    # and the octahedron's apexes
    verts, faces = sdf_mesh(sdf_octahedron, 64)
    v2, _ = decimate(verts, faces, 300)
    apex = torch.tensor([[0.0, 0.6, 0.0], [0.0, -0.6, 0.0], [0.6, 0.0, 0.0]], dtype=v2.dtype)
    assert (torch.cdist(apex, v2).min(dim=1).values <= torch.cdist(apex, verts).min(dim=1).values + 0.03).all()


def test_within_budget_is_unchanged_and_bad_budget_refused():
    verts, faces = sdf_mesh(sdf_cube, 16)
    v2, f2 = decimate(verts, faces, faces.shape[0])
    assert v2 is verts and f2 is faces
    for bad in (0, -3, 2.5, True):
        with pytest.raises(DecimationError, match="face budget"):
            decimate(verts, faces, bad)


def two_tetrahedra_sharing_an_edge() -> tuple[torch.Tensor, torch.Tensor]:
    """Two closed tetrahedra that share the edge (0, 1): 4 faces on it, every other edge 2."""
    verts = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0],  # the shared edge
                          [1.0, 0.0, 0.5], [0.5, 1.0, 0.5],  # tetrahedron A's other corners
                          [-1.0, 0.0, 0.5], [-0.5, -1.0, 0.5]])  # tetrahedron B's
    def surface(a, b, c, d):  # outward faces of the tetrahedron (a, b, c, d)
        faces = [(a, b, c), (a, d, b), (b, d, c), (a, c, d)]
        centre = verts[[a, b, c, d]].mean(0)
        out = []
        for f in faces:
            p = verts[list(f)]
            n = torch.linalg.cross(p[1] - p[0], p[2] - p[0])
            out.append(f if torch.dot(n, p.mean(0) - centre) > 0 else (f[0], f[2], f[1]))
        return out
    faces = torch.tensor(surface(0, 1, 2, 3) + surface(0, 1, 4, 5))
    return verts, faces


def test_make_manifold_splits_a_pinched_edge():
    verts, faces = two_tetrahedra_sharing_an_edge()
    counts = edge_face_counts(faces)
    assert sorted(counts.tolist()).count(4) == 1 and not is_closed(faces)
    v2, f2 = make_manifold(verts, faces)
    assert f2.shape == faces.shape and v2.shape[0] == 8  # both ends of the pinched edge get a second copy
    assert_closed_and_oriented(v2, f2)
    # same triangles in space
    assert torch.allclose(v2[f2].sort(dim=1).values.sum(), verts[faces].sort(dim=1).values.sum())


def test_make_manifold_drops_folded_pairs_and_keeps_manifold_meshes():
    verts, faces = sdf_mesh(sdf_cube, 12)
    v2, f2 = make_manifold(verts, faces)
    assert v2 is verts and f2 is faces
    far = int(torch.cdist(verts[faces[0, :1]], verts).argmax())
    fin = torch.tensor([[faces[0, 0], faces[0, 1], far]])  # a folded pair: one triangle, both directions
    v3, f3 = make_manifold(verts, torch.cat([faces, fin, fin.flip(1)]))
    assert f3.shape[0] == faces.shape[0] and is_closed(f3)
    assert torch.equal(v3[f3], verts[faces])


def test_decimation_in_threads_gives_each_mesh_its_own_result():
    """fast-simplification works on process-global state: meshes decimated in parallel threads (as the export's
    ``workers`` do) must come out exactly as when decimated one at a time, never with another mesh's faces."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    meshes = [sdf_mesh(sdf_cube, 48), sdf_mesh(sdf_octahedron, 56), sdf_mesh(sdf_cube, 40),
              sdf_mesh(sdf_octahedron, 44)]
    budgets = [1500, 1200, 900, 700]
    expected = [decimate(v, f, b) for (v, f), b in zip(meshes, budgets)]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: the race, if any, shows
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            for _ in range(3):
                got = list(pool.map(lambda i: decimate(*meshes[i], budgets[i]), range(len(meshes))))
                for (ve, fe), (vg, fg) in zip(expected, got):
                    assert torch.equal(fe, fg) and torch.equal(ve, vg)
    finally:
        sys.setswitchinterval(old)
