"""Volume renderer: silhouettes against the world's renderer, compositing, importance sampling, backends."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from att3d.registry import RENDERERS
from att3d.render import VolumeRenderer, nerfacc_backend, sampling
from att3d.render.cameras import OrbitCameras
from att3d.world.render import render_objects
from att3d.world.shapes import WorldObject

HAS_CUDA = torch.cuda.is_available()


class BallsField(nn.Module):
    """Analytic field: prompt b is a ball of constant density of radius ``cond["radius"][b]`` (default 0.5),
    or a shell of that radius and ``thickness``; colour ``cond["colour"][b]`` (default grey-blue)."""

    bound = 1.0

    def __init__(self, sigma: float = 50.0, thickness: float | None = None):
        super().__init__()
        self.sigma = sigma
        self.thickness = thickness
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, points: torch.Tensor, cond: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = points.shape
        radius = cond.get("radius", torch.full((B,), 0.5, device=points.device))[:, None]
        r = points.norm(dim=-1)
        if self.thickness is None:
            inside = r < radius
        else:
            inside = (r - radius).abs() < self.thickness / 2
        density = self.sigma * inside.to(points.dtype) * self.gain
        colour = cond.get("colour", torch.tensor([[0.2, 0.4, 0.6]], device=points.device).expand(B, 3))
        rgb = colour[:, None, :].expand(B, N, 3) * self.gain.clamp(max=1.0)
        return density, rgb

    def density(self, points: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward(points, cond)[0]


class SlabField(nn.Module):
    """Constant density ``sigma`` in the slab ``|z| < half``, zero elsewhere; white."""

    bound = 1.0

    def __init__(self, sigma: float, half: float):
        super().__init__()
        self.sigma, self.half = sigma, half

    def forward(self, points, cond):
        d = self.sigma * (points[..., 2].abs() < self.half).to(points.dtype)
        return d, torch.ones(*points.shape[:-1], 3)

    def density(self, points, cond):
        return self.forward(points, cond)[0]


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a & b).sum() / (a | b).sum()).item()


# -- sampling primitives ---------------------------------------------------------------------


def test_ray_box_intersection():
    o = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 0.0], [0.0, 2.0, 3.0], [0.5, 0.5, 3.0]])
    d = torch.tensor([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    near, far, hit = sampling.ray_box_intersect(o, d, 1.0)
    assert hit.tolist() == [True, True, False, True]
    assert torch.allclose(near, torch.tensor([2.0, 0.0, 0.0, 2.0]))
    assert torch.allclose(far, torch.tensor([4.0, 1.0, 0.0, 4.0]))
    near, far, hit = sampling.ray_sphere_intersect(o[:1], d[:1], 0.5)
    assert torch.allclose(near, torch.tensor([2.5])) and torch.allclose(far, torch.tensor([3.5]))


def test_compositing_constant_density_matches_beer_lambert():
    sigma, length = 1.7, 0.9
    edges = torch.linspace(0.3, 0.3 + length, 33)[None]
    density = torch.full((1, 32), sigma)
    rgb = torch.tensor([0.1, 0.5, 0.9]).expand(1, 32, 3)
    out = sampling.composite(density, rgb, edges[:, :-1], edges[:, 1:])
    expected = 1 - math.exp(-sigma * length)
    assert abs(out["opacity"].item() - expected) < 1e-5
    assert torch.allclose(out["rgb"][0], torch.tensor([0.1, 0.5, 0.9]) * expected, atol=1e-5)
    assert torch.allclose(out["weights"].sum(-1), out["opacity"])
    # depth: the weight-averaged distance of an exponential inside the interval
    tmid = 0.5 * (edges[0, :-1] + edges[0, 1:])
    assert abs(out["depth"].item() - ((out["weights"][0] * tmid).sum() / expected).item()) < 1e-5


def test_slab_render_matches_analytic_opacity():
    sigma, half = 3.0, 0.25
    cams = OrbitCameras.from_angles([0.0], 0.0)  # looks along -z, through the slab
    r = VolumeRenderer(backend="torch", num_samples=400, region="box").eval()  # the slab spans the box
    out = r(SlabField(sigma, half), {}, cams, 16)
    _, rays_d = cams.rays(16)
    length = 2 * half / rays_d[..., 2].abs()
    expected = 1 - torch.exp(-sigma * length)
    assert torch.allclose(out["opacity"], expected, atol=0.01)
    # white radiance on a white background stays white; on black it is the opacity
    assert torch.allclose(out["rgb"], torch.ones_like(out["rgb"]), atol=1e-5)
    black = r(SlabField(sigma, half), {}, cams, 16, background=None)
    assert torch.allclose(black["rgb"], out["opacity"][..., None].expand(-1, -1, -1, 3), atol=1e-5)


def test_sample_pdf_concentrates_on_heavy_bins():
    edges = torch.linspace(0, 1, 33).expand(4, 33)
    w = torch.zeros(4, 32)
    w[:, 10] = 1.0
    for stratified in (False, True):
        t = sampling.sample_pdf(edges, w, 64, stratified=stratified, generator=torch.Generator().manual_seed(0))
        assert t.shape == (4, 64)
        assert (t[:, 1:] >= t[:, :-1]).all()
        inside = ((t >= edges[0, 10]) & (t <= edges[0, 11])).float().mean()
        assert inside > 0.95
    # uniform weights give evenly spread samples
    t = sampling.sample_pdf(edges, torch.ones(4, 32), 8)
    assert torch.allclose(t[0], (torch.arange(8) + 0.5) / 8, atol=1e-4)


def test_importance_sampling_concentrates_near_thin_shell():
    shell = BallsField(sigma=30.0, thickness=0.1)
    cams = OrbitCameras.from_angles([0.3], 0.2)
    rays_o, rays_d = cams.rays(8)
    rays_o, rays_d = rays_o.reshape(1, -1, 3), rays_d.reshape(1, -1, 3)
    r = VolumeRenderer(backend="torch", num_samples=64, num_importance=64).eval()
    t, ts, te = r.sample_rays(shell, {}, rays_o, rays_d)
    assert t.shape == (1, 64, 128)
    assert torch.allclose(te[..., :-1], ts[..., 1:]) and (te >= ts).all()
    pts = rays_o[..., None, :] + t[..., None] * rays_d[..., None, :]
    in_shell = ((pts.norm(dim=-1) - 0.5).abs() < 0.05 + 0.02)
    hits = shell.density(pts.reshape(1, -1, 3), {}).reshape(t.shape).sum(-1) > 0
    coarse = VolumeRenderer(backend="torch", num_samples=128).eval()
    tc, _, _ = coarse.sample_rays(shell, {}, rays_o, rays_d)
    pts_c = rays_o[..., None, :] + tc[..., None] * rays_d[..., None, :]
    in_shell_c = ((pts_c.norm(dim=-1) - 0.5).abs() < 0.05 + 0.02)
    frac_imp = in_shell[hits].float().mean().item()
    frac_uni = in_shell_c[hits].float().mean().item()
    assert frac_imp > 0.4 and frac_imp > 2.0 * frac_uni


def test_background_handling():
    field = BallsField()
    cams = OrbitCameras.from_angles([0.0, 1.0], 0.3)
    r = VolumeRenderer(backend="torch", num_samples=32).eval()
    bg = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    out = r(field, {}, cams, 16, background=bg)
    pre = r(field, {}, cams, 16, background=None)
    white = r(field, {}, cams, 16)
    assert torch.allclose(out["rgb"][:, 0, 0], bg, atol=1e-4)  # corner: empty
    assert torch.allclose(white["rgb"][:, 0, 0], torch.ones(2, 3), atol=1e-4)
    assert torch.allclose(pre["rgb"][:, 0, 0], torch.zeros(2, 3), atol=1e-4)
    expected = pre["rgb"] + (1 - pre["opacity"])[..., None] * bg[:, None, None, :]
    assert torch.allclose(out["rgb"], expected, atol=1e-6)
    assert torch.allclose(r(field, {}, cams, 16, background=(0.5, 0.5, 0.5))["rgb"][:, 0, 0], torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="background"):
        r(field, {}, cams, 16, background=torch.ones(3, 3))


# -- renderer ------------------------------------------------------------------------------


def test_registry_and_config():
    assert "volume" in RENDERERS.names()
    r = RENDERERS.build("volume", backend="torch", num_samples=20)
    assert isinstance(r, VolumeRenderer) and r.num_samples == 20
    assert RENDERERS.build("volume", num_importance=8).num_importance == 8
    with pytest.raises(ValueError):
        VolumeRenderer(backend="vulkan")


def test_sphere_silhouette_matches_world_renderer():
    cams = OrbitCameras.evaluation(8)
    gt = render_objects([WorldObject("sphere", "red")] * 8, cams, 64)["mask"] > 0.5
    r = VolumeRenderer(backend="torch").eval()  # defaults
    out = r(BallsField(), {}, cams, 64)
    assert out["rgb"].shape == (8, 64, 64, 3)
    assert out["opacity"].shape == out["depth"].shape == (8, 64, 64)
    assert iou(out["opacity"] > 0.5, gt) > 0.95
    assert (out["opacity"][:, 30:34, 30:34] > 0.99).all()  # through the centre
    assert (out["opacity"][:, :8, :8] < 1e-4).all()  # outside the silhouette
    # depth of the centre pixel ~ distance to the front of the sphere (2.2 - 0.5)
    assert ((out["depth"][:, 31:33, 31:33] - 1.7).abs() < 0.05).all()


def test_stratified_jitter_only_in_training_and_seeded():
    field = BallsField(sigma=5.0)
    cams = OrbitCameras.from_angles([0.0], 0.0)
    r = VolumeRenderer(backend="torch", num_samples=16)
    a = r(field, {}, cams, 8, generator=torch.Generator().manual_seed(1))["opacity"]
    b = r(field, {}, cams, 8, generator=torch.Generator().manual_seed(1))["opacity"]
    c = r(field, {}, cams, 8, generator=torch.Generator().manual_seed(2))["opacity"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    r.eval()
    d = r(field, {}, cams, 8, generator=torch.Generator().manual_seed(1))["opacity"]
    e = r(field, {}, cams, 8, generator=torch.Generator().manual_seed(2))["opacity"]
    assert torch.equal(d, e) and not torch.equal(a, d)


def test_render_chunked_matches_full_render_and_restores_mode():
    field = BallsField()
    cams = OrbitCameras.evaluation(2)
    r = VolumeRenderer(backend="torch", num_samples=24, num_importance=8)
    full = r.eval()(field, {}, cams, 20)
    r.train()
    chunked = r.render_chunked(field, {}, cams, 20, chunk_rays=37)
    assert r.training
    for k in ("rgb", "opacity", "depth"):
        assert torch.allclose(full[k], chunked[k], atol=1e-6), k
    assert not chunked["rgb"].requires_grad


def test_per_prompt_conditioning_reaches_the_right_camera():
    field = BallsField()
    cams = OrbitCameras.from_angles([0.0, 0.0], 0.0)
    cond = {"radius": torch.tensor([0.3, 0.6]), "colour": torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])}
    out = VolumeRenderer(backend="torch").eval()(field, cond, cams, 32)
    area = (out["opacity"] > 0.5).float().sum((1, 2))
    assert area[1] > 3.0 * area[0]
    assert out["rgb"][0, 16, 16, 0] > 0.9 and out["rgb"][1, 16, 16, 2] > 0.9


def test_gradients_flow_to_the_field():
    field = BallsField(sigma=5.0)
    out = VolumeRenderer(backend="torch", num_samples=16, num_importance=8)(
        field, {}, OrbitCameras.from_angles([0.0], 0.0), 8)
    out["opacity"].mean().backward()
    assert field.gain.grad is not None and field.gain.grad.abs() > 0


@pytest.mark.skipif(HAS_CUDA, reason="checks the error raised on machines without CUDA")
def test_cuda_backend_without_cuda_errors_clearly():
    with pytest.raises(RuntimeError, match="CUDA"):
        VolumeRenderer(backend="cuda")
    # auto falls back to torch on CPU tensors
    r = VolumeRenderer(backend="auto")
    assert r.resolve_backend(torch.device("cpu")) == "torch"


# -- the nerfacc path -----------------------------------------------------------------------


def test_occupancy_grids_follow_each_prompts_density():
    field = BallsField()
    cond = {"radius": torch.tensor([0.3, 0.7])}
    occ = nerfacc_backend.occupancy_grids(field, cond, 2, 16, 1.0, 0.01, dilate=0)
    assert occ.shape == (2, 16, 16, 16) and occ.dtype == torch.bool
    centres = nerfacc_backend.cell_centres(16, 1.0).norm(dim=-1)
    assert torch.equal(occ[0], centres < 0.3) and torch.equal(occ[1], centres < 0.7)
    dil = nerfacc_backend.occupancy_grids(field, cond, 2, 16, 1.0, 0.01, dilate=1)
    assert (dil | ~occ).all() and dil.sum() > occ.sum()


def _fake_traverse_grids(rays_o, rays_d, binaries, aabbs, near_planes=None, far_planes=None, step_size=1e-3,
                         cone_angle=0.0, **_):
    """CPU stand-in for nerfacc.traverse_grids with one grid: fixed steps from the near plane, a sample is kept
    when its midpoint lies in the box and in an occupied cell (the CUDA kernel's rule)."""
    assert binaries.shape[0] == 1 and aabbs.shape == (1, 6) and cone_angle == 0.0
    lo, hi = aabbs[0, :3], aabbs[0, 3:]
    res = binaries.shape[1]
    tmin, tmax, hit = sampling.ray_box_intersect(rays_o, rays_d, float(hi[0]))
    k = int(math.ceil(float(tmax.max()) / step_size)) + 2
    t0 = near_planes[:, None] + torch.arange(k, dtype=rays_o.dtype) * step_size
    t1 = t0 + step_size
    mid = 0.5 * (t0 + t1)
    pts = rays_o[:, None] + mid[..., None] * rays_d[:, None]
    ijk = ((pts - lo) / (hi - lo) * res).floor().long().clamp(0, res - 1)
    occ = binaries[0, ijk[..., 0], ijk[..., 1], ijk[..., 2]]
    lo_t = torch.maximum(tmin, near_planes)[:, None]
    hi_t = torch.minimum(tmax, far_planes)[:, None]
    keep = hit[:, None] & (mid >= lo_t) & (mid < hi_t) & occ
    ray_idx, _ = keep.nonzero(as_tuple=True)
    vals = torch.stack([t0[keep], t1[keep]], -1).reshape(-1)
    is_left = torch.tensor([True, False]).repeat(ray_idx.numel())
    return SimpleNamespace(vals=vals, is_left=is_left, is_right=~is_left), SimpleNamespace(ray_indices=ray_idx), None


def _packed_transmittance(t_starts, t_ends, sigmas, ray_indices, n_rays):
    """Per-ray exclusive cumulative optical depth of packed samples (sorted by ray), via a padded layout."""
    sd = sigmas * (t_ends - t_starts)
    counts = torch.bincount(ray_indices, minlength=n_rays)
    pos = torch.arange(sd.shape[0]) - (torch.cumsum(counts, 0) - counts)[ray_indices]
    padded = sd.new_zeros(n_rays, int(counts.max()) if sd.numel() else 1)
    padded = padded.index_put((ray_indices, pos), sd)
    excl = (torch.cumsum(padded, 1) - padded)[ray_indices, pos]
    return torch.exp(-excl), 1 - torch.exp(-sd)


def _fake_weights(t_starts, t_ends, sigmas, packed_info=None, ray_indices=None, n_rays=None, prefix_trans=None):
    trans, alphas = _packed_transmittance(t_starts, t_ends, sigmas, ray_indices, n_rays)
    return trans * alphas, trans, alphas


def _fake_visibility(t_starts, t_ends, sigmas, packed_info=None, ray_indices=None, n_rays=None,
                     early_stop_eps=1e-4, alpha_thre=0.0, prefix_trans=None):
    trans, _ = _packed_transmittance(t_starts, t_ends, sigmas, ray_indices, n_rays)
    return trans >= early_stop_eps


@pytest.fixture
def cpu_nerfacc(monkeypatch):
    """Run the nerfacc path on the CPU: stand-ins for the three CUDA-only nerfacc calls."""
    nerfacc = pytest.importorskip("nerfacc")
    monkeypatch.setattr(nerfacc, "traverse_grids", _fake_traverse_grids)
    monkeypatch.setattr(nerfacc, "render_weight_from_density", _fake_weights)
    monkeypatch.setattr(nerfacc, "render_visibility_from_density", _fake_visibility)
    monkeypatch.setattr(nerfacc_backend, "ensure_extension", lambda: None)


def _rays(cams: OrbitCameras, res: int) -> tuple[torch.Tensor, torch.Tensor]:
    o, d = cams.rays(res)
    return o.reshape(len(cams), -1, 3), d.reshape(len(cams), -1, 3)


@pytest.mark.parametrize("early_stop_eps", [0.0, 1e-4])
def test_nerfacc_path_plumbing_matches_torch_path(cpu_nerfacc, early_stop_eps):
    field = BallsField(sigma=20.0)
    cams = OrbitCameras.from_angles([0.0, 2.0], [0.1, 0.5])
    cond = {"radius": torch.tensor([0.35, 0.6]), "colour": torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.3]])}
    rays_o, rays_d = _rays(cams, 24)
    fast = nerfacc_backend.render_rays_nerfacc(field, cond, rays_o, rays_d, bound=1.0, occ_resolution=32,
                                               step_size=2 * math.sqrt(3) / 512, early_stop_eps=early_stop_eps)
    ref = VolumeRenderer(backend="torch", num_samples=512).eval().render_rays(field, cond, rays_o, rays_d, None)
    assert (fast["opacity"] - ref["opacity"]).abs().mean() < 0.01
    assert (fast["rgb"] - ref["rgb"]).abs().mean() < 0.01
    fg = ref["opacity"] > 0.99
    assert ((fast["depth"] - ref["depth"])[fg].abs() < 0.02).all()
    fast["rgb"].sum().backward()
    assert field.gain.grad is not None and field.gain.grad.abs() > 0


def test_renderer_routes_to_nerfacc_path_with_region_and_chunks(cpu_nerfacc, monkeypatch):
    """Through VolumeRenderer (backend forced to the nerfacc path): a bounding sphere that cuts the ball
    clips both paths alike, and chunked rendering reuses one occupancy grid."""
    field = BallsField(sigma=20.0)
    cams = OrbitCameras.from_angles([0.5, 2.5], [0.2, -0.1])
    cond = {"radius": torch.tensor([0.4, 0.7])}
    kw = dict(region="sphere", sphere_radius=0.55, num_samples=512, march_steps=512)
    ref = VolumeRenderer(backend="torch", **kw).eval()(field, cond, cams, 24)
    fast_r = VolumeRenderer(backend="auto", **kw).eval()
    monkeypatch.setattr(fast_r, "resolve_backend", lambda device: "cuda")
    calls = []
    real = fast_r.occupancy_grids
    monkeypatch.setattr(fast_r, "occupancy_grids", lambda *a: calls.append(1) or real(*a))
    fast = fast_r(field, cond, cams, 24)
    assert (fast["opacity"] - ref["opacity"]).abs().mean() < 0.01
    # prompt 1's ball (0.7) is clipped to the 0.55 sphere: same silhouette size as a 0.55 ball
    clipped = VolumeRenderer(backend="torch", num_samples=256).eval()(
        field, {"radius": torch.tensor([0.4, 0.55])}, cams, 24)
    assert iou(fast["opacity"][1] > 0.5, clipped["opacity"][1] > 0.5) > 0.95
    chunked = fast_r.render_chunked(field, cond, cams, 24, chunk_rays=100)
    assert len(calls) == 1
    assert torch.allclose(chunked["opacity"], fast["opacity"], atol=1e-5)


def test_nerfacc_path_with_empty_field(cpu_nerfacc):
    field = BallsField(sigma=20.0)
    cams = OrbitCameras.from_angles([0.0], 0.0)
    rays_o, rays_d = _rays(cams, 8)
    out = nerfacc_backend.render_rays_nerfacc(field, {"radius": torch.tensor([0.0])}, rays_o, rays_d, bound=1.0)
    assert torch.equal(out["opacity"], torch.zeros(1, 64))
    out["rgb"].sum().backward()  # still attached to the graph


def test_nerfacc_stratified_start_is_seeded(cpu_nerfacc):
    field = BallsField(sigma=5.0)
    rays_o, rays_d = _rays(OrbitCameras.from_angles([0.0], 0.0), 8)

    def run(seed):
        return nerfacc_backend.render_rays_nerfacc(field, {}, rays_o, rays_d, bound=1.0, step_size=0.05,
                                                   stratified=True, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0)["opacity"], run(0)["opacity"])
    assert not torch.equal(run(0)["opacity"], run(1)["opacity"])


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (nerfacc's CUDA kernels)")
def test_cuda_backend_agrees_with_torch_backend():
    """Opacity and colour of the nerfacc path within 0.02 (mean abs) of the torch path; silhouettes IoU > 0.97."""
    device = torch.device("cuda")
    field = BallsField(sigma=20.0).to(device)
    cams = OrbitCameras.evaluation(4, device=device)
    cond = {"radius": torch.tensor([0.3, 0.4, 0.5, 0.6], device=device),
            "colour": torch.rand(4, 3, generator=torch.Generator().manual_seed(0)).to(device)}
    fast = VolumeRenderer(backend="cuda").eval()(field, cond, cams, 64)
    ref = VolumeRenderer(backend="torch", num_samples=512).eval()(field, cond, cams, 64)
    assert (fast["opacity"] - ref["opacity"]).abs().mean() < 0.02
    assert (fast["rgb"] - ref["rgb"]).abs().mean() < 0.02
    assert iou(fast["opacity"] > 0.5, ref["opacity"] > 0.5) > 0.97
    auto = VolumeRenderer(backend="auto").eval()
    assert auto.resolve_backend(device) == "cuda"
    train = VolumeRenderer(backend="cuda")(field, cond, cams, 32, generator=torch.Generator(device).manual_seed(0))
    train["rgb"].mean().backward()
    assert field.gain.grad is not None and field.gain.grad.abs() > 0
