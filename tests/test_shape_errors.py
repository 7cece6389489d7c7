"""att3d.eval.shape_errors and scripts/shape_errors.py: excess, shortfall, the best turn, the slice image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import trimesh
from _tiny import load_script

from att3d.eval.shape_errors import best_azimuth, rotate_about_up, slice_image, volume_error_split
from att3d.world import metrics
from att3d.world.shapes import WorldObject


def _block(lo: int, hi: int, r: int = 8) -> torch.Tensor:
    occ = torch.zeros(r, r, r, dtype=torch.bool)
    occ[lo:hi, lo:hi, lo:hi] = True
    return occ


def test_volume_error_split_of_a_block_inside_a_larger_one():
    target, pred = _block(2, 6), _block(1, 6)  # 64 voxels inside 125
    split = volume_error_split(pred, target)
    assert split["excess"] == pytest.approx(61 / 125) and split["shortfall"] == 0.0
    assert split["volume_ratio"] == pytest.approx(125 / 64) and split["volume_iou"] == pytest.approx(64 / 125)
    back = volume_error_split(target, pred)  # the other way round: all shortfall
    assert back["excess"] == 0.0 and back["shortfall"] == pytest.approx(61 / 125)
    assert volume_error_split(torch.zeros(8, 8, 8, dtype=torch.bool), target)["excess"] == 0.0
    with pytest.raises(ValueError, match="empty"):
        volume_error_split(target, torch.zeros(8, 8, 8, dtype=torch.bool))


def test_rotate_about_up_turns_x_towards_minus_z_and_keeps_y():
    v = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    assert torch.allclose(rotate_about_up(v, 90.0), torch.tensor([[0.0, 0.0, -1.0], [0.0, 2.0, 0.0]]), atol=1e-6)
    assert torch.allclose(rotate_about_up(rotate_about_up(v, 12.0), -12.0), v, atol=1e-6)


def _cube_mesh(turn: float = 0.0, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    box = trimesh.creation.box(extents=(0.8 * scale,) * 3)  # the world's cube: half-size 0.4
    verts = rotate_about_up(torch.as_tensor(box.vertices, dtype=torch.float32), turn)
    return verts, torch.as_tensor(box.faces, dtype=torch.long)


def test_best_azimuth_finds_the_turn_that_undoes_a_turned_cube():
    target = metrics.ground_truth_occupancy(WorldObject("cube", "red"))
    verts, faces = _cube_mesh(turn=12.0)
    found = best_azimuth(verts, faces, target, angles=range(-21, 22, 3))
    assert found["angle"] == -12.0
    assert found["volume_iou"] > 0.95 > 0.9 > found["volume_iou_as_is"]


def test_slice_image_colours_each_class():
    target, pred = _block(2, 6), _block(1, 5)
    img = slice_image(pred, target, y_index=3, scale=2)
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    # the image is indexed [z, x] at 2 px per voxel
    assert tuple(img[2 * 3, 2 * 3]) == (150, 150, 150)   # both
    assert tuple(img[2 * 1, 2 * 1]) == (220, 40, 40)     # excess
    assert tuple(img[2 * 5, 2 * 5]) == (40, 80, 220)     # shortfall
    assert tuple(img[0, 0]) == (255, 255, 255)


def test_script_reports_a_fat_cube_and_a_turned_one(tmp_path, capsys):
    script = load_script("shape_errors")
    meshes = tmp_path / "meshes"
    meshes.mkdir()
    for name, turn, scale in (("a-red-cube", 0.0, 1.1), ("a-blue-cube", 15.0, 1.0)):
        verts, faces = _cube_mesh(turn, scale)
        trimesh.Trimesh(verts.numpy(), faces.numpy()).export(meshes / f"{name}.glb")
    out = tmp_path / "report"
    assert script.main(["--meshes", str(meshes), "--shapes", "cube", "--max-angle", "15", "--angle-step", "5",
                        "--out", str(out)]) == 0
    report = json.loads((out / "shape_errors.json").read_text())
    rows = {r["prompt"]: r for r in report["per_prompt"]}
    fat, turned = rows["a red cube"], rows["a blue cube"]
    assert fat["volume_ratio"] > 1.2 and fat["shortfall"] < 0.02 and fat["excess"] > 0.15
    assert fat["best_angle"] == 0.0
    assert turned["best_angle"] == -15.0 and turned["volume_iou_turned"] > turned["volume_iou"] + 0.05
    assert report["per_shape"]["cube"]["count"] == 2
    assert "| cube | 2 |" in (out / "shape_errors.md").read_text() and (out / "slices.png").is_file()
    assert "| cube | 2 |" in capsys.readouterr().out


def test_script_rejects_a_missing_folder_in_one_line(tmp_path, capsys):
    script = load_script("shape_errors")
    assert script.main(["--meshes", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("shape_errors: error: no such folder")


def test_pixel_size_is_the_worlds_image_width_at_the_origin_over_the_pixels():
    from att3d.eval.shape_errors import pixel_size

    # 2 * 2.2 * tan(20 deg) = 1.6015 world units across the image at the origin's depth
    assert pixel_size(32) == pytest.approx(1.60147 / 32, rel=1e-4)
    assert pixel_size(64) == pytest.approx(pixel_size(32) / 2)
    assert pixel_size(32, radius=1.1) == pytest.approx(pixel_size(32) / 2)
    with pytest.raises(ValueError):
        pixel_size(0)


def test_offset_occupancy_grows_with_the_offset_from_the_truth():
    from att3d.eval.shape_errors import offset_occupancy

    sphere = WorldObject(shape="sphere", colour="red")
    truth = metrics.ground_truth_occupancy(sphere, 32)
    assert torch.equal(offset_occupancy(sphere, 0.0, 32), truth)
    out, inward = offset_occupancy(sphere, 0.1, 32), offset_occupancy(sphere, -0.1, 32)
    assert (out & truth).sum() == truth.sum() and out.sum() > truth.sum()  # a superset
    assert (inward & ~truth).sum() == 0 and inward.sum() < truth.sum()  # a subset
    # the sphere of radius 0.5 grown by 0.1: (0.6 / 0.5)^3 = 1.728 times the volume, to the voxels' precision
    assert float(out.sum()) / float(truth.sum()) == pytest.approx(1.728, rel=0.05)


def test_equivalent_offset_inverts_the_volume_of_an_offset_surface():
    from att3d.eval.shape_errors import equivalent_offset, offset_occupancy

    sphere = WorldObject(shape="sphere", colour="red")
    n_true = float(metrics.ground_truth_occupancy(sphere).sum())
    for d in (-0.05, 0.04, 0.1):
        ratio = float(offset_occupancy(sphere, d).sum()) / n_true
        found = equivalent_offset(sphere, ratio)
        assert abs(found - d) < 2.0 / 64  # the voxel count only changes at voxel spacing
        assert float(offset_occupancy(sphere, found + 1e-6).sum()) / n_true >= ratio - 1e-9
    assert equivalent_offset(sphere, 1.0) == pytest.approx(0.0, abs=2.0 / 64)
    assert equivalent_offset(sphere, 100.0) == pytest.approx(0.25, abs=1e-6)  # clamped to the limit
    with pytest.raises(ValueError):
        equivalent_offset(sphere, 0.0)


def test_offset_sensitivity_script_writes_its_tables_and_refuses_a_bad_model_file(tmp_path, capsys):
    script = load_script("offset_sensitivity")
    errors = tmp_path / "shape_errors.json"
    errors.write_text(json.dumps({"per_shape": {"pyramid": {"volume_iou": 0.8, "volume_ratio": 1.2}}}))
    out = tmp_path / "out"
    assert script.main(["--shape-errors", str(errors), "--shapes", "cube", "pyramid", "--step", "0.1",
                        "--max-pixels", "0.3", "--out", str(out)]) == 0
    report = json.loads((out / "offset_sensitivity.json").read_text())
    assert report["offsets_px"] == pytest.approx([-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3])
    assert report["volume_iou"]["cube"][3] == 1.0 and report["volume_iou"]["pyramid"][3] == 1.0
    pyramid = report["per_shape"]["pyramid"]
    assert pyramid["equivalent_offset"] > 0 and 0 < pyramid["offset_volume_iou"] < 1
    assert "equivalent_offset" not in report["per_shape"]["cube"]  # not in the model's file
    assert (out / "offset_sensitivity.png").stat().st_size > 0 and "| pyramid |" in (out / "offset_sensitivity.md"
                                                                                     ).read_text()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert script.main(["--shape-errors", str(bad), "--out", str(out)]) == 2
    assert "cannot read" in capsys.readouterr().err
