"""att3d.mesh.rasterize: the pure-torch rasterizer against brute force and analytic geometry."""

from __future__ import annotations

import math

import pytest
import torch

from att3d.mesh import (
    antialias,
    grid_points,
    interpolate,
    marching_cubes,
    rasterize,
    rasterize_screen,
    render_mesh,
    texture_sample,
)
from att3d.render.cameras import OrbitCameras
from att3d.world.render import render_objects
from att3d.world.shapes import COLOURS, WorldObject, sdf_sphere

RES = 32
# No pixel centre lies within 0.006 px of an edge of this triangle (checked below), so coverage
# is unambiguous and small finite-difference steps do not change it.
TRI_XY = torch.tensor([[3.4, 2.6], [27.9, 8.3], [12.2, 29.6]])


def edge_margin(tri: torch.Tensor, height: int, width: int) -> float:
    """Smallest distance from a pixel centre to the lines through the triangle's edges."""
    t = tri.double()
    c_r = torch.arange(height, dtype=torch.float64) + 0.5
    c_c = torch.arange(width, dtype=torch.float64) + 0.5
    y, x = torch.meshgrid(c_r, c_c, indexing="ij")
    dists = []
    for a, b in ((0, 1), (1, 2), (2, 0)):
        e = (t[b, 0] - t[a, 0]) * (y - t[a, 1]) - (t[b, 1] - t[a, 1]) * (x - t[a, 0])
        dists.append(float(e.abs().min() / (t[b] - t[a]).norm()))
    return min(dists)


def brute_force_coverage(tri: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(H, W) bool: pixel centres inside a 2D triangle (3, 2), by same-side tests, one pixel at a time."""
    out = torch.zeros(height, width, dtype=torch.bool)
    a, b, c = (tuple(map(float, p)) for p in tri)

    def side(p, q, r):
        return (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])

    for row in range(height):
        for col in range(width):
            p = (col + 0.5, row + 0.5)
            s = (side(a, b, p), side(b, c, p), side(c, a, p))
            out[row, col] = all(v >= 0 for v in s) or all(v <= 0 for v in s)
    return out


@pytest.mark.parametrize("order", [[0, 1, 2], [0, 2, 1]])
def test_single_triangle_coverage_bary_depth(order):
    depth = torch.tensor([1.0, 2.0, 4.0])
    faces = torch.tensor([order])
    assert edge_margin(TRI_XY, RES, RES) > 5e-3
    rast = rasterize_screen(TRI_XY, depth, faces, RES)
    expected = brute_force_coverage(TRI_XY, RES, RES)
    assert 100 < int(expected.sum()) < RES * RES
    assert torch.equal(rast.mask[0], expected)
    assert (rast.face_id[0][expected] == 0).all() and (rast.face_id[0][~expected] == -1).all()
    m = rast.mask[0]
    bary = rast.bary[0][m]  # (P, 3), in the order of the face's corners
    assert torch.allclose(bary.sum(-1), torch.ones(len(bary)), atol=1e-5)
    assert bary.min() > -1e-5
    # Perspective-correct: b_i = (s_i / z_i) / sum_j (s_j / z_j) for screen barycentrics s;
    # undo that and the screen-space interpolation of the corners reproduces the pixel centre.
    z = depth[faces[0]]
    screen = bary * z
    screen = screen / screen.sum(-1, keepdim=True)
    rows, cols = m.nonzero(as_tuple=True)
    centre = torch.stack([cols + 0.5, rows + 0.5], dim=-1).float()
    assert torch.allclose(screen @ TRI_XY[faces[0]], centre, atol=1e-4)
    # Depth: 1/z is affine in screen space.
    assert torch.allclose(rast.depth[0][m], 1.0 / (screen @ (1.0 / z)), rtol=1e-5)
    assert (rast.depth[0][~m] == 0).all() and (rast.bary[0][~m] == 0).all()


def test_culling_and_chunking():
    flat = rasterize_screen(TRI_XY, None, torch.tensor([[0, 1, 2]]), RES)
    # On screen (rows down) this corner order is clockwise: culled as a back face.
    culled = rasterize_screen(TRI_XY, None, torch.tensor([[0, 1, 2]]), RES, cull_backfaces=True)
    kept = rasterize_screen(TRI_XY, None, torch.tensor([[0, 2, 1]]), RES, cull_backfaces=True)
    assert not culled.mask.any()
    assert torch.equal(kept.mask, flat.mask)
    # Tiny candidate chunks give the same result.
    verts, faces = marching_cubes(sdf_sphere(grid_points(20)), 0.0)
    cams = OrbitCameras.evaluation(2)
    a = rasterize(verts, faces, 48, cams)
    b = rasterize(verts, faces, 48, cams)
    xy, depth = cams.project(verts[None].expand(2, -1, -1), 48)
    c = rasterize_screen(xy, depth, faces, 48, max_candidates=97)
    assert torch.equal(a.face_id, b.face_id) and torch.equal(a.face_id, c.face_id)
    assert torch.allclose(a.bary, c.bary) and torch.allclose(a.depth, c.depth)


def test_world_triangle_depth_and_bary_match_ray_casting():
    cams = OrbitCameras.from_angles([0.3, 2.0], [0.2, -0.1])
    verts = torch.tensor([[-0.4, -0.3, 0.1], [0.5, -0.2, 0.0], [0.0, 0.45, -0.2]])
    faces = torch.tensor([[0, 1, 2]])
    rast = rasterize(verts, faces, RES, cams)
    rays_o, rays_d = cams.rays(RES)
    v0, v1, v2 = verts
    n = torch.linalg.cross(v1 - v0, v2 - v0)
    # Brute-force ray/triangle: intersect the plane, then test the hit point's barycentrics.
    t = ((v0 - rays_o) @ n) / (rays_d @ n)  # (B, H, W)
    hit = rays_o + t[..., None] * rays_d
    e0, e1 = v1 - v0, v2 - v0
    d = hit - v0
    d00, d01, d11 = e0 @ e0, e0 @ e1, e1 @ e1
    d20, d21 = d @ e0, d @ e1
    den = d00 * d11 - d01 * d01
    b1 = (d11 * d20 - d01 * d21) / den
    b2 = (d00 * d21 - d01 * d20) / den
    b0 = 1 - b1 - b2
    true_bary = torch.stack([b0, b1, b2], dim=-1)
    inside = (true_bary > 1e-4).all(-1) & (t > 0)
    border = (true_bary > -1e-4).all(-1) & ~inside
    m = rast.mask
    assert m[inside].all()
    assert not (m & ~inside & ~border).any()
    assert int(inside.sum()) > 100
    # Perspective-correct barycentrics: the interpolated world point is the ray hit.
    assert torch.allclose(rast.bary[m], true_bary[m], atol=2e-4)
    p = interpolate(verts, rast, faces)
    assert torch.allclose(p[m], hit[m], atol=1e-4)
    # View depth = ray distance times the cosine to the viewing axis.
    forward = -cams.c2w()[:, :, 2]
    view_depth = t * (rays_d * forward[:, None, None, :]).sum(-1)
    assert torch.allclose(rast.depth[m], view_depth[m], rtol=1e-4)
    # ... and it projects back onto the pixel centre.
    rows, cols = m[0].nonzero(as_tuple=True)
    xy, _ = cams.index(torch.tensor([0])).project(p[0][m[0]][None], RES)
    assert torch.allclose(xy[0], torch.stack([cols + 0.5, rows + 0.5], -1).float(), atol=1e-3)


def test_clip_space_input_matches_cameras():
    cams = OrbitCameras.evaluation(3)
    verts, faces = marching_cubes(sdf_sphere(grid_points(16)), 0.0)
    xy, depth = cams.project(verts[None].expand(3, -1, -1), 40)
    ndc_x = xy[..., 0] / 40 * 2 - 1
    ndc_y = 1 - xy[..., 1] / 40 * 2
    clip = torch.stack([ndc_x * depth, ndc_y * depth, torch.zeros_like(depth), depth], dim=-1)
    a = rasterize(verts, faces, 40, cams)
    b = rasterize(clip, faces, 40)
    assert torch.equal(a.face_id, b.face_id)
    assert torch.allclose(a.depth, b.depth, atol=1e-5)
    with pytest.raises(ValueError):
        rasterize(verts, faces, 40)


@pytest.mark.parametrize("near_first", [True, False])
def test_zbuffer_nearer_triangle_wins(near_first):
    # Two overlapping screen triangles, the far one drawn large, the near one smaller.
    xy = torch.tensor([[1.0, 1.0], [30.0, 2.0], [2.0, 30.0], [6.0, 5.0], [26.0, 9.0], [9.0, 26.0]])
    depth = torch.tensor([3.0, 3.0, 3.0, 1.5, 1.5, 1.5])
    near, far = [3, 4, 5], [0, 1, 2]
    faces = torch.tensor([near, far] if near_first else [far, near])
    near_id = 0 if near_first else 1
    rast = rasterize_screen(xy, depth, faces, RES)
    near_cov = brute_force_coverage(xy[3:], RES, RES)
    far_cov = brute_force_coverage(xy[:3], RES, RES)
    assert (near_cov & far_cov).sum() > 50
    assert (rast.face_id[0][near_cov] == near_id).all()
    assert (rast.face_id[0][far_cov & ~near_cov] == 1 - near_id).all()
    assert torch.allclose(rast.depth[0][near_cov], torch.full((int(near_cov.sum()),), 1.5))


def test_zbuffer_world_two_planes():
    # A quad at z = 0.3 in front of a quad at z = -0.3 seen from +z: the front one covers it.
    def quad(z, s):
        return torch.tensor([[-s, -s, z], [s, -s, z], [s, s, z], [-s, s, z]])

    verts = torch.cat([quad(-0.3, 0.6), quad(0.3, 0.2)])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    cams = OrbitCameras.from_angles([0.0], [0.0])
    rast = rasterize(verts, faces, 48, cams)
    front = rast.face_id >= 2
    assert front.sum() > 50 and (rast.face_id >= 0).sum() > front.sum()
    assert torch.allclose(rast.depth[front], torch.full((int(front.sum()),), 2.2 - 0.3), atol=1e-5)
    back = (rast.face_id >= 0) & ~front
    assert torch.allclose(rast.depth[back], torch.full((int(back.sum()),), 2.2 + 0.3), atol=1e-5)


def test_gradients_exactly_on_covered_pixels():
    faces = torch.tensor([[0, 1, 2]])
    rast = rasterize_screen(TRI_XY, torch.tensor([1.0, 2.0, 4.0]), faces, RES)
    covered = brute_force_coverage(TRI_XY, RES, RES)
    colours = torch.rand(3, 3, generator=torch.Generator().manual_seed(0))
    # Per-pixel derivative of the image along a direction in colour space: 1 exactly where covered.
    # (Forward-mode product J u by the double-vjp trick: J u = d/dv <J^T v, u>.)
    colours.requires_grad_()
    out = interpolate(colours, rast, faces)
    v = torch.zeros_like(out, requires_grad=True)
    (vjp,) = torch.autograd.grad(out, colours, grad_outputs=v, create_graph=True)
    (tangent,) = torch.autograd.grad(vjp, v, grad_outputs=torch.ones_like(colours))
    assert torch.allclose(tangent[0][covered], torch.ones(int(covered.sum()), 3), atol=1e-5)
    assert (tangent[0][~covered] == 0).all()
    # Texture: every covered pixel sends total weight 1 into the texture (bilinear), others none.
    uvs = torch.tensor([[0.1, 0.2], [0.9, 0.3], [0.4, 0.8]], requires_grad=True)
    texture = torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    uv = interpolate(uvs, rast, faces)
    out = texture_sample(texture, uv) * rast.mask[..., None]
    out.sum().backward()
    assert math.isclose(float(texture.grad.sum()), 3 * float(covered.sum()), rel_tol=1e-5)
    assert uvs.grad.abs().sum() > 0  # the lookup is differentiable w.r.t. the uvs too


def test_gradients_wrt_vertex_positions_match_finite_differences():
    xy = TRI_XY.double().requires_grad_()
    depth = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64, requires_grad=True)
    faces = torch.tensor([[0, 1, 2]])
    attr = torch.tensor([[0.0], [1.0], [5.0]], dtype=torch.float64)

    def loss(xy_: torch.Tensor, depth_: torch.Tensor) -> torch.Tensor:
        rast = rasterize_screen(xy_, depth_, faces, RES)
        return (interpolate(attr, rast, faces) ** 2).sum()

    loss(xy, depth).backward()
    assert xy.grad.abs().sum() > 0 and depth.grad.abs().sum() > 0
    eps = 1e-6
    for i, j in [(0, 0), (1, 1), (2, 0)]:
        d = torch.zeros_like(xy)
        d[i, j] = eps
        with torch.no_grad():
            fd = (loss(xy + d, depth) - loss(xy - d, depth)) / (2 * eps)
        assert math.isclose(float(xy.grad[i, j]), float(fd), rel_tol=1e-4, abs_tol=1e-6)
    with torch.no_grad():
        dz = torch.tensor([0.0, eps, 0.0], dtype=torch.float64)
        fd = (loss(xy, depth + dz) - loss(xy, depth - dz)) / (2 * eps)
    assert math.isclose(float(depth.grad[1]), float(fd), rel_tol=1e-4, abs_tol=1e-6)


SQUARE = torch.tensor([[4.0, 4.0], [11.0, 4.0], [11.0, 11.0], [4.0, 11.0]], dtype=torch.float64)
SQUARE_FACES = torch.tensor([[0, 1, 2], [0, 2, 3]])


def antialiased_square(shift: torch.Tensor, size: int = 16) -> torch.Tensor:
    """(1, size, size, 1): a dark square (0.2) moved by ``shift`` (2,) on white, antialiased."""
    xy = (SQUARE + shift)[None]
    rast = rasterize_screen(xy, None, SQUARE_FACES, size)
    colour = torch.where(rast.mask[..., None], torch.tensor(0.2, dtype=torch.float64),
                         torch.tensor(1.0, dtype=torch.float64)).expand(1, size, size, 1)
    return antialias(colour, rast.face_id, xy, rast.depth, SQUARE_FACES)


@pytest.mark.parametrize("dx", [0.2, 0.3, 0.45, 0.7])  # edges off the kinks (pixel centres and midpoints)
def test_antialias_silhouette_gradient_matches_finite_differences(dx):
    # Edges inside the pixel grid at several sub-pixel offsets: the antialiased image is continuous and piecewise
    # linear in the square's position, and autograd's derivative is the finite difference's.
    shift = torch.tensor([dx, 0.1], dtype=torch.float64, requires_grad=True)
    weights = torch.rand(1, 16, 16, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (antialiased_square(shift) * weights).sum().backward()
    assert shift.grad.abs().min() > 1e-3  # both axes move the image
    eps = 1e-5
    for k in range(2):
        step = eps * torch.eye(2, dtype=torch.float64)[k]
        with torch.no_grad():
            fd = ((antialiased_square(shift + step) - antialiased_square(shift - step)) * weights).sum() / (2 * eps)
        assert math.isclose(float(shift.grad[k]), float(fd), rel_tol=1e-6, abs_tol=1e-9)
    # Without antialiasing the hard coverage gives the position no gradient at all.
    rast = rasterize_screen((SQUARE + shift)[None], None, SQUARE_FACES, 16)
    assert not rast.mask.float().requires_grad


def test_antialias_recovers_a_sub_pixel_shift_from_the_image():
    target = antialiased_square(torch.tensor([2.3, -1.6], dtype=torch.float64)).detach()
    shift = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([shift], lr=0.1)
    for _ in range(150):
        opt.zero_grad()
        (antialiased_square(shift) - target).square().sum().backward()
        opt.step()
    assert torch.allclose(shift.detach(), torch.tensor([2.3, -1.6], dtype=torch.float64), atol=0.05)


def test_antialias_leaves_shared_edges_and_interiors_alone():
    # Two triangles of one square share an edge: it is no occlusion edge (no depth gap), so only the square's
    # outline changes; a farther square behind a nearer one gets an edge where the depth jumps.
    xy = (SQUARE + 0.3)[None]  # the outline's pixels are rows and columns 4 and 10
    rast = rasterize_screen(xy, None, SQUARE_FACES, 16)
    colour = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = antialias(colour, rast.face_id, xy, rast.depth, SQUARE_FACES)
    inner = rast.mask.clone()
    inner[0, [4, 10], :] = False
    inner[0, :, [4, 10]] = False
    inner &= rast.mask
    assert torch.equal(out[inner], colour[inner])
    assert not torch.equal(out, colour)
    near = torch.cat([SQUARE + 0.3, SQUARE + 3.3])[None]  # square 2 (faces 2, 3) overlaps square 1, nearer
    faces = torch.cat([SQUARE_FACES, SQUARE_FACES + 4])
    rast2 = rasterize_screen(near, torch.tensor([[2.0] * 4 + [1.0] * 4], dtype=torch.float64), faces, 20)
    out2 = antialias(colour.new_zeros(1, 20, 20, 3) + (rast2.face_id >= 2)[..., None], rast2.face_id, near,
                     rast2.depth, faces)
    assert ((out2 > 0) & (out2 < 1)).any()  # the near square's edge over the far one is blended
    assert not ((out2 > 0) & (out2 < 1))[0, 5, 5].any()  # the far square's interior is not


def test_face_neighbours_pair_the_faces_across_each_edge():
    from att3d.mesh.rasterize import face_neighbours

    tetra = torch.tensor([[0, 2, 1], [0, 1, 3], [1, 2, 3], [0, 3, 2]])  # closed: every edge has two faces
    nb = face_neighbours(tetra)
    for f in range(4):
        for k in range(3):
            g = int(nb[f, k])
            a, b = int(tetra[f, k]), int(tetra[f, (k + 1) % 3])
            assert g not in (-1, f) and {a, b} <= set(tetra[g].tolist())
    assert torch.equal(face_neighbours(SQUARE_FACES), torch.tensor([[-1, -1, 1], [0, -1, -1]]))  # open square
    fan = torch.tensor([[0, 1, 2], [1, 0, 3], [0, 1, 4]])  # edge (0, 1) on three faces: non-manifold, no pair
    assert (face_neighbours(fan)[:, 0] == -1).all()


@pytest.mark.parametrize("resolution", [32, 64])
def test_antialiased_coverage_of_a_finely_meshed_sphere_is_its_area(resolution):
    # A black sphere on white, meshed with faces about a pixel large (as the mesh stage's are): the antialiased
    # image's ink is the sphere's covered area (measured by 8 x 8 supersampling), within 1.5% (a row or column of
    # pixels blends each silhouette pixel as if the edge were straight). Crossing the pixel's own face's first edge
    # instead of the silhouette's gave 12% too little at 32 px and 6% at 64 px.
    vol = sdf_sphere(grid_points(64)).neg()
    verts, faces = marching_cubes(vol, 0.0)
    cams = OrbitCameras.evaluation(2)
    rgb, mask = render_mesh(verts, faces, cams, resolution, antialias=True, colours=torch.zeros_like(verts))
    _, fine = render_mesh(verts, faces, cams, resolution * 8, colours=torch.zeros_like(verts))
    ink, area = float((1.0 - rgb.mean(-1)).sum()), float(fine.sum()) / 64
    assert ink == pytest.approx(area, rel=0.015)
    assert float(mask.sum()) == pytest.approx(area, rel=0.02)  # the hard coverage, for scale


def test_antialias_leaves_a_steep_but_unbroken_surface_alone():
    # A sphere's limb is steep: neighbouring pixels of it can lie farther apart in depth than the depth gap. The
    # walk finds no silhouette between them, so they are not blended: a white lit sphere stays within its light.
    vol = sdf_sphere(grid_points(24)).neg()
    verts, faces = marching_cubes(vol, 0.0)
    cams = OrbitCameras.evaluation(1)
    rgb, mask = render_mesh(verts, faces, cams, 32, antialias=True, lambert=True, colours=torch.ones_like(verts))
    assert float(rgb.max()) <= 1.0 + 1e-6


def test_render_mesh_antialias_moves_a_white_sphere_through_its_silhouette():
    # A white mesh on black: only the silhouette depends on the vertex positions, so the vertices get a gradient
    # only with antialiasing, and it grows the sphere towards a larger target's image.
    vol = sdf_sphere(grid_points(24)).neg()
    verts, faces = marching_cubes(vol, 0.0)
    cams = OrbitCameras.evaluation(2)
    target, _ = render_mesh(verts * 1.2, faces, cams, 32, background=None, antialias=True)
    scale = torch.tensor(1.0, requires_grad=True)
    rgb, _ = render_mesh(verts * scale, faces, cams, 32, background=None)
    assert not rgb.requires_grad
    rgb, mask = render_mesh(verts * scale, faces, cams, 32, background=None, antialias=True)
    (rgb - target).square().sum().backward()
    assert scale.grad < 0  # growing the sphere lowers the loss
    assert set(mask.unique().tolist()) <= {0.0, 1.0}  # the mask is the hard coverage


def test_world_vertex_gradient_through_cameras():
    verts, faces = marching_cubes(sdf_sphere(grid_points(16)), 0.0)
    verts = verts.clone().requires_grad_()
    cams = OrbitCameras.evaluation(2)
    rgb, mask = render_mesh(verts, faces, cams, 32, colours=verts.detach() * 0.5 + 0.5, lambert=True)
    rgb.sum().backward()
    assert verts.grad is not None and torch.isfinite(verts.grad).all() and verts.grad.abs().sum() > 0


def test_sphere_silhouette_and_colour_match_world_renderer():
    verts, faces = marching_cubes(sdf_sphere(grid_points(64)), 0.0)
    cams = OrbitCameras.evaluation(8)
    objects = [WorldObject("sphere", "red")] * 8
    truth = render_objects(objects, cams, 64)
    red = torch.tensor(COLOURS["red"]).expand(verts.shape[0], 3)
    rgb, mask = render_mesh(verts, faces, cams, 64, colours=red, lambert=True)
    inter = (mask * truth["mask"]).sum()
    union = ((mask + truth["mask"]) > 0).sum()
    assert float(inter / union) > 0.97
    both = (mask > 0) & (truth["mask"] > 0)
    assert (rgb - truth["rgb"]).abs()[both].mean() < 0.01
    assert torch.equal(rgb[mask == 0], torch.ones(int((mask == 0).sum()), 3))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rasterize_cuda_matches_cpu():
    verts, faces = marching_cubes(sdf_sphere(grid_points(32)), 0.0)
    cams = OrbitCameras.evaluation(4)
    a = rasterize(verts, faces, 64, cams)
    b = rasterize(verts.cuda(), faces.cuda(), 64, cams.to("cuda"))
    assert (a.face_id == b.face_id.cpu()).float().mean() > 0.999


def test_antialias_walk_matches_the_session_21_walk(tmp_path):
    """The walk runs without autograd and recomputes only the silhouette crossing with it: the same images and
    vertex gradients as the walk of 4d6e9ff, which built the graph through every face it crossed
    (scripts/bench_antialias.py, which also times both)."""
    import json
    import subprocess
    from pathlib import Path

    from _tiny import load_script

    script = load_script("bench_antialias")
    out = tmp_path / "aa.md"
    repo = Path(__file__).resolve().parents[1]
    # a shallow clone may lack that commit: then the script's own check against HEAD
    have = subprocess.run(["git", "-C", str(repo), "cat-file", "-e", "4d6e9ff^{commit}"], capture_output=True)
    rev = "4d6e9ff" if have.returncode == 0 else "HEAD"
    assert script.main(["--baseline", rev, "--shapes", "torus", "pyramid", "--grid", "32", "--resolution",
                        "32", "--views", "2", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    for shape in ("torus", "pyramid"):
        assert report["shapes"][shape]["image_max_abs_diff"] == 0.0
        assert report["shapes"][shape]["grad_max_rel_diff"] < 1e-5
    assert "| torus |" in out.read_text()
    with pytest.raises(SystemExit, match="cannot read"):
        script.main(["--baseline", "no-such-revision", "--shapes", "torus"])
