"""The textured-mesh stage (LATTE3D's second stage): DMTet from the density, rendering, training, output folder.

A tiny amortized model (a 4^3..8^3 grid field, untrained: a soft ball of density ~6 at the centre) and a tiny
random shapes prior keep every step a fraction of a second on a CPU. Also here: the two mesh-module fixes this
stage relies on (1-D keys in cleanup, world-readable exported files).
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch

import att3d
from att3d.cli.train import main as train_main
from att3d.mesh import face_normals, tet_grid
from att3d.mesh import surface as mh
from att3d.mesh.cleanup import _adjacency, lexicographic_keys, weld_vertices
from att3d.model import AmortizedModel
from att3d.render.cameras import OrbitCameras
from att3d.world.prior_training import PriorArchitecture, build_scheduler, build_unet, save_prior
from att3d.world.render import render_objects
from att3d.world.shapes import WorldObject

PROMPTS = ["a red cube", "a blue sphere", "a green torus", "a yellow cone"]
TINY = {
    "text_encoder": {"name": "minilm", "max_length": 8},
    "mapping": {"name": "hypernetwork", "hidden_dim": 8},
    "field": {"name": "grid", "num_levels": 2, "base_resolution": 4, "max_resolution": 8, "hidden_dim": 8,
              "latent_dim": 4},
    "renderer": {"name": "volume", "num_samples": 8, "backend": "torch"},
    "extraction": {"threshold": 2.0},
}


@pytest.fixture(scope="module")
def tiny_model() -> AmortizedModel:
    torch.manual_seed(0)
    return AmortizedModel(TINY)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mesh-head")
    tiny_model.save_pretrained(root / "model", extra={"steps": 7})
    arch = PriorArchitecture(block_out_channels=(16, 32), attention_head_dim=8, norm_num_groups=8)
    torch.manual_seed(0)
    save_prior(root / "prior", build_unet(arch), build_scheduler(arch), arch)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {"model": root / "model", "prior": root / "prior", "prompts": root / "prompts.txt"}


def argv(files: dict[str, Path], run: Path, *extra: str, resume: bool = False) -> list[str]:
    """``att3d train stage=mesh`` overrides of a tiny run (``resume``: continue ``run``)."""
    return ["stage=mesh", f"init_from={files['model']}", f"{'resume' if resume else 'run_dir'}={run}",
            "prompts=file", f"prompts.train={files['prompts']}", f"guidance.prior.path={files['prior']}",
            "trainer.batch_size=2", "trainer.resolution=48", "stage.tet_resolution=20", "trainer.device=cpu",
            "trainer.threads=1", "progress=false", "stage.anchor_points=256", "trainer.log_every=1",
            "trainer.image_every=0", *extra]


class SphereField(torch.nn.Module):
    """Density ``threshold * exp(4 (0.25 - |p|^2))``: above the threshold exactly inside the world's sphere."""

    bound = 1.0

    def __init__(self, threshold: float, colour: tuple[float, float, float]):
        super().__init__()
        self.threshold = threshold
        self.colour = torch.nn.Parameter(torch.tensor(colour))

    def forward(self, points: torch.Tensor, cond: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        density = self.threshold * torch.exp(4.0 * (0.25 - points.square().sum(-1)))
        return density, self.colour.expand(*points.shape[:-1], 3)

    def density(self, points: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward(points, cond)[0]


def test_density_sdf_mesh_matches_the_world_sphere():
    field = SphereField(5.0, (0.2, 0.4, 0.9))
    cond = {"latent": torch.zeros(8, 1)}
    R = 48
    verts, tets = tet_grid(R)
    sdf = mh.grid_sdf(field, cond, R, threshold=5.0)
    assert sdf.shape == (8, R**3)
    assert (sdf[0].reshape(R, R, R)[0] == 5.0).all()  # box faces are outside: surfaces close
    mesh = mh.surface_from_sdf(verts, tets, sdf[0])
    radius = mesh.verts.norm(dim=-1)
    assert (radius - 0.5).abs().max() < 0.01  # inside = density above the threshold
    outward = (mesh.verts[mesh.faces].mean(1) * face_normals(mesh.verts, mesh.faces)).sum(-1)
    assert (outward > 0).all()  # triangles face away from the inside (higher density)
    cams = OrbitCameras.evaluation(8)
    out = mh.render_surfaces(field, cond, [mesh] * 8, cams, 64, colour_offset=0.02, antialias=False)
    truth = render_objects([WorldObject("sphere", "blue")] * 8, cams, 64)
    fg, gt = out["mask"] > 0, truth["mask"] > 0.5
    assert float((fg & gt).sum() / (fg | gt).sum()) > 0.97
    assert torch.allclose(out["rgb"][fg], field.colour.detach().expand(int(fg.sum()), 3))  # no shading added
    assert torch.equal(out["rgb"][~fg], torch.ones(int((~fg).sum()), 3))
    # Every covered pixel's colour goes through the field: d(sum of rgb)/d colour = the number of covered pixels.
    out["rgb"].sum().backward()
    assert torch.allclose(field.colour.grad, fg.sum().float().expand(3))
    # Antialiased (the default): only pixels next to the silhouette change, to a mix of the colour and the background.
    aa = mh.render_surfaces(field, cond, [mesh] * 8, cams, 64, colour_offset=0.02)["rgb"].detach()
    edge = fg ^ (torch.nn.functional.max_pool2d((~fg).float()[:, None], 3, 1, 1)[:, 0] == 0)  # fg next to bg
    edge |= ~fg & (torch.nn.functional.max_pool2d(fg.float()[:, None], 3, 1, 1)[:, 0] > 0)  # bg next to fg
    changed = (aa - out["rgb"].detach()).abs().amax(-1) > 1e-6
    assert changed.any() and not (changed & ~edge).any()
    colour = field.colour.detach()
    # A changed pixel lies on the line between the sphere's colour and the background's (the same share in every
    # channel); each of its up to 4 edge neighbours moves it by at most half a step.
    share = (aa[changed] - 1.0) / (colour - 1.0)
    assert torch.allclose(share, share[:, :1].expand_as(share), atol=1e-5)
    assert ((share >= -1.0) & (share <= 2.0)).all() and ((share > 0) & (share < 1)).float().mean() > 0.9


def test_silhouette_gradient_moves_the_surface_through_the_density():
    # A sphere whose radius is the field's only parameter, rendered as a DMTet surface against white: the
    # silhouette is the only thing that depends on the radius (the colour is constant), so the radius gets a
    # gradient only through the antialiased edges, and fitting the rendered mask to a larger sphere's grows it.
    class Ball(torch.nn.Module):
        def __init__(self, radius: float):
            super().__init__()
            self.radius = torch.nn.Parameter(torch.tensor(radius))
            self.colour = torch.nn.Parameter(torch.zeros(3))

        def forward(self, points, cond):
            d = 10.0 * torch.sigmoid((self.radius - points.norm(dim=-1)) * 40.0)  # 5 at the radius
            return d, self.colour.expand(*points.shape[:-1], 3)

        def density(self, points, cond):
            return self.forward(points, cond)[0]

    R = 32
    verts, tets = tet_grid(R)
    boundary = torch.zeros(verts.shape[0], dtype=torch.bool)
    boundary[mh.boundary_index(R, torch.device("cpu"))] = True
    cams = OrbitCameras.evaluation(2)
    cond = {"latent": torch.zeros(2, 1)}
    target = mh.render_surfaces(Ball(0.55), cond, [mh.surface_from_sdf(verts, tets, s) for s in
                                                  mh.grid_sdf(Ball(0.55), cond, R, 5.0)], cams, 48)["rgb"].detach()

    def render(ball: torch.nn.Module, antialias: bool, aliased_share: float = 0.0) -> torch.Tensor:
        sdf = mh.grid_sdf(ball, cond, R, 5.0)
        meshes = [mh.differentiable_surface(ball, {"latent": cond["latent"][b:b + 1]}, verts, tets, sdf[b], 5.0,
                                            boundary) for b in range(2)]
        return mh.render_surfaces(ball, cond, meshes, cams, 48, antialias=antialias,
                                  aliased_share=aliased_share)["rgb"]

    def loss(ball: torch.nn.Module, antialias: bool, aliased_share: float = 0.0) -> torch.Tensor:
        return (render(ball, antialias, aliased_share) - target).square().sum()

    hard = Ball(0.45)
    value = loss(hard, antialias=False)
    if value.requires_grad:
        value.backward()
    assert hard.radius.grad is None or float(hard.radius.grad.abs()) < 1e-6  # aliased: no silhouette gradient
    ball = Ball(0.45)
    opt = torch.optim.Adam(ball.parameters(), lr=0.01)
    for _ in range(25):
        opt.zero_grad()
        value = loss(ball, antialias=True)
        value.backward()
        opt.step()
    assert abs(float(ball.radius.detach()) - 0.55) < 0.02
    # aliased_share: the values move from the antialiased image's to the aliased one's; the gradients (of the
    # silhouette and of the colour) stay the antialiased image's, whatever the share
    weight = torch.rand(2, 48, 48, 3, generator=torch.Generator().manual_seed(0))
    aliased, blended = render(Ball(0.45), False).detach(), render(Ball(0.45), True).detach()
    assert not torch.equal(aliased, blended)
    grads = []
    for share in (0.0, 0.5, 1.0):
        ball = Ball(0.45)
        rgb = render(ball, True, share)
        assert torch.allclose(rgb.detach(), blended + share * (aliased - blended), atol=1e-6)
        (rgb * weight).sum().backward()
        grads.append(torch.cat([ball.radius.grad[None], ball.colour.grad]))
    assert grads[0].abs().min() > 0
    assert torch.allclose(grads[1], grads[0], rtol=1e-5) and torch.allclose(grads[2], grads[0], rtol=1e-5)
    ball = Ball(0.45)
    opt = torch.optim.Adam(ball.parameters(), lr=0.01)
    for _ in range(25):
        opt.zero_grad()
        loss(ball, True, aliased_share=1.0).backward()
        opt.step()
    assert abs(float(ball.radius.detach()) - 0.55) < 0.02


def test_colour_gradients_reach_the_amortized_field_through_the_rasterizer(tiny_model):
    model = tiny_model
    R = 16
    verts, tets = tet_grid(R)
    cond = model.conditioning(PROMPTS[:2])
    sdf = mh.grid_sdf(model.field, cond, R, threshold=2.0)
    meshes = [mh.surface_from_sdf(verts, tets, s) for s in sdf]
    assert all(not m.empty for m in meshes) and not meshes[0].verts.requires_grad
    cams = OrbitCameras.sample_training(2, torch.Generator().manual_seed(1))
    out = mh.render_surfaces(model.field, cond, meshes, cams, 32, colour_offset=0.0, antialias=False)
    fg = out["mask"] > 0
    assert 0.05 < float(out["mask"].mean()) < 0.9 and out["points"].tolist() == fg.flatten(1).sum(1).tolist()
    # The pixel colours are the field's colour at the rasterized surface points.
    from att3d.mesh import interpolate, rasterize

    rast = rasterize(meshes[1].verts, meshes[1].faces, 32, cams.index([1]))
    pts = interpolate(meshes[1].verts, rast, meshes[1].faces)[0][rast.mask[0]]
    _, rgb = model.field(pts[None], {k: v[1:2] for k, v in cond.items()})
    assert torch.allclose(out["rgb"][1][fg[1]], rgb[0], atol=1e-6)
    model.zero_grad()
    (out["rgb"] * torch.linspace(0, 1, 3)).sum().backward()
    head = model.field.mlp[-1].weight.grad  # rows: density, r, g, b
    assert head[1:].abs().sum() > 0 and head[0].abs().sum() == 0  # texture mode: colour rows only
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mapping.parameters())
    model.zero_grad()


def _one_prompt_grid(model, R: int = 16):
    """A tet grid of R^3 vertices, its box-face mask, one prompt's conditioning and its no-grad sdf at threshold 2."""
    verts, tets = tet_grid(R)
    boundary = torch.zeros(R**3, dtype=torch.bool)
    boundary[mh.boundary_index(R, verts.device)] = True
    cond = model.conditioning(PROMPTS[:1])
    sdf = mh.grid_sdf(model.field, {k: v.detach() for k, v in cond.items()}, R, threshold=2.0)[0]
    return verts, tets, boundary, cond, sdf


def test_geometry_mode_surface_is_the_same_mesh_and_differentiable(tiny_model):
    model = tiny_model
    R = 16
    verts, tets, boundary, cond, sdf = _one_prompt_grid(model, R)
    fixed = mh.surface_from_sdf(verts, tets, sdf)
    live = mh.differentiable_surface(model.field, cond, verts, tets, sdf, 2.0, boundary)
    assert torch.equal(live.faces, fixed.faces) and torch.allclose(live.verts, fixed.verts, atol=1e-6)
    model.zero_grad()
    live.verts.square().sum().backward()
    assert model.field.mlp[-1].weight.grad[0].abs().sum() > 0  # the density row: the geometry moves
    model.zero_grad()


def test_coarse_to_fine_sdf_gives_the_dense_grids_surface(tiny_model):
    # grid_sdf(coarse_step=4) evaluates the field near the surface only; marching tetrahedra reads only the crossed
    # cubes' corners, which it evaluates exactly: the same mesh as the dense grid's, at fewer field evaluations.
    model = tiny_model
    R = 24
    verts, tets, boundary, cond, dense = _one_prompt_grid(model, R)
    coarse = mh.grid_sdf(model.field, {k: v.detach() for k, v in cond.items()}, R, threshold=2.0, coarse_step=4)[0]
    assert torch.equal(coarse < 0, dense < 0)
    a, b = mh.surface_from_sdf(verts, tets, dense), mh.surface_from_sdf(verts, tets, coarse)
    assert a.faces.shape[0] > 0 and torch.equal(a.faces, b.faces) and torch.allclose(a.verts, b.verts, atol=1e-5)
    calls = []
    density = model.field.density

    def counting(points, c):
        calls.append(points.shape[1])
        return density(points, c)

    model.field.density = counting
    try:
        mh.grid_sdf(model.field, {k: v.detach() for k, v in cond.items()}, R, threshold=2.0, coarse_step=4)
    finally:
        del model.field.density
    assert 0 < sum(calls) < R**3  # fewer evaluations than the dense grid's


def test_geometry_mode_topology_is_the_given_sdfs_even_where_the_live_density_rounds_differently(tiny_model):
    # The topology comes from the no-grad sdf; the re-evaluated density only places the vertices. Here the given
    # sdf is off by up to 1e-3 from the live density (as rounding could make it, far less): the faces are the
    # given sdf's, every vertex stays on its edge (finite, inside the box) and near the exact surface.
    model = tiny_model
    R = 16
    verts, tets, boundary, cond, sdf = _one_prompt_grid(model, R)
    off = sdf + 1e-3 * torch.randn(sdf.shape, generator=torch.Generator().manual_seed(0))
    off[boundary] = sdf[boundary]
    live = mh.differentiable_surface(model.field, cond, verts, tets, off, 2.0, boundary)
    given = mh.surface_from_sdf(verts, tets, off)
    assert given.faces.shape[0] > 0 and torch.equal(live.faces, given.faces)
    assert torch.isfinite(live.verts).all() and live.verts.abs().max() <= 1.0
    assert (live.verts - given.verts).norm(dim=-1).max() < 2.0 / (R - 1)  # within one grid cell
    model.zero_grad()


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_mesh_stage_trains_saves_a_model_folder_and_resumes(files, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(argv(files, run, "trainer.max_steps=2", "trainer.checkpoint_every=2")) == 0
    assert "model written to" in capsys.readouterr().out
    assert train_main(argv(files, run, "trainer.max_steps=3", resume=True)) == 0  # resumes at step 2
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["total_loss"], r["grad_norm"]])).all() for r in rows)
    assert all(r["empty"] == 0 and r["faces"] > 0 and r["grad_norm"] > 0 for r in rows)
    folder = run / "model"
    extra = json.loads((folder / "model_config.json").read_text())["extra"]
    assert extra["stage"] == "mesh" and extra["steps"] == 3 and extra["render_resolution"] == 48
    assert extra["prior_resolution"] == 32 and extra["previous"] == {"steps": 7}
    assert extra["init_from"] == str(files["model"]) and extra["mesh"]["tet_resolution"] == 20
    assert extra["teacher"]["method"] == "sds" and "guidance_scale" in extra["teacher"]  # what distilled it
    model = att3d.load(folder)
    before = att3d.load(files["model"]).state_dict()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("field.mlp") for k in changed) and any(k.startswith("mapping") for k in changed)
    mesh = model.generate(["a red cube"], grid_resolution=24, texture_size=0, progress=False)[0]
    assert len(mesh.faces) > 0 and mesh.metadata["att3d"]["threshold"] == 2.0
    # Resuming is exact: the same 3 steps without the interruption give the same weights.
    straight = tmp_path / "straight"
    assert train_main(argv(files, straight, "trainer.max_steps=3")) == 0
    again = att3d.load(straight / "model").state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())


def test_geometry_mode_trains(files, tmp_path):
    run = tmp_path / "geo"
    assert train_main(argv(files, run, "trainer.max_steps=2", "stage.geometry=true", "stage.anchor_weight=0")) == 0
    rows = _metrics(run)
    assert len(rows) == 2 and all(r["anchor"] == 0 and r["faces"] > 0 for r in rows)
    assert json.loads((run / "model" / "model_config.json").read_text())["extra"]["mesh"]["geometry"] is True


def test_area_downsampling_gives_the_prior_the_block_means_of_the_render(files, tmp_path, monkeypatch):
    # stage.downsample=area: a 64 px render reaches the 32 px prior as the mean of each 2 x 2 block (supersampling),
    # not through the prior's own (tent-filtered) resize.
    from att3d.guidance.sds import ScoreDistillation
    from att3d.train import mesh_stage

    seen = {}
    encode = ScoreDistillation.__call__

    def spy(self, images, *args, **kwargs):
        seen["images"] = images.detach().clone()
        return encode(self, images, *args, **kwargs)

    render = mesh_stage.render_surfaces

    def keep(*args, **kwargs):
        out = render(*args, **kwargs)
        seen["render"] = out["rgb"].detach().permute(0, 3, 1, 2).clone()
        return out

    monkeypatch.setattr(ScoreDistillation, "__call__", spy)
    monkeypatch.setattr(mesh_stage, "render_surfaces", keep)
    run = tmp_path / "area"
    assert train_main(argv(files, run, "trainer.max_steps=1", "trainer.resolution=64", "stage.downsample=area")) == 0
    assert seen["render"].shape[-1] == 64 and seen["images"].shape[-1] == 32
    assert torch.allclose(seen["images"], seen["render"].unflatten(2, (32, 2)).unflatten(4, (32, 2)).mean((3, 5)))
    assert json.loads((run / "model" / "model_config.json").read_text())["extra"]["mesh"]["downsample"] == "area"


def test_views_per_prompt_render_several_views_of_each_mesh(files, tmp_path):
    run = tmp_path / "views"
    assert train_main(argv(files, run, "trainer.max_steps=1", "trainer.views_per_prompt=3")) == 0
    assert len(_metrics(run)) == 1


@pytest.mark.parametrize("extra, message", [
    (["+stage.colour=1"], "unexpected keyword argument 'colour'"),
    (["trainer.interpolation.prob=0.5"], "does not mix prompts"),
    (["stage.tet_resolution=2"], "tet_resolution must be an integer >= 4"),
    (["stage.coarse_step=0"], "stage.coarse_step must be an integer >= 1"),
    (["stage.downsample=box"], "stage.downsample must be one of prior, area"),
    (["stage.aliased_share=1.5"], "stage.aliased_share must be a number in [0, 1]"),
    (["stage.downsample=area"], "needs a render size that is a multiple of the prior's 32 px"),  # 48 px renders
    (["nonsense=1"], "nonsense"),
    (["stage.anchor_points=many"], "stage.anchor_points must be an integer"),
])
def test_bad_settings_are_one_line_errors(files, tmp_path, capsys, extra, message):
    from att3d.cli import main as cli_main

    assert cli_main(["train", *argv(files, tmp_path / "bad", *extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("att3d: error:")


def test_missing_model_and_prior_are_one_line_errors(files, tmp_path, capsys):
    args = argv(files, tmp_path / "bad")
    bad_model = [a if not a.startswith("init_from=") else f"init_from={tmp_path / 'nowhere'}" for a in args]
    assert train_main(bad_model) == 2
    assert "not an att3d model folder" in capsys.readouterr().err
    bad_prior = args + [f"guidance.prior.path={tmp_path / 'no-prior'}"]
    assert train_main(bad_prior) == 2
    err = capsys.readouterr().err
    assert "no shapes prior" in err and err.count("\n") == 1
    assert train_main([a for a in args if not a.startswith("init_from=")]) == 2
    assert "give init_from=" in capsys.readouterr().err


# -- the mesh-module fixes --------------------------------------------------------------------------------------

def test_lexicographic_keys_order_rows_like_unique_dim0():
    g = torch.Generator().manual_seed(0)
    small = torch.randint(-3, 4, (500, 3), generator=g)
    huge = torch.stack([torch.randint(-2**62, 2**62, (500,), generator=g), torch.randint(0, 3, (500,), generator=g),
                        torch.randint(-2**40, 2**40, (500,), generator=g)], dim=1)
    huge[250:] = huge[:250]  # duplicates with ranges that overflow a plain mixed-radix key
    for rows in (small, huge):
        _, inv_ref = torch.unique(rows, dim=0, return_inverse=True)
        _, inv = torch.unique(lexicographic_keys(rows), return_inverse=True)
        assert torch.equal(inv, inv_ref)


def test_adjacency_and_weld_match_the_row_unique_versions():
    field = SphereField(5.0, (1.0, 1.0, 1.0))
    verts, tets = tet_grid(12)
    sdf = mh.grid_sdf(field, {"latent": torch.zeros(1, 1)}, 12, threshold=5.0)[0]
    mesh = mh.surface_from_sdf(verts, tets, sdf)
    e, deg = _adjacency(mesh.faces, mesh.verts.shape[0], torch.float32)
    f = mesh.faces
    ref = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    ref = torch.unique(torch.cat([ref, ref.flip(1)]), dim=0)
    assert torch.equal(e, ref) and torch.equal(deg, torch.bincount(ref[:, 0], minlength=len(mesh.verts)).float())
    soup = mesh.verts[mesh.faces].reshape(-1, 3)
    v, f2 = weld_vertices(soup, torch.arange(soup.shape[0]).reshape(-1, 3))
    assert v.shape == mesh.verts.shape and f2.shape == mesh.faces.shape


def test_exported_mesh_files_are_world_readable(tmp_path):
    import trimesh

    from att3d.mesh import export_mesh

    box = trimesh.creation.box()
    for fmt in ("glb", "obj", "ply"):
        for path in export_mesh(box, tmp_path / f"box.{fmt}"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# ---------------------------------------------------------------------------------------------------------------
# Lambertian shading, generation heads, solid fill, oracle fits
# ---------------------------------------------------------------------------------------------------------------

def test_lambert_shading_lights_the_albedo_and_moves_the_geometry():
    """With shading=lambert a white albedo renders as the world's light factor of the mesh normal, and the image
    has a gradient w.r.t. the vertex positions through the normals (none without shading, for a flat colour)."""
    from att3d.render.shading import lambert

    field = SphereField(threshold=2.0, colour=(1.0, 1.0, 1.0))
    verts, tets = tet_grid(24, 1.0)
    mesh = mh.surface_from_sdf(verts, tets, 2.0 - field.density(verts[None], {})[0])
    v = mesh.verts.detach().clone().requires_grad_(True)
    surface = mh.SurfaceMesh(v, mesh.faces, mesh.normals)
    cams = OrbitCameras.evaluation(1)
    cond = {"unused": torch.zeros(1, 1)}
    flat = mh.render_surfaces(field, cond, [surface], cams, 32)
    lit = mh.render_surfaces(field, cond, [surface], cams, 32, shading="lambert")
    fg = lit["mask"][0] > 0
    assert torch.allclose(flat["rgb"][0][fg], torch.ones(int(fg.sum()), 3))
    factor = lit["rgb"][0][fg]
    lo, hi = float(lambert(torch.ones(1, 3), -torch.tensor([[0.5, 0.8, 0.6]]) / 1.118)[0, 0]), 1.0
    assert (factor >= lo - 1e-5).all() and (factor <= hi + 1e-5).all() and factor.std() > 0.05
    (grad,) = torch.autograd.grad(lit["rgb"].sum(), v)
    assert grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shading"):
        mh.render_surfaces(field, cond, [surface], cams, 8, shading="phong")


def test_generation_heads_face_budget_and_solid_fill(files):
    from att3d.mesh.extract import GenerationError, fill_interior

    model = att3d.load(files["model"])
    nerf, = model.generate(["a red cube"], grid_resolution=24, texture_size=0, progress=False, head="nerf")
    mesh, = model.generate(["a red cube"], texture_size=0, progress=False, head="mesh", tet_resolution=20)
    assert nerf.metadata["att3d"]["head"] == "nerf" and mesh.metadata["att3d"]["head"] == "mesh"
    assert mesh.metadata["att3d"]["grid_resolution"] == 20 and len(mesh.faces) > 0
    small, = model.generate(["a red cube"], grid_resolution=24, texture_size=0, progress=False, max_faces=100)
    assert 0 < len(small.faces) <= 100 and small.metadata["att3d"]["faces_before"] > 100
    with pytest.raises(GenerationError, match="head"):
        model.generate(["a red cube"], progress=False, head="volume")
    with pytest.raises(GenerationError, match="face budget"):
        model.generate(["a red cube"], progress=False, max_faces=-1)
    # a hollow ball (a shell of density above the threshold) becomes solid; the outside stays empty
    axes = torch.meshgrid(*[torch.linspace(-1, 1, 32)] * 3, indexing="ij")
    r = torch.linalg.vector_norm(torch.stack(axes, -1), dim=-1)
    shell = ((r > 0.4) & (r < 0.6)).float() * 10.0
    solid = fill_interior(shell, 5.0, close_voxels=0)
    assert (solid[r < 0.4] > 5.0).all() and (solid[r > 0.65] == 0).all() and (solid[(r > 0.4) & (r < 0.6)] == 10).all()


def test_generate_cli_resolution_sets_the_mesh_heads_tet_grid(files, tmp_path):
    import json

    from att3d.cli import main as cli_main

    faces = {}
    for res in (20, 32):
        out = tmp_path / f"tets{res}"
        assert cli_main(["generate", "a red cube", "--checkpoint", str(files["model"]), "--out", str(out),
                         "--head", "mesh", "--resolution", str(res), "--faces", "0", "--texture-size", "0",
                         "--no-turntable", "--format", "ply", "--quiet"]) == 0
        row, = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        faces[res] = row["faces"]
    assert 0 < faces[20] < faces[32]  # a finer tet grid, a finer surface


def test_generate_iso_methods_extract_the_same_level_set(files, tmp_path):
    """--iso lewiner (the default) and --iso tets (the mesh stage's marching tetrahedra) mesh the same level set: the
    same volume, in fewer triangles for marching cubes; the option reaches the mesh head from the command line."""
    import json

    import trimesh

    from att3d.cli import main as cli_main

    rows = {}
    for iso in ("lewiner", "tets"):
        out = tmp_path / iso
        assert cli_main(["generate", "a red cube", "--checkpoint", str(files["model"]), "--out", str(out),
                         "--head", "mesh", "--iso", iso, "--resolution", "32", "--faces", "0", "--texture-size", "0",
                         "--smooth", "0", "--no-turntable", "--format", "ply", "--quiet"]) == 0
        row, = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        mesh = trimesh.load(next(out.glob("*.ply")), force="mesh")
        rows[iso] = (row["faces"], abs(float(mesh.volume)))
    assert 0 < rows["lewiner"][0] < rows["tets"][0]
    assert rows["lewiner"][1] == pytest.approx(rows["tets"][1], rel=0.03)


def test_oracle_stage_fits_ground_truth_renders(files, tmp_path):
    """stage=oracle needs no init_from, trains on the world's renders (the loss falls), and records its stage."""
    run = tmp_path / "oracle"
    args = [a for a in argv(files, run, "trainer.max_steps=24", "trainer.lr=0.02", "trainer.resolution=16")
            if not a.startswith(("stage=", "init_from=", "stage.", "trainer.resolution=48"))]
    assert train_main(["stage=oracle", *args]) == 0
    rows = _metrics(run)
    losses = [r["loss"] for r in rows]
    assert len(rows) == 24 and all(r["sds_grad_norm"] == 0 for r in rows)
    assert sum(losses[-6:]) < 0.8 * sum(losses[:6]), losses
    extra = json.loads((run / "model" / "model_config.json").read_text())["extra"]
    assert extra["stage"] == "oracle"


def test_mesh_oracle_stage_records_lambert_and_generates_its_surface(files, tmp_path):
    run = tmp_path / "mesh-oracle"
    args = [a if a != "stage=mesh" else "stage=mesh_oracle"
            for a in argv(files, run, "trainer.max_steps=2", "stage.shading=lambert")]
    assert train_main(args) == 0
    model = att3d.load(run / "model")
    settings = model.config["extra"]["mesh"]
    assert model.config["extra"]["stage"] == "mesh_oracle" and settings["shading"] == "lambert"
    mesh, = model.generate(["a red cube"], texture_size=16, progress=False)
    assert mesh.metadata["att3d"]["head"] == "mesh" and mesh.metadata["att3d"]["shading"] == "lambert"


def test_oracle_refuses_prompts_that_are_not_captions(files, tmp_path, capsys):
    from att3d.cli import main as cli_main

    (tmp_path / "p.txt").write_text("a red cube\nsomething else\n")
    args = [a for a in argv(files, tmp_path / "bad", "trainer.max_steps=8", "trainer.batch_size=2")
            if not a.startswith(("stage=", "init_from=", "stage.", "prompts.train="))]
    assert cli_main(["train", "stage=oracle", f"prompts.train={tmp_path / 'p.txt'}", *args]) == 2
    assert "shapes-world captions" in capsys.readouterr().err


def test_coarse_to_fine_sdf_is_exact_next_to_the_box_where_the_object_touches_it():
    # A density that is inside at the box's faces (a ball of radius 1.3 around a corner-ward centre): grid_sdf
    # forces the box's vertices outside, so the cubes between them and the layer inside are crossed although the
    # field's own level set is not there. The coarse-to-fine grid must evaluate that layer exactly too.
    class OffsetBall(torch.nn.Module):
        def density(self, points, cond):
            return 5.0 + 20.0 * (1.3 - (points - torch.tensor([0.2, -0.1, 0.3])).norm(dim=-1))

    R = 24
    verts, tets = tet_grid(R)
    dense = mh.grid_sdf(OffsetBall(), {"latent": torch.zeros(1, 1)}, R, threshold=5.0)[0]
    coarse = mh.grid_sdf(OffsetBall(), {"latent": torch.zeros(1, 1)}, R, threshold=5.0, coarse_step=4)[0]
    a, b = mh.surface_from_sdf(verts, tets, dense), mh.surface_from_sdf(verts, tets, coarse)
    assert a.faces.shape[0] > 0 and torch.equal(a.faces, b.faces)
    assert torch.allclose(a.verts, b.verts, atol=1e-5)
