"""The fast generation path: coarse-to-fine density, the cropped solid fill, Lewiner marching cubes, the compiled
rasterizer (numba) against the torch one, threaded meshing and mesh-normal colour reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from att3d.mesh import raster_cpu
from att3d.mesh.cleanup import face_normals
from att3d.mesh.decimate import is_closed
from att3d.mesh.density import (
    coarse_indices,
    density_grid,
    fill_interior,
    interpolation_matrix,
    refine_mask,
    surface_density_grid,
)
from att3d.mesh.extract import GenerationError, meshes_from_conditioning
from att3d.mesh.marching_cubes import grid_points, marching_cubes, marching_cubes_lewiner
from att3d.mesh.rasterize import interpolate, rasterize, rasterize_screen
from att3d.render.cameras import OrbitCameras
from att3d.world.metrics import mesh_occupancy, volume_iou
from att3d.world.render import voxel_centres
from tests.test_generate import THRESHOLD, Duck, TorusField


class CountingField(TorusField):
    """The torus field, counting the points it is asked for."""

    def __init__(self):
        super().__init__()
        self.points = 0

    def forward(self, points, cond):
        self.points += points.shape[0] * points.shape[1]
        return super().forward(points, cond)


COND = {"scale": torch.tensor([1.0, 0.7])}


# -- coarse to fine ------------------------------------------------------------------------------------------------

def test_coarse_indices_and_interpolation_matrix():
    idx = coarse_indices(10, 4)
    assert idx.tolist() == [0, 4, 8, 9]
    w = interpolation_matrix(10, idx)
    assert torch.allclose(w.sum(1), torch.ones(10))
    # linear functions are reproduced exactly, and coarse samples are copied
    f = idx.float() * 2.0 + 1.0
    assert torch.allclose(w @ f, torch.arange(10).float() * 2.0 + 1.0)
    assert torch.equal(w[idx], torch.eye(4))


@pytest.mark.parametrize("step", [2, 4, 6])
def test_surface_density_grid_is_exact_near_the_surface_and_keeps_occupancy(step):
    field = CountingField()
    dense = density_grid(field, COND, 64)
    dense_points = field.points
    field.points = 0
    grid, evaluated = surface_density_grid(field, COND, 64, THRESHOLD, step=step)
    assert grid.shape == dense.shape == (2, 64, 64, 64)
    # the samples the field computed are the dense grid's (to float rounding: other batch shapes), far fewer than all
    assert torch.allclose(grid[evaluated], dense[evaluated], rtol=1e-5, atol=1e-5)
    assert field.points < 0.5 * dense_points
    # every cube the surface crosses has all its corners evaluated, so the occupancy is the same everywhere
    assert torch.equal(grid > THRESHOLD, dense > THRESHOLD)
    occ = dense > THRESHOLD
    cube_any = torch.zeros(2, 63, 63, 63, dtype=torch.bool)
    cube_all = torch.ones(2, 63, 63, 63, dtype=torch.bool)
    cube_eval = torch.ones(2, 63, 63, 63, dtype=torch.bool)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                sl = (slice(None), slice(dx, 63 + dx), slice(dy, 63 + dy), slice(dz, 63 + dz))
                cube_any |= occ[sl]
                cube_all &= occ[sl]
                cube_eval &= evaluated[sl]
    crossed = cube_any & ~cube_all
    assert bool(cube_eval[crossed].all())


@pytest.mark.parametrize("margin", [0, 1, 2])
def test_refine_mask_is_every_sample_of_the_crossed_cells_grown_by_the_margin(margin):
    # the definition with float max-pools: a cell is crossed when its 8 corners disagree; grown by margin cells
    g = torch.Generator().manual_seed(margin)
    coarse = coarse_indices(47, 4)  # 0, 4, ..., 44, 46: a last cell narrower than the others
    rc = coarse.shape[0]
    dens = torch.rand(2, rc, rc, rc, generator=g) * 0.5
    dens[0, 1, 2, 3] = dens[0, 2, 2, 3] = dens[1, 10, 11, 11] = 1.0  # an object, and one at the narrow cells
    occ = (dens > 0.8).float()[:, None]
    crossed = F.max_pool3d(occ, 2, stride=1) > -F.max_pool3d(-occ, 2, stride=1)
    crossed = (F.max_pool3d(crossed.float(), 2 * margin + 1, stride=1, padding=margin) > 0)[:, 0]
    want = torch.zeros(2, 47, 47, 47, dtype=torch.bool)
    for b, a, c, d in crossed.nonzero().tolist():
        want[b, coarse[a]:coarse[a + 1] + 1, coarse[c]:coarse[c + 1] + 1, coarse[d]:coarse[d + 1] + 1] = True
    assert torch.equal(refine_mask(dens, 0.8, 47, coarse, margin), want) and 0 < int(want.sum()) < want.numel()


class LatticeField(TorusField):
    """The torus field with a ``lattice`` method (as a triplane has), counting the lattices built."""

    def __init__(self):
        super().__init__()
        self.lattices = 0

    def lattice(self, axis, cond):
        self.lattices += 1
        field = self

        class Lattice:
            def density(self, i, j, k):
                points = torch.stack([axis[i], axis[j], axis[k]], dim=-1)[None]
                return field.density(points.expand(next(iter(cond.values())).shape[0], -1, -1), cond)

        return Lattice()


@pytest.mark.parametrize("batch", [1, 2])
def test_surface_density_grid_builds_each_prompts_lattice_once(batch):
    field = LatticeField()
    cond = {"scale": COND["scale"][:batch]}
    grid, _ = surface_density_grid(field, cond, 48, THRESHOLD, step=4)  # three levels: 4, 2, 1
    assert field.lattices == (1 if batch == 1 else 1 + batch)
    assert torch.equal(grid > THRESHOLD, density_grid(TorusField(), cond, 48) > THRESHOLD)


def test_surface_density_grid_step_one_is_the_dense_grid():
    field = TorusField()
    grid, evaluated = surface_density_grid(field, COND, 24, THRESHOLD, step=1)
    assert torch.equal(grid, density_grid(field, COND, 24)) and bool(evaluated.all())


def test_surface_density_grid_empty_field_evaluates_only_the_coarse_grid():
    field = CountingField()
    grid, evaluated = surface_density_grid(field, {"scale": torch.tensor([1.0])}, 64, 1e9, step=4)
    assert not bool(evaluated.any()) and field.points == 17**3  # 0, 4, ..., 60, 63
    assert float(grid.max()) < 1e9


# -- solid fill ----------------------------------------------------------------------------------------------------

def _scipy_fill(density: torch.Tensor, threshold: float, close_voxels: int) -> torch.Tensor:
    inside = (density > threshold).numpy()
    solid = ndimage.binary_closing(inside, iterations=close_voxels) if close_voxels > 0 else inside
    solid = ndimage.binary_fill_holes(solid | inside)
    filled = torch.from_numpy(solid & ~inside)
    return torch.where(filled, torch.full_like(density, 2.0 * threshold), density)


@pytest.mark.parametrize("close_voxels", [0, 2, 5])
def test_fill_interior_matches_scipy_closing_and_fill_holes(close_voxels):
    rng = np.random.default_rng(close_voxels)
    g = np.zeros((48, 48, 48), dtype=np.float32)
    # a hollow, cracked shell with pockets, away from the grid's border
    x, y, z = np.meshgrid(*[np.arange(48)] * 3, indexing="ij")
    r = np.sqrt((x - 24.0) ** 2 + (y - 22.0) ** 2 + (z - 25.0) ** 2)
    g[(r > 9) & (r < 14)] = 10.0
    g[(r > 9) & (r < 14) & (np.abs(x - 24) < 1.5) & (y > 22)] = 0.0  # a crack
    g[rng.random(g.shape) < 0.05] = 0.0  # pores
    d = torch.from_numpy(g)
    ours = fill_interior(d, 5.0, close_voxels)
    assert torch.equal(ours, _scipy_fill(d, 5.0, close_voxels))
    assert float((ours > 5).sum()) > float((d > 5).sum())


def test_fill_interior_of_an_empty_grid_is_a_copy():
    d = torch.zeros(8, 8, 8)
    out = fill_interior(d, 1.0, 2)
    assert torch.equal(out, d) and out is not d


# -- marching cubes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("inside", ["above", "below"])
def test_lewiner_marching_cubes_is_closed_outward_and_agrees_with_tets(inside):
    pts = grid_points(40)
    sdf = pts.norm(dim=-1) - 0.6
    vol, thr = (-sdf, 0.0) if inside == "above" else (sdf, 0.0)
    v, f = marching_cubes_lewiner(vol, thr, inside=inside)
    vt, ft = marching_cubes(vol, thr, inside=inside)
    assert v.dtype == torch.float32 and f.dtype == torch.long
    assert is_closed(f)
    assert f.shape[0] < 0.6 * ft.shape[0]  # the 256-case table: far fewer triangles than the Kuhn split
    # outward: normals point away from the centre; the vertices lie on the sphere like the tets' do
    n = face_normals(v, f)
    assert float((n * v[f].mean(1)).sum(-1).min()) > 0
    assert abs(float(v.norm(dim=-1).mean()) - float(vt.norm(dim=-1).mean())) < 2e-3
    assert float((v.norm(dim=-1) - 0.6).abs().max()) < 0.02


def test_lewiner_marching_cubes_empty_and_bad_input():
    v, f = marching_cubes_lewiner(torch.zeros(8, 8, 8), 1.0, inside="above")
    assert v.shape == (0, 3) and f.shape == (0, 3)
    with pytest.raises(ValueError):
        marching_cubes_lewiner(torch.zeros(4, 4), 0.0)
    with pytest.raises(ValueError):
        marching_cubes_lewiner(torch.zeros(4, 4, 4), 0.0, inside="left")


# -- compiled rasterizer -------------------------------------------------------------------------------------------

def _random_mesh(seed: int, n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    verts = torch.rand(n * 3, 3, generator=g) * 1.4 - 0.7
    faces = torch.arange(n * 3).reshape(n, 3)
    return verts, faces


@pytest.mark.skipif(not raster_cpu.available(torch.device("cpu")), reason="numba is not installed")
@pytest.mark.parametrize("cull", [False, True])
def test_compiled_rasterizer_matches_the_torch_pass(monkeypatch, cull):
    verts, faces = _random_mesh(0)
    cams = OrbitCameras.turntable(5)
    monkeypatch.setenv(raster_cpu.ENV, "torch")
    ref = rasterize(verts, faces, 48, cams, cull_backfaces=cull)
    ref_uv = interpolate(verts[:, :2], ref, faces)
    monkeypatch.setenv(raster_cpu.ENV, "auto")
    out = rasterize(verts, faces, 48, cams, cull_backfaces=cull)
    out_uv = interpolate(verts[:, :2], out, faces)
    assert float((ref.face_id >= 0).float().mean()) > 0.2
    assert torch.equal(out.face_id, ref.face_id)
    assert torch.allclose(out.bary, ref.bary, atol=1e-5)
    assert torch.allclose(out.depth, ref.depth, atol=1e-5)
    assert torch.allclose(out_uv, ref_uv, atol=1e-5)


@pytest.mark.skipif(not raster_cpu.available(torch.device("cpu")), reason="numba is not installed")
def test_compiled_rasterizer_keeps_gradients_and_flat_mode(monkeypatch):
    verts, faces = _random_mesh(1, 50)
    xy = (verts[:, :2] + 1.0) * 16.0
    monkeypatch.setenv(raster_cpu.ENV, "torch")
    ref = rasterize_screen(xy, None, faces, 32)
    monkeypatch.setenv(raster_cpu.ENV, "auto")
    out = rasterize_screen(xy, None, faces, 32)
    assert torch.equal(out.face_id, ref.face_id)  # ties of the flat mode go to the larger face index in both
    v = verts.clone().requires_grad_(True)
    cams = OrbitCameras.turntable(2)
    r = rasterize(v, faces, 32, cams)
    assert r.bary.requires_grad
    (interpolate(v[:, :1], r, faces).sum() + r.depth.sum()).backward()  # through the barycentrics and depth
    assert v.grad is not None and bool(torch.isfinite(v.grad).all()) and float(v.grad.abs().sum()) > 0


@pytest.mark.skipif(not raster_cpu.available(torch.device("cpu")), reason="numba is not installed")
def test_compiled_rasterizer_skips_bad_faces(monkeypatch):
    xy = torch.tensor([[[1.0, 1.0], [30.0, 2.0], [2.0, 30.0], [1e30, 1.0], [float("nan"), 3.0], [5.0, 5.0]]])
    depth = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    faces = torch.tensor([[0, 1, 2], [0, 3, 2], [0, 4, 2], [0, 1, 5], [0, 0, 1]])
    out = rasterize_screen(xy, depth, faces, 32)
    monkeypatch.setenv(raster_cpu.ENV, "torch")
    ref = rasterize_screen(xy, depth, faces, 32)
    assert torch.equal(out.face_id, ref.face_id)
    assert set(out.face_id.unique().tolist()) <= {-1, 0, 1}


# -- the whole path ------------------------------------------------------------------------------------------------

def _iou(mesh) -> float:
    truth_pts = voxel_centres(32)
    x, z = truth_pts[..., 0], truth_pts[..., 2]
    truth = (torch.sqrt((torch.sqrt(x**2 + z**2) - 0.45) ** 2 + truth_pts[..., 1] ** 2) < 0.2).numpy()
    occ = mesh_occupancy(torch.as_tensor(mesh.vertices, dtype=torch.float32), torch.as_tensor(mesh.faces), 32)
    return float(volume_iou(occ, torch.from_numpy(truth)))


def test_fast_path_matches_the_exact_path():
    cond = {"scale": torch.tensor([1.0])}
    fast = meshes_from_conditioning(Duck(), cond, grid_resolution=64, texture_size=64)[0]
    exact = meshes_from_conditioning(Duck(), cond, grid_resolution=64, texture_size=64, coarse_step=1,
                                     iso_method="tets", colour_normals="field")[0]
    assert abs(_iou(fast) - _iou(exact)) < 0.01 and _iou(fast) > 0.85
    assert len(fast.faces) < len(exact.faces)
    # colours read along the mesh's normals are the field's colour inside the surface, as along the gradient's
    truth = TorusField.true_colour(torch.as_tensor(fast.vertices, dtype=torch.float32)).numpy()
    vcol = fast.vertex_attributes["color"][:, :3] / 255.0
    assert float(np.abs(vcol - truth).mean()) < 0.03


def test_threaded_meshing_gives_the_same_meshes():
    cond = {"scale": torch.tensor([1.0, 0.8, 0.9])}
    one = meshes_from_conditioning(Duck(), cond, grid_resolution=40, texture_size=32, workers=1)
    two = meshes_from_conditioning(Duck(), cond, grid_resolution=40, texture_size=32, workers=2)
    for a, b in zip(one, two):
        assert np.array_equal(a.faces, b.faces) and np.allclose(a.vertices, b.vertices)
        assert np.array_equal(np.asarray(a.visual.material.baseColorTexture),
                              np.asarray(b.visual.material.baseColorTexture))


@pytest.mark.parametrize("kw", [{"coarse_step": 0}, {"iso_method": "dual"}, {"colour_normals": "up"}])
def test_bad_fast_path_options(kw):
    with pytest.raises(GenerationError):
        meshes_from_conditioning(Duck(), {"scale": torch.tensor([1.0])}, grid_resolution=16, **kw)
