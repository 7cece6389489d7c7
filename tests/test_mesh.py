"""att3d.mesh: iso-surface extraction, cleanup, UV texturing and export against analytic facts."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import trimesh

from att3d.mesh import (
    bake_texture,
    clean_mesh,
    connected_components,
    dilate,
    export_mesh,
    grid_points,
    laplacian_smooth,
    marching_cubes,
    marching_tetrahedra,
    remove_small_components,
    render_mesh,
    taubin_smooth,
    tet_grid,
    texture_mesh,
    texture_sample,
    to_trimesh,
    uv_unwrap,
    vertex_normals,
    weld_vertices,
)
from att3d.mesh.marching_tets import tet_orientation
from att3d.render.cameras import OrbitCameras
from att3d.world.shapes import sdf_cube, sdf_sphere

SPHERE_VOLUME = 4.0 / 3.0 * math.pi * 0.5**3
SPHERE_AREA = 4.0 * math.pi * 0.5**2
CUBE_VOLUME = 0.8**3
CUBE_AREA = 6 * 0.8**2


def assert_closed_and_oriented(verts: torch.Tensor, faces: torch.Tensor) -> trimesh.Trimesh:
    """Every undirected edge in exactly two faces, every directed edge in exactly one (consistent winding)."""
    f = faces.cpu().numpy()
    directed = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    counts = Counter(map(tuple, directed.tolist()))
    assert max(counts.values()) == 1, "a directed edge is used twice: inconsistent winding or non-manifold"
    for a, b in counts:
        assert (b, a) in counts, f"edge {(a, b)} has no opposite: the mesh has a boundary"
    mesh = trimesh.Trimesh(verts.detach().cpu().numpy(), f, process=False)
    assert mesh.is_watertight
    assert mesh.is_winding_consistent
    return mesh


def sphere_mesh(resolution: int = 48, radius: float = 0.5, centre=(0.0, 0.0, 0.0)) -> tuple[torch.Tensor, torch.Tensor]:
    p = grid_points(resolution)
    sdf = torch.linalg.vector_norm(p - torch.tensor(centre), dim=-1) - radius
    return marching_cubes(sdf, 0.0)


# --------------------------------------------------------------------------------------------
# Marching cubes (tetrahedral split of the grid cubes)
# --------------------------------------------------------------------------------------------


def test_grid_points_convention():
    p = grid_points(5, bound=1.0)
    assert p.shape == (5, 5, 5, 3)
    assert torch.allclose(p[0, 0, 0], torch.tensor([-1.0, -1.0, -1.0]))
    assert torch.allclose(p[4, 2, 1], torch.tensor([1.0, 0.0, -0.5]))
    assert torch.allclose(grid_points(3, bound=0.5)[2, 2, 2], torch.tensor([0.5, 0.5, 0.5]))


@pytest.mark.parametrize("resolution", [64, 96])
def test_marching_cubes_sphere_closed_accurate_outward(resolution):
    verts, faces = marching_cubes(sdf_sphere(grid_points(resolution)), 0.0, bound=1.0)
    assert verts.dtype == torch.float32 and faces.dtype == torch.long
    mesh = assert_closed_and_oriented(verts, faces)
    # Outward orientation: positive signed volume; face normals point away from the centre.
    assert mesh.volume > 0
    assert abs(mesh.volume / SPHERE_VOLUME - 1) < 0.02
    assert abs(mesh.area / SPHERE_AREA - 1) < 0.02
    assert (mesh.face_normals * mesh.triangles_center).sum(1).min() > 0
    # Vertices lie on the sphere (up to the linear interpolation error) and are welded.
    r = verts.norm(dim=-1)
    assert (r - 0.5).abs().max() < 0.01
    assert torch.unique(verts, dim=0).shape[0] == verts.shape[0]
    assert mesh.euler_number == 2  # a single sphere


def test_marching_cubes_box_and_bound():
    verts, faces = marching_cubes(sdf_cube(grid_points(64)), 0.0)
    mesh = assert_closed_and_oriented(verts, faces)
    assert abs(mesh.volume / CUBE_VOLUME - 1) < 0.02
    assert abs(mesh.area / CUBE_AREA - 1) < 0.02
    assert verts.abs().max() < 0.4 + 1e-3
    # A different bound scales the grid: the same samples on [-2, 2] give a box twice as large.
    verts2, faces2 = marching_cubes(sdf_cube(grid_points(64)), 0.0, bound=2.0)
    assert torch.equal(faces2, faces)
    assert torch.allclose(verts2, 2 * verts, atol=1e-5)


def test_marching_cubes_density_above_matches_sdf_below():
    sdf = sdf_sphere(grid_points(40))
    v1, f1 = marching_cubes(sdf, 0.0, inside="below")
    v2, f2 = marching_cubes(-sdf + 3.0, 3.0, inside="above")  # a "density" with inside above
    m2 = assert_closed_and_oriented(v2, f2)
    assert m2.volume > 0
    assert torch.equal(f1, f2)
    assert torch.allclose(v1, v2, atol=1e-5)


def test_marching_cubes_plane_position_and_normals():
    p = grid_points(17)
    verts, faces = marching_cubes(p[..., 0] - 0.3, 0.0)  # inside: x < 0.3; an open plane
    assert faces.shape[0] > 0
    assert torch.allclose(verts[:, 0], torch.full_like(verts[:, 0], 0.3), atol=1e-5)
    n = torch.linalg.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]])
    assert (n[:, 0] > 0).all() and torch.allclose(n[:, 1:], torch.zeros_like(n[:, 1:]), atol=1e-6)


def test_marching_cubes_empty_and_bad_input():
    v, f = marching_cubes(torch.ones(8, 8, 8), 0.0)
    assert v.shape == (0, 3) and f.shape == (0, 3)
    with pytest.raises(ValueError):
        marching_cubes(torch.ones(8, 8, 9), 0.0)
    with pytest.raises(ValueError):
        marching_cubes(torch.ones(8, 8, 8), 0.0, inside="inside")


def test_marching_cubes_differentiable_wrt_volume():
    vol = sdf_sphere(grid_points(24)).requires_grad_()
    verts, _ = marching_cubes(vol, 0.0)
    verts.norm(dim=-1).sum().backward()
    assert vol.grad is not None and vol.grad.abs().sum() > 0
    # Only samples next to the surface get gradient.
    far = sdf_sphere(grid_points(24)).abs() > 0.2
    assert vol.grad[far].abs().max() == 0


# --------------------------------------------------------------------------------------------
# Marching tetrahedra (DMTet)
# --------------------------------------------------------------------------------------------


def test_tet_grid_positive_and_fills_box():
    verts, tets = tet_grid(5, bound=1.0)
    assert verts.shape == (125, 3) and tets.shape == (6 * 64, 4)
    vol6 = tet_orientation(verts, tets)
    assert (vol6 > 0).all()
    assert torch.isclose(vol6.sum() / 6, torch.tensor(8.0))


def test_marching_tetrahedra_sphere_closed():
    verts, tets = tet_grid(48)
    mv, mf = marching_tetrahedra(verts, tets, sdf_sphere(verts))
    mesh = assert_closed_and_oriented(mv, mf)
    assert mesh.volume > 0
    assert abs(mesh.volume / SPHERE_VOLUME - 1) < 0.03


def test_crossed_cell_tets_give_the_whole_grids_mesh():
    from att3d.mesh.marching_tets import crossed_cell_tets

    R = 20
    verts, tets = tet_grid(R)
    sdf = torch.minimum(sdf_sphere(verts), (verts - 0.55).abs().amax(-1) - 0.2)  # a ball and a box
    band = crossed_cell_tets((sdf < 0).reshape(R, R, R))
    assert 0 < band.shape[0] < tets.shape[0] / 4 and band.shape[0] % 6 == 0
    assert set(map(tuple, band.tolist())) <= set(map(tuple, tets.tolist()))  # tetrahedra of the grid itself
    v1, f1 = marching_tetrahedra(verts, tets, sdf)
    v2, f2 = marching_tetrahedra(verts, band, sdf)
    tri = lambda v, f: sorted(tuple(sorted(map(tuple, np.round(v[t].numpy(), 6).tolist()))) for t in f)  # noqa: E731
    assert tri(v1, f1) == tri(v2, f2)  # the same triangles
    assert_closed_and_oriented(v2, f2)
    assert crossed_cell_tets(torch.zeros(R, R, R, dtype=torch.bool)).shape == (0, 4)
    with pytest.raises(ValueError, match="R, R, R"):
        crossed_cell_tets(torch.zeros(4, 4, 5, dtype=torch.bool))


def test_marching_tetrahedra_any_tet_orientation():
    verts, tets = tet_grid(20)
    sdf = sdf_sphere(verts)
    swapped = tets.clone()
    odd = torch.arange(tets.shape[0]) % 2 == 0
    swapped[odd] = tets[odd][:, [1, 0, 2, 3]]  # half of the tetrahedra now negatively oriented
    v1, f1 = marching_tetrahedra(verts, tets, sdf)
    v2, f2 = marching_tetrahedra(verts, swapped, sdf)
    m1, m2 = assert_closed_and_oriented(v1, f1), assert_closed_and_oriented(v2, f2)
    assert m2.volume > 0 and math.isclose(m1.volume, m2.volume, rel_tol=1e-5)


def test_marching_tetrahedra_gradients():
    verts, tets = tet_grid(12)
    verts = verts.double()
    sdf = (sdf_sphere(verts) + 0.013).detach().requires_grad_()  # keep grid values away from 0
    deform = torch.zeros_like(verts, requires_grad=True)
    mv, mf = marching_tetrahedra(verts, tets, sdf, deform)
    mv.pow(2).sum().backward()
    assert sdf.grad.abs().sum() > 0 and deform.grad.abs().sum() > 0
    # Exact against finite differences (the topology does not change under small perturbations).
    s0 = sdf.detach()
    d0 = (torch.rand(verts.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5) * 0.01

    def f(s: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return marching_tetrahedra(verts, tets, s, d)[0]

    assert torch.autograd.gradcheck(f, (s0.clone().requires_grad_(), d0.requires_grad_()), eps=1e-7, atol=1e-5,
                                    fast_mode=True)


# --------------------------------------------------------------------------------------------
# Cleanup
# --------------------------------------------------------------------------------------------


def test_remove_small_components_drops_far_floater():
    v_big, f_big = sphere_mesh(40, radius=0.5)
    v_small, f_small = sphere_mesh(40, radius=0.08, centre=(0.85, 0.85, 0.85))
    verts = torch.cat([v_small, v_big])  # floater first, so that order cannot help
    faces = torch.cat([f_small, f_big + v_small.shape[0]])
    labels = connected_components(faces, verts.shape[0])
    assert int(labels.max()) + 1 == 2
    assert sorted(torch.bincount(labels).tolist()) == sorted([f_small.shape[0], f_big.shape[0]])
    for by in ("faces", "area"):
        v, f = remove_small_components(verts, faces, min_fraction=0.1, by=by)
        assert f.shape == f_big.shape and v.shape == v_big.shape
        assert v.norm(dim=-1).max() < 0.51  # the far floater is gone
        assert_closed_and_oriented(v, f)
    v, f = remove_small_components(verts, faces, min_fraction=0.0)
    assert f.shape[0] == faces.shape[0]


def test_weld_vertices_rebuilds_triangle_soup():
    verts, faces = sphere_mesh(24)
    soup_v = verts[faces].reshape(-1, 3)  # every face with its own three vertices
    soup_f = torch.arange(soup_v.shape[0]).reshape(-1, 3)
    assert not trimesh.Trimesh(soup_v.numpy(), soup_f.numpy(), process=False).is_watertight
    v, f = weld_vertices(soup_v, soup_f, tolerance=1e-6)
    assert v.shape == verts.shape and f.shape == faces.shape
    assert_closed_and_oriented(v, f)
    # Duplicated faces and collapsed faces are dropped.
    v2, f2 = weld_vertices(soup_v, torch.cat([soup_f, soup_f[:5], soup_f[:3, [0, 0, 1]]]))
    assert f2.shape == faces.shape
    v3, f3 = clean_mesh(soup_v, soup_f)
    assert f3.shape == faces.shape


def test_vertex_normals_and_smoothing():
    verts, faces = sphere_mesh(40)
    n = vertex_normals(verts, faces)
    assert torch.allclose(n.norm(dim=-1), torch.ones(len(n)), atol=1e-5)
    assert (n * torch.nn.functional.normalize(verts, dim=-1)).sum(-1).min() > 0.99
    noise = (torch.rand(verts.shape, generator=torch.Generator().manual_seed(1)) - 0.5) * 0.02
    noisy = verts + noise

    def radial_error(v: torch.Tensor) -> float:
        return float((v.norm(dim=-1) - 0.5).abs().mean())

    def volume(v: torch.Tensor) -> float:
        return trimesh.Trimesh(v.numpy(), faces.numpy(), process=False).volume

    smooth = taubin_smooth(noisy, faces, iterations=10)
    assert radial_error(smooth) < 0.5 * radial_error(noisy)
    assert abs(volume(smooth) / SPHERE_VOLUME - 1) < 0.03
    shrunk = laplacian_smooth(verts, faces, iterations=20)
    assert volume(shrunk) < volume(verts)


# --------------------------------------------------------------------------------------------
# UV atlas and texture baking
# --------------------------------------------------------------------------------------------


def colour_of(points: torch.Tensor) -> torch.Tensor:
    """A smooth colour field on space: (N, 3) -> (N, 3) in [0, 1]."""
    return (points * 0.8 + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def textured_sphere():
    verts, faces = sphere_mesh(28)
    new_verts, new_faces, uvs, texture = texture_mesh(verts, faces, colour_of, size=256, padding=4)
    return verts, faces, new_verts, new_faces, uvs, texture


def test_uv_unwrap_preserves_geometry():
    verts, faces = sphere_mesh(20)
    vmapping, new_faces, uvs = uv_unwrap(verts, faces, resolution=256)
    assert new_faces.shape == tuple(faces.shape) and uvs.shape == (vmapping.shape[0], 2)
    assert vmapping.shape[0] >= verts.shape[0]  # seams split vertices
    assert uvs.min() >= 0 and uvs.max() <= 1
    new_verts = verts.numpy()[vmapping]
    assert np.allclose(new_verts[new_faces], verts.numpy()[faces.numpy()])


def test_dilate_grows_one_texel_per_step():
    tex = torch.zeros(9, 9, 3)
    filled = torch.zeros(9, 9, dtype=torch.bool)
    tex[4, 4] = torch.tensor([0.2, 0.4, 0.6])
    filled[4, 4] = True
    out, m = dilate(tex, filled, 2)
    assert m.sum() == 25 and m[2:7, 2:7].all()
    assert torch.allclose(out[m], torch.tensor([0.2, 0.4, 0.6]).expand(25, 3))
    assert (out[~m] == 0).all()


def _dilate_reference(texture, filled, iterations):
    """The dilation as grouped 3x3 convolutions (mean of the filled 8-neighbours per step)."""
    C = texture.shape[-1]
    tex, m = texture.permute(2, 0, 1)[None], filled[None, None].to(texture.dtype)
    kernel = torch.ones(1, 1, 3, 3, dtype=texture.dtype)
    for _ in range(iterations):
        total = torch.nn.functional.conv2d(tex * m, kernel.expand(C, 1, 3, 3), padding=1, groups=C)
        count = torch.nn.functional.conv2d(m, kernel, padding=1)
        grow = (count > 0) & (m == 0)
        tex = torch.where(grow, total / count.clamp(min=1), tex)
        m = m + grow.to(m.dtype)
    return tex[0].permute(1, 2, 0), m[0, 0] > 0


def test_dilate_matches_the_convolution_reference():
    gen = torch.Generator().manual_seed(0)
    tex = torch.rand(40, 33, 3, generator=gen, dtype=torch.float64)
    filled = torch.rand(40, 33, generator=gen) < 0.08
    filled[0, :5] = True  # charts on the border: the zero padding counts nothing there
    tex = torch.where(filled[..., None], tex, torch.zeros(()))
    for it in (1, 3, 6):
        out, m = dilate(tex, filled, it)
        ref, ref_m = _dilate_reference(tex, filled, it)
        assert torch.equal(m, ref_m)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_bake_texture_points_and_colours(textured_sphere):
    verts, faces, new_verts, new_faces, uvs, texture = textured_sphere
    assert texture.shape == (256, 256, 3)
    # Baking the identity puts each covered texel's 3D point in the texture: on the mesh surface.
    pts, covered = bake_texture(new_verts, new_faces, uvs, lambda p: p, size=256, padding=0, return_mask=True)
    assert covered.float().mean() > 0.3
    r = pts[covered].norm(dim=-1)
    assert (r - 0.5).abs().max() < 0.01 and r.min() > 0.45
    # Texture lookups at the vertex uvs give back the colour field at the vertices.
    at_verts = texture_sample(texture, uvs[None, None])[0, 0]
    err = (at_verts - colour_of(new_verts)).abs()
    assert err.mean() < 0.01
    # Rendering the textured mesh matches rendering the vertex-coloured mesh.
    cams = OrbitCameras.evaluation(4)
    rgb_t, mask_t = render_mesh(new_verts, new_faces, cams, 64, uvs=uvs, texture=texture)
    rgb_c, mask_c = render_mesh(verts, faces, cams, 64, colours=colour_of(verts))
    assert torch.equal(mask_t, mask_c)
    fg = mask_t > 0
    assert (rgb_t - rgb_c).abs()[fg].mean() < 0.01


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def test_export_glb_roundtrip_with_texture(textured_sphere, tmp_path):
    _, _, new_verts, new_faces, uvs, texture = textured_sphere
    mesh = to_trimesh(new_verts, new_faces, uvs=uvs, texture=texture)
    written = export_mesh(mesh, tmp_path / "sphere.glb")
    assert written == [tmp_path / "sphere.glb"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    back = trimesh.load(tmp_path / "sphere.glb", force="mesh")
    assert back.faces.shape == tuple(new_faces.shape)
    assert back.vertices.shape[0] == new_verts.shape[0]
    assert np.allclose(back.vertices, new_verts.numpy(), atol=1e-6)
    image = back.visual.material.baseColorTexture
    assert image.size == (256, 256)
    assert np.allclose(back.visual.uv, uvs.numpy(), atol=1e-6)
    assert np.abs(np.asarray(image.convert("RGB"), dtype=np.float32) / 255 - texture.numpy()).max() < 1 / 255 + 1e-6


def test_export_obj_writes_obj_mtl_png(textured_sphere, tmp_path):
    _, _, new_verts, new_faces, uvs, texture = textured_sphere
    written = export_mesh(to_trimesh(new_verts, new_faces, uvs=uvs, texture=texture), tmp_path / "thing.obj")
    names = sorted(p.name for p in written)
    assert names == ["thing.mtl", "thing.obj", "thing.png"]
    assert all(p.stat().st_size > 0 for p in written)
    assert "map_Kd thing.png" in (tmp_path / "thing.mtl").read_text()
    assert "mtllib thing.mtl" in (tmp_path / "thing.obj").read_text()
    back = trimesh.load(tmp_path / "thing.obj", force="mesh")
    assert back.faces.shape == tuple(new_faces.shape)
    assert back.visual.material.image.size == (256, 256)


def test_export_ply_keeps_vertex_colours(textured_sphere, tmp_path):
    verts, faces, new_verts, new_faces, uvs, texture = textured_sphere
    colours = colour_of(verts)
    export_mesh(to_trimesh(verts, faces, vertex_colors=colours), tmp_path / "c.ply")
    back = trimesh.load(tmp_path / "c.ply", process=False)
    assert back.vertices.shape == tuple(verts.shape) and back.faces.shape == tuple(faces.shape)
    got = back.visual.vertex_colors[:, :3].astype(np.float32) / 255
    assert np.abs(got - colours.numpy()).max() <= 0.5 / 255 + 1e-6
    # A textured mesh written as PLY gets its texture sampled at the vertices.
    export_mesh(to_trimesh(new_verts, new_faces, uvs=uvs, texture=texture), tmp_path / "t.ply")
    back = trimesh.load(tmp_path / "t.ply", process=False)
    got = back.visual.vertex_colors[:, :3].astype(np.float32) / 255
    assert np.abs(got - colour_of(new_verts).numpy()).mean() < 0.02


def test_export_unknown_format(tmp_path):
    verts, faces = sphere_mesh(12)
    mesh = to_trimesh(verts, faces)
    with pytest.raises(ValueError, match="unknown mesh format"):
        export_mesh(mesh, tmp_path / "x.stl")
    with pytest.raises(ValueError, match="unknown mesh format"):
        export_mesh(mesh, tmp_path / "x.glb", format="fbx")
    with pytest.raises(ValueError):
        to_trimesh(verts, faces, texture=torch.zeros(4, 4, 3))


def test_box_atlas_last_resort_single_triangle_charts(monkeypatch):
    """When every chart overlaps itself, the last round cuts the offenders into single triangles; no chart may be
    left empty (an empty chart's bounding box is (inf, -inf) and used to make the packing fail)."""
    import att3d.mesh.atlas as atlas

    def all_overlap(xy, depth, faces, chart, n_charts, size):
        covered = torch.full((n_charts,), 100, dtype=torch.long)
        return covered.clone(), covered

    monkeypatch.setattr(atlas, "_layer_mismatch", all_overlap)
    verts, faces = sphere_mesh(12)
    vmap, new_faces, uvs = atlas.box_atlas(verts, faces, size=256, padding=1, max_rounds=1)
    assert new_faces.shape == faces.shape and torch.isfinite(uvs).all()
    assert vmap.shape[0] == 3 * faces.shape[0]  # every triangle is its own chart
    assert (uvs >= 0).all() and (uvs <= 1).all()


def test_glb_textures_are_png_at_the_export_compress_level():
    import io
    import json
    import struct

    from PIL import Image

    from att3d.mesh import export as mesh_export

    rng = np.random.default_rng(0)
    texture = (rng.random((32, 32, 3)) * 0.2 + np.linspace(0, 0.8, 32)[:, None, None]).astype(np.float32)
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=np.float64)
    mesh = mesh_export.to_trimesh(verts, np.array([[0, 1, 2]]), uvs=np.array([[0, 0], [1, 0], [0, 1.0]]),
                                  texture=texture)
    glb = mesh.export(file_type="glb")
    (json_len,) = struct.unpack("<I", glb[12:16])
    tree = json.loads(glb[20:20 + json_len])
    view = tree["bufferViews"][tree["images"][0]["bufferView"]]
    binary = glb[20 + json_len + 8:]
    png = binary[view.get("byteOffset", 0):view.get("byteOffset", 0) + view["byteLength"]]
    assert tree["images"][0]["mimeType"] == "image/png"
    image = Image.open(io.BytesIO(png))
    assert np.array_equal(np.asarray(image), mesh_export._to_uint8(texture))  # lossless
    again = io.BytesIO()
    Image.fromarray(mesh_export._to_uint8(texture)).save(again, format="png",
                                                         compress_level=mesh_export.PNG_COMPRESS_LEVEL)
    assert png == again.getvalue()


def test_taubin_sparse_path_matches_the_torch_path():
    sphere = trimesh.creation.icosphere(subdivisions=3)
    gen = torch.Generator().manual_seed(0)
    verts = torch.tensor(sphere.vertices, dtype=torch.float32)
    verts = torch.cat([verts + 0.02 * torch.randn(verts.shape, generator=gen), torch.zeros(1, 3)])  # + isolated vertex
    faces = torch.tensor(sphere.faces, dtype=torch.long)
    fast = taubin_smooth(verts, faces, iterations=7)  # CPU, no gradient: scipy sparse products
    exact = taubin_smooth(verts.clone().requires_grad_(True), faces, iterations=7)  # the torch (autograd) path
    torch.testing.assert_close(fast, exact.detach(), rtol=0, atol=2e-6)
    assert torch.equal(fast[-1], verts[-1])  # an isolated vertex stays put
    assert not torch.allclose(fast, verts, atol=1e-3)
