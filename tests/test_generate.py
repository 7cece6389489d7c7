"""One-forward-pass generation: field -> textured mesh -> files, the box atlas, and ``att3d generate``."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import trimesh

from att3d import cli
from att3d.infer import generate as gen
from att3d.mesh import bake_texture, export_mesh, meshes_from_conditioning, texture_sample
from att3d.mesh.atlas import box_atlas
from att3d.model import AmortizedModel
from att3d.world.metrics import mesh_occupancy, volume_iou
from att3d.world.render import voxel_centres

THRESHOLD = 10.0


class TorusField(torch.nn.Module):
    """An analytic field with the GridField interface: a soft torus (major 0.45, minor 0.2) in the xz-plane.

    ``cond["scale"]`` (B,) scales each prompt's torus. Colour depends only on the angle around
    the y axis (so reading it slightly inside the surface does not change it), except in the
    low-density shell right at the surface (density < 1.25 x threshold), which is black: a bake
    that reads colour on the surface itself gets it wrong.
    """

    bound = 1.0

    def forward(self, points: torch.Tensor, cond: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        s = cond["scale"].to(points.dtype)[:, None]
        x, y, z = points.unbind(-1)
        ring = torch.sqrt(x**2 + z**2) - 0.45 * s
        sdf = torch.sqrt(ring**2 + y**2) - 0.2 * s
        density = 2.0 * THRESHOLD * torch.sigmoid(-sdf * 30.0)
        rgb = self.true_colour(points)
        rgb = torch.where((density < 1.25 * THRESHOLD)[..., None], torch.zeros_like(rgb), rgb)
        return density, rgb

    def density(self, points: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward(points, cond)[0]

    @staticmethod
    def true_colour(points: torch.Tensor) -> torch.Tensor:
        a = torch.atan2(points[..., 2], points[..., 0])
        return torch.stack([0.5 + 0.4 * torch.cos(a), 0.5 + 0.4 * torch.sin(a), torch.full_like(a, 0.3)], -1)


class Duck:
    """What meshes_from_conditioning needs of a model: a field and a config."""

    def __init__(self, threshold: float = THRESHOLD):
        self.field = TorusField()
        self.config = {"extraction": {"threshold": threshold}}


@pytest.fixture(scope="module")
def torus_meshes() -> list[trimesh.Trimesh]:
    timer = gen.StageTimer()
    meshes = meshes_from_conditioning(Duck(), {"scale": torch.tensor([1.0, 0.8])}, grid_resolution=64,
                                          texture_size=256, timer=timer)
    assert set(timer.seconds) == {"field", "extraction", "texture", "export"}
    return meshes


def field_occupancy(scale: float) -> torch.Tensor:
    pts = voxel_centres(64).reshape(1, -1, 3)
    return (TorusField().density(pts, {"scale": torch.tensor([scale])}) > THRESHOLD).reshape(64, 64, 64)


def test_exported_glb_matches_the_field_volume_and_reopens_textured(torus_meshes, tmp_path):
    for mesh, scale in zip(torus_meshes, (1.0, 0.8)):
        assert not gen.is_empty(mesh) and mesh.metadata["att3d"]["threshold"] == THRESHOLD
        path = tmp_path / f"t{scale}.glb"
        export_mesh(mesh, path)
        back = trimesh.load(path, force="mesh")
        assert isinstance(back.visual, trimesh.visual.TextureVisuals)
        image = back.visual.material.baseColorTexture
        assert image is not None and image.size == (256, 256)
        assert back.visual.uv.shape == (len(back.vertices), 2)
        assert "_color" in back.vertex_attributes and back.vertex_attributes["_color"].shape == (len(back.vertices), 4)
        occ = mesh_occupancy(torch.as_tensor(back.vertices, dtype=torch.float32),
                             torch.as_tensor(back.faces, dtype=torch.long), 64)
        target = field_occupancy(scale)
        assert target.sum() > 1000
        assert volume_iou(occ, target) > 0.95
        welded = trimesh.Trimesh(back.vertices, back.faces)  # merges the copies of seam vertices
        assert welded.is_watertight and welded.is_winding_consistent and welded.volume > 0


def test_texture_holds_the_colour_from_inside_the_surface(torus_meshes):
    mesh = torus_meshes[0]
    verts = torch.as_tensor(mesh.vertices, dtype=torch.float32)
    uv = torch.as_tensor(mesh.visual.uv, dtype=torch.float32)
    tex = torch.as_tensor(np.array(mesh.visual.material.baseColorTexture.convert("RGB")), dtype=torch.float32) / 255
    faces = torch.as_tensor(mesh.faces)
    # Face centroids: texture lookup against the true (inside) colour.
    cen_uv = uv[faces].mean(1)
    got = texture_sample(tex, cen_uv[None, None])[0, 0]
    want = TorusField.true_colour(verts[faces].mean(1))
    assert (got - want).abs().mean() < 0.03
    vcol = torch.as_tensor(mesh.vertex_attributes["color"][:, :3], dtype=torch.float32) / 255
    assert (vcol - TorusField.true_colour(verts)).abs().mean() < 0.03
    # Reading on the surface itself (no offset) sees the black shell.
    flat = meshes_from_conditioning(Duck(), {"scale": torch.tensor([1.0])}, grid_resolution=64,
                                        texture_size=0, colour_offset=0.0)[0]
    assert isinstance(flat.visual, trimesh.visual.ColorVisuals)
    dark = torch.as_tensor(flat.visual.vertex_colors[:, :3], dtype=torch.float32) / 255
    assert dark.mean() < 0.15


def test_mesh_turntable_shows_the_texture(torus_meshes):
    from att3d.infer.turntable import mesh_turntable

    frames = mesh_turntable(torus_meshes[0], frames=3, resolution=48)
    assert frames.shape == (3, 48, 48, 3) and frames.dtype == np.uint8
    rgb = frames.astype(np.float32) / 255
    fg = (rgb < 0.97).any(-1)
    assert 0.1 < fg.mean() < 0.9
    blue = rgb[..., 2][fg]  # the true colour's blue is 0.3 everywhere; the black shell would give 0
    assert np.mean(np.abs(blue - 0.3) < 0.05) > 0.9


def test_ply_keeps_the_fields_vertex_colours(torus_meshes, tmp_path):
    rows = gen.write_outputs(torus_meshes[:1], ["a torus"], tmp_path, format="ply", turntable=False, progress=False)
    assert [p.name for p in rows[0]["files"]] == ["a-torus.ply"]
    back = trimesh.load(tmp_path / "a-torus.ply")
    assert back.visual.kind == "vertex"
    got = torch.as_tensor(back.visual.vertex_colors[:, :3], dtype=torch.float32) / 255
    want = TorusField.true_colour(torch.as_tensor(back.vertices, dtype=torch.float32))
    assert (got - want).abs().mean() < 0.02


def test_empty_level_set_is_flagged_not_raised(tmp_path):
    meshes = meshes_from_conditioning(Duck(threshold=50.0), {"scale": torch.tensor([1.0])}, grid_resolution=16)
    assert len(meshes) == 1 and gen.is_empty(meshes[0])
    assert "threshold 50" in meshes[0].metadata["att3d"]["reason"]
    rows = gen.write_outputs(meshes, ["a nothing"], tmp_path / "out", turntable=True, frames=2, progress=False)
    assert rows[0]["empty"] and rows[0]["files"] == [] and "no surface" in rows[0]["note"]
    assert list((tmp_path / "out").iterdir()) == []


def spiral_ramp(turns: float = 1.6, n_a: int = 160, n_r: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """An open helicoid strip whose faces all face +y: its projection along y overlaps itself."""
    a = torch.linspace(0, turns * 2 * math.pi, n_a)
    r = torch.linspace(0.3, 0.6, n_r)
    A, Rr = torch.meshgrid(a, r, indexing="ij")
    verts = torch.stack([Rr * torch.cos(A), 0.03 * A, -Rr * torch.sin(A)], -1).reshape(-1, 3)
    idx = torch.arange(n_a * n_r).reshape(n_a, n_r)
    q = torch.stack([idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]], -1).reshape(-1, 4)
    faces = torch.cat([q[:, [0, 2, 1]], q[:, [0, 3, 2]]])
    return verts, faces


def test_box_atlas_splits_self_overlapping_charts():
    verts, faces = spiral_ramp()
    normals = torch.linalg.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]])
    assert (normals[:, 1] > 0).all()  # one chart direction for all faces: overlap is guaranteed without splitting
    vmap, new_faces, uvs = box_atlas(verts, faces, size=256, padding=2)
    assert new_faces.shape == faces.shape and uvs.shape == (vmap.shape[0], 2)
    assert torch.equal(vmap[new_faces], faces)  # same faces, seam-split vertices
    assert uvs.min() >= 0 and uvs.max() <= 1

    def colour(p: torch.Tensor) -> torch.Tensor:  # height: overlapping layers differ by ~0.19 per turn
        return (p[:, 1:2] / 0.35).clamp(0, 1).expand(-1, 3)

    tex = bake_texture(verts[vmap], new_faces, uvs, colour, size=256, padding=2)
    cen = verts[faces].mean(1)
    got = texture_sample(tex, uvs[new_faces].mean(1)[None, None])[0, 0]
    assert (got - colour(cen)).abs().max() < 0.05


def test_box_atlas_charts_of_a_closed_mesh(torus_meshes):
    mesh = torus_meshes[0]
    uv = np.asarray(mesh.visual.uv)
    assert uv.min() >= 0 and uv.max() <= 1
    # Seams only: at most a few thousand split vertices on ~10^4.
    unique_pos = np.unique(np.round(np.asarray(mesh.vertices), 6), axis=0).shape[0]
    assert unique_pos < len(mesh.vertices) < 1.3 * unique_pos


def test_slugify_is_readable_and_unique():
    assert gen.slugify("a red cube") == "a-red-cube"
    others = ["A red cube", "a red cube!", "a  red cube?", "un cube rouge é", "x" * 200, "x" * 201]
    slugs = [gen.slugify(p) for p in ["a red cube", *others]]
    assert len(set(slugs)) == len(slugs)
    assert all(re.fullmatch(r"[a-z0-9-]+", s) and len(s) <= 64 for s in slugs)
    assert gen.slugify("A red cube").startswith("a-red-cube-")


def test_stage_timer_accumulates():
    t = gen.StageTimer()
    with t("field"):
        sum(range(10000))
    with t("field"):
        pass
    t.add("export", 0.5)
    assert t.calls["field"] == 2 and t.seconds["export"] == 0.5
    assert list(t.as_dict())[: len(gen.STAGES)] == list(gen.STAGES)
    assert t.total() == pytest.approx(t.seconds["field"] + 0.5)
    assert "export 0.25s" in t.summary(per=2)


# -- a real (tiny, untrained) model end to end --------------------------------------------------------------------

TINY = {
    "text_encoder": {"name": "minilm", "max_length": 8},
    "mapping": {"name": "hypernetwork", "hidden_dim": 8},
    "field": {"name": "grid", "num_levels": 2, "base_resolution": 4, "max_resolution": 8, "hidden_dim": 8},
    "renderer": {"name": "volume", "num_samples": 8, "backend": "torch"},
    "extraction": {"threshold": 2.0},  # an untrained field is a soft ball of density ~6 at the centre
}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-model")
    AmortizedModel(TINY).save_pretrained(folder)
    return folder


def test_model_generate_method(tiny_model_dir):
    import att3d

    model = att3d.load(tiny_model_dir)
    timer = gen.StageTimer()
    meshes = model.generate(["a red cube", "a blue torus"], batch_size=2, timer=timer, progress=False,
                            grid_resolution=24, texture_size=32)
    assert [m.metadata["att3d"]["prompt"] for m in meshes] == ["a red cube", "a blue torus"]
    assert all(not gen.is_empty(m) and m.metadata["att3d"]["threshold"] == 2.0 for m in meshes)
    assert timer.calls["encode"] == 1 and timer.calls["mapping"] == 1  # one forward pass for the batch
    assert set(gen.STAGES) <= set(timer.seconds)
    with pytest.raises(gen.GenerationError, match="prompt 2: empty prompt"):
        model.generate(["a red cube", "   "], progress=False)
    from att3d.infer.turntable import field_turntable

    with torch.no_grad():
        cond = model.conditioning(["a red cube"])
    frames = field_turntable(model, cond, frames=2, resolution=12)
    assert frames.shape == (2, 12, 12, 3) and frames.dtype == np.uint8
    assert frames[:, 0, 0].min() > 240 and frames[:, 6, 6].max() < 240  # white corners, the blob in the middle


def _listed_files(stdout: str) -> set[str]:
    """The file column of the printed table (rows of a prompt's further files start with blanks)."""
    lines = stdout.splitlines()
    assert lines[0].split()[:2] == ["prompt", "file"] and set(lines[1]) <= {"-", " "}
    files = set()
    for line in lines[2:]:
        if re.match(r"\d+ prompts? in ", line):
            break
        cells = re.split(r"\s{2,}", line.strip())
        files.add(cells[0] if line.startswith(" ") else cells[1])
    return files


def test_cli_generate_writes_exactly_what_it_lists(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["generate", "a red cube", "a blue torus", "--checkpoint", str(tiny_model_dir), "--out", str(out),
                     "--resolution", "24", "--texture-size", "32", "--frames", "3", "--turntable-resolution", "32",
                     "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    listed = _listed_files(captured.out)
    written = {str(p) for p in out.iterdir()} - {str(out / gen.MANIFEST)}
    assert listed == written
    assert written == {str(out / f"{s}.{e}") for s in ("a-red-cube", "a-blue-torus") for e in ("glb", "mp4")}
    records = [json.loads(line) for line in (out / gen.MANIFEST).read_text().splitlines()]
    assert [(r["prompt"], r["slug"], sorted(r["files"])) for r in records] == [
        ("a red cube", "a-red-cube", ["a-red-cube.glb", "a-red-cube.mp4"]),
        ("a blue torus", "a-blue-torus", ["a-blue-torus.glb", "a-blue-torus.mp4"])]
    assert "per prompt: encode" in captured.out
    back = trimesh.load(out / "a-red-cube.glb", force="mesh")
    assert isinstance(back.visual, trimesh.visual.TextureVisuals) and len(back.faces) > 0
    import imageio_ffmpeg

    assert imageio_ffmpeg.count_frames_and_secs(str(out / "a-blue-torus.mp4"))[0] == 3


def test_cli_generate_obj_without_turntable(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "obj"
    code = cli.main(["generate", "a red cube", "--checkpoint", str(tiny_model_dir), "--out", str(out),
                     "--format", "OBJ", "--resolution", "16", "--texture-size", "16", "--no-turntable", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert {p.name for p in out.iterdir()} == {"a-red-cube.obj", "a-red-cube.mtl", "a-red-cube.png", gen.MANIFEST}
    assert _listed_files(captured.out) == {str(p) for p in out.iterdir()} - {str(out / gen.MANIFEST)}


@pytest.mark.parametrize("args, message", [
    (["a red cube", "--format", "fbx"], "unknown format 'fbx'"),
    (["a red cube", "--checkpoint", "no/such/model"], "model not found: no/such/model"),
    (["--out", "x"], "no prompts"),
    (["a red cube", ""], "prompt 2: empty prompt"),
    (["a red cube", "--resolution", "2"], "--resolution must be >= 4"),
    (["a red cube", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_cli_generate_errors_are_one_line(args, message, capsys, tmp_path):
    code = cli.main(["generate", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("att3d: error: ") and message in err and err.count("\n") == 1


def test_cli_generate_reports_empty_meshes(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "empty"
    code = cli.main(["generate", "a red cube", "--checkpoint", str(tiny_model_dir), "--out", str(out),
                     "--threshold", "1000", "--resolution", "16", "--quiet"])
    captured = capsys.readouterr()
    assert code == 1
    assert "nothing written" in captured.out and "1 of 1 prompts gave no surface" in captured.err
    assert not out.exists() or list(out.iterdir()) == []
