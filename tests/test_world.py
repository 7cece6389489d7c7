"""The shapes world (shared/WORLD.md) against analytic facts: cameras, SDFs, renderer, captions."""

from __future__ import annotations

import math

import pytest
import torch

from att3d.render.cameras import DEFAULT_FOV_DEG, DEFAULT_RADIUS, OrbitCameras
from att3d.world.render import occupancy, render_objects, voxel_centres
from att3d.world.shapes import (
    BOUND_RADIUS,
    COLOUR_NAMES,
    COLOURS,
    LIGHT_DIR,
    SDFS,
    SHAPE_NAMES,
    WorldObject,
    all_captions,
    all_objects,
    heldout_captions,
    parse_caption,
    train_captions,
)

# --------------------------------------------------------------------------------------------
# Cameras
# --------------------------------------------------------------------------------------------


def test_eye_positions_follow_the_convention():
    cams = OrbitCameras.from_angles([0.0, math.pi / 2, math.pi], 0.0)
    eyes = cams.eyes()
    expected = torch.tensor([[0.0, 0.0, DEFAULT_RADIUS], [DEFAULT_RADIUS, 0.0, 0.0], [0.0, 0.0, -DEFAULT_RADIUS]])
    assert torch.allclose(eyes, expected, atol=1e-5)
    up = OrbitCameras.from_angles([0.0], math.radians(30.0)).eyes()[0]
    assert up[1] == pytest.approx(DEFAULT_RADIUS * math.sin(math.radians(30.0)), abs=1e-5)


def test_camera_vector_is_sin_cos_of_the_angles():
    cams = OrbitCameras.from_angles([0.3, 2.0], [0.1, -0.2])
    vec = cams.as_vector()
    expected = torch.tensor([[math.sin(0.3), math.cos(0.3), math.sin(0.1), math.cos(0.1)],
                             [math.sin(2.0), math.cos(2.0), math.sin(-0.2), math.cos(-0.2)]])
    assert torch.allclose(vec, expected, atol=1e-6)


def test_pixel_origin_is_top_left():
    res = 64
    cams = OrbitCameras.from_angles([0.0], 0.0)  # looks from +z towards -z, +x to the right
    pts = torch.tensor([[[0.0, 0.3, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    xy, depth = cams.project(pts, res)
    col, row = xy[0, :, 0], xy[0, :, 1]
    assert row[0] < res / 2  # above the origin -> upper half
    assert col[1] > res / 2  # +x -> right half when looking from +z
    assert col[2] == pytest.approx(res / 2, abs=1e-4) and row[2] == pytest.approx(res / 2, abs=1e-4)
    assert depth[0, 2] == pytest.approx(DEFAULT_RADIUS, abs=1e-5)
    # The ray of the top-left pixel goes up and to the left.
    _, rays_d = cams.rays(res)
    assert rays_d[0, 0, 0, 1] > 0 and rays_d[0, 0, 0, 0] < 0


def test_project_inverts_rays():
    res = 16
    cams = OrbitCameras.from_angles([0.0, 1.0, 3.5, 5.9], [0.0, 0.4, -0.15, 0.7])
    rays_o, rays_d = cams.rays(res)
    assert torch.allclose(rays_d.norm(dim=-1), torch.ones(4, res, res), atol=1e-5)
    pts = rays_o + 1.7 * rays_d  # (B, H, W, 3)
    xy, depth = cams.project(pts.reshape(4, -1, 3), res)
    rows, cols = torch.meshgrid(torch.arange(res) + 0.5, torch.arange(res) + 0.5, indexing="ij")
    expected = torch.stack([cols, rows], dim=-1).reshape(1, -1, 2).expand(4, -1, -1)
    assert torch.allclose(xy, expected, atol=1e-3)
    assert (depth > 0).all()


def test_evaluation_views():
    cams = OrbitCameras.evaluation(8)
    assert torch.allclose(cams.phi, torch.arange(8) * math.pi / 4)
    assert torch.allclose(cams.theta, torch.full((8,), math.radians(20.0)))
    assert torch.allclose(cams.radius, torch.full((8,), DEFAULT_RADIUS))


def test_training_views_lie_in_the_elevation_range():
    gen = torch.Generator().manual_seed(0)
    cams = OrbitCameras.sample_training(4000, gen)
    lo, hi = math.radians(-10.0), math.radians(45.0)
    assert (cams.theta >= lo).all() and (cams.theta <= hi).all()
    assert (cams.phi >= 0).all() and (cams.phi < 2 * math.pi).all()
    # They fill the range (uniform), not a corner of it.
    assert cams.theta.min() < lo + 0.05 and cams.theta.max() > hi - 0.05
    assert cams.phi.min() < 0.05 and cams.phi.max() > 2 * math.pi - 0.05
    assert torch.allclose(cams.radius, torch.full((4000,), DEFAULT_RADIUS))


# --------------------------------------------------------------------------------------------
# SDFs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPE_NAMES)
def test_sdf_sign_inside_and_outside(shape):
    sdf = SDFS[shape]
    inside = torch.tensor([[0.35, 0.0, 0.0]]) if shape == "torus" else torch.zeros(1, 3)
    assert sdf(inside).item() < 0
    corners = torch.tensor([[s0, s1, s2] for s0 in (-1.0, 1.0) for s1 in (-1.0, 1.0) for s2 in (-1.0, 1.0)])
    assert (sdf(corners) > 0).all()


@pytest.mark.parametrize("shape", SHAPE_NAMES)
def test_objects_lie_inside_the_bounding_ball(shape):
    gen = torch.Generator().manual_seed(1)
    sphere_pts = torch.nn.functional.normalize(torch.randn(20000, 3, generator=gen), dim=-1) * (BOUND_RADIUS + 1e-4)
    assert (SDFS[shape](sphere_pts) > 0).all()


def test_torus_hole_is_outside():
    assert SDFS["torus"](torch.zeros(1, 3)).item() == pytest.approx(0.2, abs=1e-6)


EXACT_VALUES = {
    "sphere": [((0.8, 0.0, 0.0), 0.3), ((0.0, 0.0, 0.0), -0.5), ((0.0, -0.3, 0.4), 0.0)],
    "cube": [((0.6, 0.0, 0.0), 0.2), ((0.6, 0.6, 0.6), 0.2 * math.sqrt(3.0)), ((0.0, 0.0, 0.0), -0.4),
             ((0.3, 0.0, 0.0), -0.1), ((0.6, 0.7, 0.0), math.sqrt(0.2**2 + 0.3**2))],
    "cylinder": [((0.0, 0.65, 0.0), 0.2), ((0.6, 0.0, 0.0), 0.2), ((0.7, 0.75, 0.0), math.sqrt(0.09 + 0.09)),
                 ((0.0, 0.0, 0.0), -0.4), ((0.0, 0.3, 0.0), -0.15)],
    "cone": [((0.0, 0.6, 0.0), 0.15), ((0.0, -0.6, 0.0), 0.15), ((0.7, -0.45, 0.0), 0.2),
             ((0.0, 0.45, 0.0), 0.0)],
    "torus": [((0.35, 0.0, 0.0), -0.15), ((0.0, 0.0, 0.0), 0.2), ((0.0, 0.5, 0.35), 0.35), ((0.8, 0.0, 0.0), 0.3)],
    "capsule": [((0.0, 0.8, 0.0), 0.2), ((0.5, 0.0, 0.0), 0.2), ((0.0, 0.0, 0.0), -0.3),
                ((0.0, -0.9, 0.0), 0.3), ((0.4, 0.5, 0.0), math.sqrt(0.16 + 0.04) - 0.3)],
    "pyramid": [((0.0, -0.6, 0.0), 0.15)],
    "octahedron": [((0.0, 0.0, 0.0), -0.6 / math.sqrt(3.0)), ((0.2, 0.2, 0.2), 0.0)],
}


@pytest.mark.parametrize("shape", SHAPE_NAMES)
def test_sdf_exact_values(shape):
    pts = torch.tensor([p for p, _ in EXACT_VALUES[shape]])
    want = torch.tensor([d for _, d in EXACT_VALUES[shape]])
    assert torch.allclose(SDFS[shape](pts), want, atol=1e-5)


def _sample_triangles(tris: torch.Tensor, n_per: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform points on each of T triangles (T, 3, 3) -> (T * n_per, 3)."""
    u = torch.rand(tris.shape[0], n_per, 2, generator=gen, dtype=torch.float64)
    flip = u.sum(-1) > 1
    u = torch.where(flip[..., None], 1 - u, u)
    a, b, c = tris[:, None, 0], tris[:, None, 1], tris[:, None, 2]
    return (a + u[..., :1] * (b - a) + u[..., 1:] * (c - a)).reshape(-1, 3)


def _surface_samples(shape: str, n_per: int = 40000) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if shape == "octahedron":
        s = 0.6
        tris = [[[sx * s, 0, 0], [0, sy * s, 0], [0, 0, sz * s]] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]
    elif shape == "pyramid":
        h, yb, ya = 0.45, -0.45, 0.45
        base = [[-h, yb, -h], [h, yb, -h], [h, yb, h], [-h, yb, h]]
        apex = [0.0, ya, 0.0]
        tris = [[base[i], base[(i + 1) % 4], apex] for i in range(4)] + [[base[0], base[1], base[2]],
                                                                          [base[0], base[2], base[3]]]
    elif shape == "cone":  # lateral surface and base disc, as thin fans of triangles
        k = 720
        ang = torch.arange(k + 1, dtype=torch.float64) * 2 * math.pi / k
        rim = torch.stack([0.5 * torch.cos(ang), torch.full_like(ang, -0.45), 0.5 * torch.sin(ang)], -1)
        apex = torch.tensor([0.0, 0.45, 0.0], dtype=torch.float64).expand(k, 3)
        centre = torch.tensor([0.0, -0.45, 0.0], dtype=torch.float64).expand(k, 3)
        tris_t = torch.cat([torch.stack([rim[:-1], rim[1:], apex], 1), torch.stack([rim[:-1], rim[1:], centre], 1)])
        return _sample_triangles(tris_t, n_per // 100, gen)
    else:
        raise ValueError(shape)
    return _sample_triangles(torch.tensor(tris, dtype=torch.float64), n_per, gen)


@pytest.mark.parametrize("shape", ["pyramid", "octahedron", "cone"])
def test_sdf_never_exceeds_true_distance(shape):
    surface = _surface_samples(shape)
    sdf = SDFS[shape]
    # Surface samples lie on the zero level set.
    assert sdf(surface.float()).abs().max() < 1e-5
    gen = torch.Generator().manual_seed(2)
    pts = (torch.rand(400, 3, generator=gen, dtype=torch.float64) * 2 - 1) * 0.6
    dist = torch.cdist(pts, surface).min(dim=1).values  # >= true distance (sampling), <= true + gap
    d = sdf(pts.float()).double()
    # Conservative: |sdf| never larger than the true distance (up to float32 rounding).
    assert (d.abs() <= dist + 1e-4).all()
    # Right sign: points far from the surface are classified correctly on both sides.
    if shape == "cone":  # exact SDF: equal to the distance up to the sampling gap
        assert torch.allclose(d.abs(), dist, atol=5e-3)
    else:  # exact inside (max of face planes), a bound outside that is still informative
        inside = d < 0
        assert inside.sum() > 20 and (~inside).sum() > 20
        assert torch.allclose(d[inside].abs(), dist[inside], atol=5e-3)
        # Outside it is at worst ~0.45 of the distance (above the pyramid's apex); checked away from
        # the surface, where the sampled distance is accurate.
        away = ~inside & (dist > 0.05)
        assert away.sum() > 50
        assert (d[away] >= 0.4 * dist[away]).all()


def _analytic_inside(shape: str, p: torch.Tensor) -> torch.Tensor:
    """Membership by the defining inequalities of WORLD.md (independent of the SDFs). p: (..., 3)."""
    x, y, z = p.unbind(-1)
    r_xz = torch.sqrt(x * x + z * z)
    if shape == "sphere":
        return p.norm(dim=-1) < 0.5
    if shape == "cube":
        return (p.abs() < 0.4).all(-1)
    if shape == "cylinder":
        return (r_xz < 0.4) & (y.abs() < 0.45)
    if shape == "cone":
        return (y.abs() < 0.45) & (r_xz < 0.5 * (0.45 - y) / 0.9)
    if shape == "torus":
        return (r_xz - 0.35) ** 2 + y * y < 0.15**2
    if shape == "pyramid":
        half = 0.45 * (0.45 - y) / 0.9
        return (y > -0.45) & (x.abs() < half) & (z.abs() < half)
    if shape == "capsule":
        return torch.sqrt(x * x + (y.abs() - 0.3).clamp(min=0) ** 2 + z * z) < 0.3
    if shape == "octahedron":
        return p.abs().sum(-1) < 0.6
    raise ValueError(shape)


ANALYTIC_VOLUMES = {
    "sphere": 4 / 3 * math.pi * 0.5**3,
    "cube": 0.8**3,
    "cylinder": math.pi * 0.4**2 * 0.9,
    "cone": math.pi * 0.5**2 * 0.9 / 3,
    "torus": 2 * math.pi**2 * 0.35 * 0.15**2,
    "pyramid": 0.9**2 * 0.9 / 3,
    "capsule": math.pi * 0.3**2 * 0.6 + 4 / 3 * math.pi * 0.3**3,
    "octahedron": 4 / 3 * 0.6**3,
}


def test_voxel_centres_layout():
    centres = voxel_centres(64)
    assert centres.shape == (64, 64, 64, 3)
    assert centres[0, 0, 0].tolist() == pytest.approx([-1 + 1 / 64] * 3)
    assert centres[63, 0, 0, 0].item() == pytest.approx(1 - 1 / 64)
    c = (torch.arange(64) + 0.5) / 32 - 1
    assert torch.allclose(centres[5, 7, 9], torch.stack([c[5], c[7], c[9]]))


@pytest.mark.parametrize("shape", SHAPE_NAMES)
def test_occupancy_matches_the_definition(shape):
    occ = occupancy(WorldObject(shape, "red"), 64)
    assert occ.shape == (64, 64, 64) and occ.dtype == torch.bool
    want = _analytic_inside(shape, voxel_centres(64).double())
    # Identical up to voxel centres within float32 rounding of the surface.
    assert (occ != want).sum().item() <= 4
    # And the voxel volume approximates the analytic volume (within the grid's discretisation error).
    assert occ.sum().item() * (2.0 / 64) ** 3 == pytest.approx(ANALYTIC_VOLUMES[shape], rel=0.1)
    # Fine Monte Carlo check of the analytic volume itself.
    pts = torch.rand(400000, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1.6 - 0.8
    assert _analytic_inside(shape, pts).double().mean().item() * 1.6**3 == pytest.approx(ANALYTIC_VOLUMES[shape],
                                                                                          rel=0.03)


# --------------------------------------------------------------------------------------------
# Renderer
# --------------------------------------------------------------------------------------------


def test_sphere_silhouette_is_the_projected_disc():
    res = 128
    out = render_objects([WorldObject("sphere", "blue")], OrbitCameras.from_angles([0.7], 0.3), res)
    area = out["mask"][0].mean().item()
    half_angle = math.asin(0.5 / DEFAULT_RADIUS)
    disc_radius = math.tan(half_angle) / math.tan(math.radians(DEFAULT_FOV_DEG) / 2)  # in [-1, 1] image units
    expected = math.pi * disc_radius**2 / 4.0
    assert area == pytest.approx(expected, rel=0.02)
    # Centred: the mask is symmetric about the image centre.
    m = out["mask"][0]
    assert torch.equal(m, m.flip(0)) or (m != m.flip(0)).float().mean() < 0.005
    assert (out["rgb"][0][m == 0] == 1.0).all()  # white background


def _light() -> torch.Tensor:
    return torch.tensor(LIGHT_DIR)


def test_cube_front_face_colour():
    obj = WorldObject("cube", "orange")
    out = render_objects([obj], OrbitCameras.from_angles([0.0], 0.0), 64)
    centre = out["rgb"][0, 32, 32]
    albedo = torch.tensor(COLOURS["orange"])
    assert torch.allclose(centre, albedo * (0.35 + 0.65 * _light()[2]), atol=2e-3)
    assert torch.allclose(out["normal"][0, 32, 32], torch.tensor([0.0, 0.0, 1.0]), atol=1e-3)
    assert out["depth"][0, 32, 32].item() == pytest.approx(DEFAULT_RADIUS - 0.4, abs=1e-3)


def test_cube_top_face_colour_from_above():
    obj = WorldObject("cube", "green")
    out = render_objects([obj], OrbitCameras.from_angles([1.0], math.radians(80.0)), 64)
    centre = out["rgb"][0, 32, 32]
    albedo = torch.tensor(COLOURS["green"])
    assert torch.allclose(centre, albedo * (0.35 + 0.65 * _light()[1]), atol=2e-3)
    assert torch.allclose(out["normal"][0, 32, 32], torch.tensor([0.0, 1.0, 0.0]), atol=1e-3)


def test_radiance_does_not_depend_on_the_viewer():
    # The +x face of the cube seen from two different directions has the same colour.
    obj = WorldObject("cube", "gray")
    cams = OrbitCameras.from_angles([math.pi / 2, math.pi / 2 + 0.4], 0.0)
    out = render_objects([obj, obj], cams, 64)
    albedo = torch.tensor(COLOURS["gray"])
    want = albedo * (0.35 + 0.65 * _light()[0])
    for b in range(2):
        n = out["normal"][b]
        on_face = (n - torch.tensor([1.0, 0.0, 0.0])).norm(dim=-1) < 1e-3
        assert on_face.sum() > 100
        assert torch.allclose(out["rgb"][b][on_face], want.expand(int(on_face.sum()), 3), atol=2e-3)


def test_back_of_the_light_gets_ambient_only():
    obj = WorldObject("sphere", "red")
    # From behind the light direction we see points whose normal faces away from the light.
    out = render_objects([obj], OrbitCameras.from_angles([math.pi + math.atan2(0.5, 0.6)], math.radians(-10.0)), 64)
    albedo = torch.tensor(COLOURS["red"])
    centre = out["rgb"][0, 32, 32]
    assert torch.allclose(centre, albedo * 0.35, atol=2e-3)


def test_renders_are_batched_per_camera():
    objs = [WorldObject("sphere", "red"), WorldObject("cube", "blue"), WorldObject("torus", "yellow")]
    cams = OrbitCameras.evaluation(3)
    out = render_objects(objs, cams, 32)
    assert out["rgb"].shape == (3, 32, 32, 3) and out["mask"].shape == (3, 32, 32)
    single = render_objects(objs[1:2], cams.index(torch.tensor([1])), 32)
    assert torch.allclose(out["rgb"][1], single["rgb"][0])
    with pytest.raises(ValueError):
        render_objects(objs, OrbitCameras.evaluation(2), 32)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def test_captions():
    caps = all_captions()
    assert len(caps) == 64 and len(set(caps)) == 64
    assert caps[0] == "a red sphere" and caps[8 * 1 + 1] == "a orange cube"
    assert [o.caption for o in all_objects()] == caps
    held = heldout_captions()
    assert held == [f"a {c} {s}" for s, c in zip(SHAPE_NAMES, COLOUR_NAMES)]
    assert "a orange cube" in held and "a gray octahedron" in held
    train = train_captions()
    assert len(train) == 56 and not set(train) & set(held) and set(train) | set(held) == set(caps)
    for c in caps:
        obj = parse_caption(c)
        assert obj.caption == c and caps.index(c) == 8 * obj.shape_index + obj.colour_index
    assert parse_caption("  A Orange   CUBE ") == WorldObject("cube", "orange")
    with pytest.raises(ValueError):
        parse_caption("an orange cube")
    with pytest.raises(ValueError):
        parse_caption("a teal cube")
