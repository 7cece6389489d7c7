"""Line optical depth (att3d.mesh.visibility) and the ``opacity`` surface of the extraction that uses it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from att3d.mesh import visibility
from att3d.mesh.extract import GenerationError, meshes_from_conditioning
from att3d.mesh.visibility import (
    LINES_13,
    LINES_49,
    OPACITY_DEPTH,
    directional_optical_depth,
    line_optical_depth,
    primitive_lines,
)
from att3d.world.metrics import MASK_THRESHOLD, mesh_occupancy, volume_iou
from att3d.world.render import voxel_centres
from tests.test_generate import Duck


def test_line_sets_and_the_opacity_level():
    assert len(LINES_13) == 13 and len(LINES_49) == 49 and primitive_lines(1) == LINES_13
    assert set(LINES_13) <= set(LINES_49)
    for lines in (LINES_13, LINES_49):  # one step per line: never both d and -d, all primitive
        assert not any(tuple(-c for c in d) in lines for d in lines)
        assert all(math.gcd(*map(abs, d)) == 1 for d in lines)
    assert math.isclose(1.0 - math.exp(-OPACITY_DEPTH), MASK_THRESHOLD)


def test_directional_depth_hand_computed():
    h = 0.1
    dens = torch.ones(5, 4, 3)
    # along +x: entering half a step before sample 0, tau_i = (i + 1/2) h
    tau = directional_optical_depth(dens, (1, 0, 0), h)
    assert torch.allclose(tau[:, 2, 1], (torch.arange(5) + 0.5) * h)
    # along -y: from the far face
    tau = directional_optical_depth(dens, (0, -1, 0), h)
    assert torch.allclose(tau[3, :, 0], (torch.tensor([3, 2, 1, 0]) + 0.5) * h)
    # a face diagonal: steps of h sqrt 2, and the ray through (i, j) entered at (i - min(i, j), j - min(i, j))
    tau = directional_optical_depth(dens, (1, 1, 0), h)
    i, j = torch.meshgrid(torch.arange(5), torch.arange(4), indexing="ij")
    assert torch.allclose(tau[..., 0], (torch.minimum(i, j) + 0.5) * h * math.sqrt(2))
    # a knight's step (2, 1, 0): the ray through (i, j) came from (i - 2n, j - n)
    tau = directional_optical_depth(dens, (2, 1, 0), h)
    assert torch.allclose(tau[..., 1], (torch.minimum(i // 2, j) + 0.5) * h * math.sqrt(5))
    # the trapezoid between two samples of different density
    dens = torch.zeros(3, 1, 1)
    dens[1] = 4.0
    tau = directional_optical_depth(dens, (1, 0, 0), h).flatten()
    assert torch.allclose(tau, torch.tensor([0.0, 2.0 * h, 4.0 * h]))


@pytest.mark.parametrize("bad", [(0, 0, 0), (2, 2, 0), (2, 0, 0), (1, 3)])
def test_bad_directions_are_refused(bad):
    with pytest.raises(ValueError):
        directional_optical_depth(torch.ones(3, 3, 3), bad, 0.1)
    with pytest.raises(ValueError):
        line_optical_depth(torch.ones(3, 3, 3), 0.1, (bad,))


def _brute_line_depth(dens: np.ndarray, lines, h: float) -> np.ndarray:
    """Walk every line in full from every sample (slow, obvious)."""
    R0, R1, R2 = dens.shape
    out = np.full(dens.shape, np.inf)
    for i in range(R0):
        for j in range(R1):
            for k in range(R2):
                for d in lines:
                    samples = []
                    for sign in (-1, 1):
                        n = 1 if sign == 1 else 0
                        while True:
                            p = (i + sign * n * d[0], j + sign * n * d[1], k + sign * n * d[2])
                            if not all(0 <= p[a] < dens.shape[a] for a in range(3)):
                                break
                            samples.append((sign * n, dens[p]))
                            n += 1
                    vals = [v for _, v in sorted(samples)]
                    L = h * math.sqrt(sum(c * c for c in d))
                    depth = 0.5 * L * (vals[0] + vals[-1]) + sum(0.5 * L * (a + b) for a, b in zip(vals, vals[1:]))
                    out[i, j, k] = min(out[i, j, k], depth)
    return out


@pytest.fixture(params=["numba", "torch"])
def backend(request, monkeypatch):
    """Each implementation of the line sums: the compiled kernel (the CPU default) and the torch one."""
    if request.param == "torch":
        monkeypatch.setenv(visibility.ENV, "torch")
    return request.param


def test_line_depth_matches_walking_every_line(backend):
    g = torch.Generator().manual_seed(0)
    dens = torch.rand(5, 6, 4, generator=g) * 3.0
    for lines in (LINES_13, LINES_49[:20]):
        got = line_optical_depth(dens, 0.2, lines)
        want = _brute_line_depth(dens.numpy().astype(np.float64), lines, 0.2)
        assert np.allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 2, 5), (3, 1, 2), (2, 5, 1), (4, 3, 2)])
def test_line_depth_of_grids_thinner_than_a_step(shape):
    # The compiled kernel splits each row into the samples whose ray enters there and the rest; on a grid
    # narrower than a line's step (2) along an axis every sample is an entry, and nothing is read outside.
    g = torch.Generator().manual_seed(sum(shape))
    dens = torch.rand(*shape, generator=g) * 3.0 + 0.5
    got = line_optical_depth(dens, 0.3)
    want = _brute_line_depth(dens.numpy().astype(np.float64), LINES_49, 0.3)
    assert np.allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_compiled_and_torch_line_depths_agree(monkeypatch):
    g = torch.Generator().manual_seed(1)
    lin = torch.linspace(-1, 1, 24)
    x, y, z = torch.meshgrid(lin, lin, lin, indexing="ij")
    dens = torch.where(x**2 + y**2 + z**2 < 0.5, 20.0, 0.0) * torch.rand(24, 24, 24, generator=g)
    compiled = line_optical_depth(dens, 2 / 23)
    monkeypatch.setenv(visibility.ENV, "torch")
    swept = line_optical_depth(dens, 2 / 23)
    assert torch.allclose(compiled, swept, rtol=1e-5, atol=1e-5)


def test_empty_space_is_cropped_away_and_an_empty_grid_sees_nothing():
    dens = torch.zeros(10, 10, 10)
    assert torch.equal(line_optical_depth(dens, 0.1), dens)
    dens[4:6, 4:6, 4:6] = 50.0
    dens[0, 0, 0] = 1e-6  # far below EMPTY_DENSITY: not part of the crop
    depth = line_optical_depth(dens, 0.1)
    assert float(depth[5, 5, 5]) > OPACITY_DEPTH and float(depth[0, 0, 0]) == 0.0
    assert float(depth[1, 5, 5]) == 0.0  # on an axis line through the cube, but outside the cube's box


def test_the_hull_of_a_ball_and_a_torus_with_its_hole():
    R = 48
    h = 2 / (R - 1)
    lin = torch.linspace(-1, 1, R)
    x, y, z = torch.meshgrid(lin, lin, lin, indexing="ij")
    ball = (x**2 + y**2 + z**2).sqrt() < 0.6
    hull = line_optical_depth(torch.where(ball, 100.0, 0.0), h) > OPACITY_DEPTH
    assert float(volume_iou(hull, ball)) > 0.9 and bool(hull[R // 2, R // 2, R // 2])
    # a torus in the xz-plane: the line along y through the centre sees through the hole
    torus = ((x**2 + z**2).sqrt() - 0.5) ** 2 + y**2 < 0.2**2
    depth = line_optical_depth(torch.where(torus, 100.0, 0.0), h)
    c = R // 2
    assert float(depth[c, c, c]) < OPACITY_DEPTH
    ring = ((x**2 + z**2).sqrt() - 0.5).abs() < 0.1
    assert bool((depth[ring & (y.abs() < 0.05)] > OPACITY_DEPTH).all())


def _truth_iou(mesh, scale: float = 1.0) -> float:
    pts = voxel_centres(32)
    x, z = pts[..., 0], pts[..., 2]
    truth = (torch.sqrt((torch.sqrt(x**2 + z**2) - 0.45 * scale) ** 2 + pts[..., 1] ** 2) < 0.2 * scale).numpy()
    occ = mesh_occupancy(torch.as_tensor(mesh.vertices, dtype=torch.float32), torch.as_tensor(mesh.faces), 32)
    return float(volume_iou(occ, torch.from_numpy(truth)))


class FringedTorus(torch.nn.Module):
    """The test torus (major 0.45, minor 0.2, in the xz-plane) as score distillation leaves it: opaque (density 50)
    inside, with a faint fringe 0.08 thick outside it (density 1.5: above the threshold 1, but a line through it
    gathers less than ln 2, so no render shows it)."""

    bound = 1.0

    def forward(self, points, cond):
        s = cond["scale"].to(points.dtype)[:, None]
        x, y, z = points.unbind(-1)
        sdf = torch.sqrt((torch.sqrt(x**2 + z**2) - 0.45 * s) ** 2 + y**2) - 0.2 * s
        dens = torch.where(sdf < 0, 50.0, torch.where(sdf < 0.08, 1.5, 0.0))
        return dens, torch.full_like(points, 0.5)

    def density(self, points, cond):
        return self.forward(points, cond)[0]


class FringedDuck:
    def __init__(self):
        self.field = FringedTorus()
        self.config = {"extraction": {"threshold": 1.0}}


def test_the_opacity_surface_trims_the_fringe_that_no_render_shows():
    cond = {"scale": torch.tensor([1.0])}
    duck = FringedDuck()
    fat = meshes_from_conditioning(duck, cond, grid_resolution=64, texture_size=0, surface="density")[0]
    trimmed = meshes_from_conditioning(duck, cond, grid_resolution=64, texture_size=0)[0]  # the default
    assert trimmed.metadata["att3d"]["surface"] == "opacity" and fat.metadata["att3d"]["surface"] == "density"
    assert _truth_iou(trimmed) > _truth_iou(fat) + 0.05 and _truth_iou(trimmed) > 0.8
    assert trimmed.is_watertight
    # on a field without a fringe the two surfaces agree
    plain = meshes_from_conditioning(Duck(), cond, grid_resolution=64, texture_size=0)[0]
    iso = meshes_from_conditioning(Duck(), cond, grid_resolution=64, texture_size=0, surface="density")[0]
    assert abs(_truth_iou(plain) - _truth_iou(iso)) < 0.03


def test_unknown_surface_is_a_generation_error():
    with pytest.raises(GenerationError, match="unknown surface"):
        meshes_from_conditioning(Duck(), {"scale": torch.tensor([1.0])}, grid_resolution=16, surface="iso")


class FaintBall(torch.nn.Module):
    """Density 1.5 in a ball of radius 0.1: above the threshold 1, but no line through it gathers ln 2."""

    bound = 1.0

    def forward(self, points, cond):
        dens = torch.where(points.norm(dim=-1) < 0.1, 1.5, 0.0)
        return dens, torch.full_like(points, 0.5)

    def density(self, points, cond):
        return self.forward(points, cond)[0]


def test_a_field_no_render_shows_gives_an_empty_mesh_that_says_why():
    duck = FringedDuck()
    duck.field = FaintBall()
    cond = {"scale": torch.tensor([1.0])}
    (empty,) = meshes_from_conditioning(duck, cond, grid_resolution=48, texture_size=0)
    meta = empty.metadata["att3d"]
    assert len(empty.faces) == 0 and meta["empty"] and "half opaque" in meta["reason"]
    (iso,) = meshes_from_conditioning(duck, cond, grid_resolution=48, texture_size=0, surface="density")
    assert len(iso.faces) > 0


class BallAndCornerFloater(torch.nn.Module):
    """A dense ball of radius 0.4 at the centre, and a dense cube in a corner of the box, outside the unit ball
    (where the default renderer never samples, as a triplane's untrained plane borders leave one)."""

    bound = 1.0

    def forward(self, points, cond):
        ball = points.norm(dim=-1) < 0.4
        corner = (points > 0.8).all(dim=-1)
        return torch.where(ball | corner, 50.0, 0.0), torch.full_like(points, 0.5)

    def density(self, points, cond):
        return self.forward(points, cond)[0]


class RenderedModel:
    def __init__(self, renderer):
        self.field = BallAndCornerFloater()
        self.renderer = renderer
        self.config = {"extraction": {"threshold": 1.0}}


def test_extraction_keeps_only_what_the_renders_can_sample():
    from att3d.mesh.density import density_grid
    from att3d.mesh.extract import rendered_radius
    from att3d.render.volume import VolumeRenderer

    sphere, box = VolumeRenderer(), VolumeRenderer(region="box")
    assert sphere.region_radius(1.0) == 1.0 and box.region_radius(1.0) is None
    assert VolumeRenderer(sphere_radius=None).region_radius(2.0) == pytest.approx(2.0 * math.sqrt(3.0))
    assert rendered_radius(RenderedModel(sphere), 1.0) == 1.0 and rendered_radius(Duck(), 1.0) is None
    cond = {"scale": torch.tensor([1.0])}
    # the density grid is zero outside the ball, the field's inside it
    field = BallAndCornerFloater()
    full, masked = density_grid(field, cond, 24), density_grid(field, cond, 24, radius=1.0)
    lin = torch.linspace(-1, 1, 24)
    r = (lin[:, None, None] ** 2 + lin[None, :, None] ** 2 + lin[None, None, :] ** 2).sqrt()
    assert torch.equal(masked[0][r <= 1.0], full[0][r <= 1.0]) and (masked[0][r > 1.0] == 0).all()
    assert (full[0][r > 1.0] > 0).any()
    # the mesh of the default renderer's model is the ball alone; a box renderer's model keeps the corner
    for coarse_step in (1, 4):
        (ball,) = meshes_from_conditioning(RenderedModel(sphere), cond, grid_resolution=48, texture_size=0,
                                           coarse_step=coarse_step, min_component_fraction=0.0)
        (both,) = meshes_from_conditioning(RenderedModel(box), cond, grid_resolution=48, texture_size=0,
                                           coarse_step=coarse_step, min_component_fraction=0.0)
        assert ball.bounds[1].max() < 0.5 and both.bounds[1].min() > 0.8


@pytest.mark.parametrize("shape", [(6, 5, 4), (3, 7, 2), (1, 4, 5)])
def test_line_numbers_are_shared_along_a_line_and_distinct_between_lines(shape):
    for d in LINES_49:
        (w0, w1, w2), base, size = visibility.line_index(d, shape)
        number = {}
        for p in np.ndindex(*shape):
            n = base + p[0] * w0 + p[1] * w1 + p[2] * w2
            assert 0 <= n < size
            steps = (tuple(c + d[a] * t for a, c in enumerate(p)) for t in range(-10, 11))
            line = frozenset(q for q in steps if all(0 <= c < n for c, n in zip(q, shape)))  # its samples
            number.setdefault(line, set()).add(n)
        assert all(len(ns) == 1 for ns in number.values())  # one number per line
        assert len(set().union(*number.values())) == len(number)  # different lines, different numbers


def test_line_depth_where_wanted_equals_the_full_depth_and_zero_elsewhere(backend):
    g = torch.Generator().manual_seed(3)
    dens = torch.rand(9, 7, 8, generator=g) * 2.0
    dens[0] = 0.0  # the crop box starts at x = 1
    where = torch.rand(9, 7, 8, generator=g) > 0.6
    full = line_optical_depth(dens, 0.25)
    part = line_optical_depth(dens, 0.25, where=where)
    assert torch.allclose(part[where], full[where], rtol=1e-6, atol=0.0)
    assert (part[~where] == 0).all() and (part[where][1:] > 0).any()
    assert torch.equal(line_optical_depth(dens, 0.25, where=torch.zeros_like(where)), torch.zeros_like(dens))
    with pytest.raises(ValueError, match="where must be"):
        line_optical_depth(dens, 0.25, where=where[:, :, :3])


def test_dilate_cube_is_the_3x3x3_max_pool():
    from att3d.mesh.density import dilate_cube

    g = torch.Generator().manual_seed(4)
    for shape in [(7, 6, 5), (1, 4, 3), (2, 9, 1)]:
        mask = torch.rand(*shape, generator=g) > 0.93
        pooled = torch.nn.functional.max_pool3d(mask.float()[None, None], 3, stride=1, padding=1)[0, 0] > 0
        assert torch.equal(dilate_cube(mask), pooled)


class SoftBall(torch.nn.Module):
    """A dense ball (radius 0.45) in a faint shell to radius 0.52 (density 0.9: below the threshold 1): the
    density's level places the surface, and the shell's samples next to it have a hull below ``density /
    threshold`` (a line grazing the ball gathers less than ln 2), so their hull places the vertices."""

    bound = 1.0

    def forward(self, points, cond):
        r = points.norm(dim=-1)
        dens = torch.where(r < 0.45, 50.0, torch.where(r < 0.52, 0.9, 0.0))
        return dens, torch.full_like(points, 0.5)

    def density(self, points, cond):
        return self.forward(points, cond)[0]


def test_the_extraction_reads_the_hull_only_where_marching_cubes_does(monkeypatch):
    # The opacity surface computes the hull only at or next to the density's solid; with the hull everywhere (the
    # surface's definition: marching cubes of min(density / threshold, hull)) the mesh is the same, to the vertex.
    from att3d.mesh import extract

    cond = {"scale": torch.tensor([1.0])}
    duck = FringedDuck()
    duck.field = SoftBall()
    wanted = []
    real = extract.line_optical_depth

    def spy(density, spacing, lines=LINES_49, where=None):
        wanted.append(None if where is None else float(where.float().mean()))
        return real(density, spacing, lines, where=where)

    monkeypatch.setattr(extract, "line_optical_depth", spy)
    near = meshes_from_conditioning(duck, cond, grid_resolution=48, texture_size=0)[0]
    monkeypatch.setattr(extract, "dilate_cube", torch.ones_like)  # every sample wanted
    full = meshes_from_conditioning(duck, cond, grid_resolution=48, texture_size=0)[0]
    assert wanted[0] < 0.2 and wanted[1] == 1.0  # the extraction asked for a small part of the grid
    assert np.array_equal(near.faces, full.faces) and np.array_equal(near.vertices, full.vertices)
