"""The shapes-world metrics (att3d.world.metrics) on cases with known answers."""

from __future__ import annotations

import math
import time

import pytest
import torch
import trimesh

from att3d.render.cameras import OrbitCameras
from att3d.world import metrics
from att3d.world.render import occupancy, render_objects, voxel_centres
from att3d.world.shapes import WorldObject, all_objects

# --------------------------------------------------------------------------------------------
# Volume IoU
# --------------------------------------------------------------------------------------------


def test_volume_iou_of_an_object_with_itself_and_a_disjoint_one():
    sphere = occupancy(WorldObject("sphere", "red"))
    assert metrics.volume_iou(sphere, sphere) == 1.0
    left = voxel_centres(64)[..., 0] < 0
    assert metrics.volume_iou(left, ~left) == 0.0
    empty = torch.zeros(64, 64, 64, dtype=torch.bool)
    assert metrics.volume_iou(empty, empty) == 1.0
    assert metrics.volume_iou(sphere, empty) == 0.0


def test_volume_iou_partial_overlap():
    a = torch.zeros(8, 8, 8, dtype=torch.bool)
    b = torch.zeros(8, 8, 8, dtype=torch.bool)
    a[:4] = True  # 256 voxels
    b[2:6] = True  # 256 voxels, 128 shared
    assert metrics.volume_iou(a, b) == pytest.approx(128 / 384)
    # Nested: a cube inside the sphere.
    cube = occupancy(WorldObject("cube", "red"))
    sphere = occupancy(WorldObject("sphere", "red"))
    want = (cube & sphere).sum().item() / (cube | sphere).sum().item()
    assert metrics.volume_iou(cube, sphere) == pytest.approx(want)
    assert 0.3 < metrics.volume_iou(cube, sphere) < 1.0


def test_volume_iou_batch_broadcasts():
    occ = metrics.ground_truth_occupancies()
    assert occ.shape == (64, 64, 64, 64)
    ious = metrics.volume_iou_batch(occ[8], occ)  # cube (red) against all 64 objects
    assert ious.shape == (64,)
    assert torch.all(ious[8:16] == 1.0)  # same shape, any colour
    assert ious[:8].max() < 1.0 and ious[16:].max() < 1.0
    with pytest.raises(ValueError):
        metrics.volume_iou(occ[0], occ[:2])


# --------------------------------------------------------------------------------------------
# Mesh occupancy
# --------------------------------------------------------------------------------------------


def _mesh_tensors(mesh: trimesh.Trimesh) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces, dtype=torch.long)


def test_mesh_occupancy_of_a_sphere_and_a_box():
    centres = voxel_centres(64)
    v, f = _mesh_tensors(trimesh.creation.icosphere(subdivisions=4, radius=0.5))
    occ = metrics.mesh_occupancy(v, f, 64)
    assert occ.shape == (64, 64, 64) and occ.dtype == torch.bool
    assert metrics.volume_iou(occ, centres.norm(dim=-1) < 0.5) > 0.97
    assert metrics.volume_iou(occ, occupancy(WorldObject("sphere", "red"))) > 0.97

    v, f = _mesh_tensors(trimesh.creation.box(extents=(0.8, 0.8, 0.8)))
    assert metrics.volume_iou(metrics.mesh_occupancy(v, f), occupancy(WorldObject("cube", "red"))) > 0.97


def test_mesh_occupancy_is_indexed_xyz_and_ignores_winding():
    centres = voxel_centres(64)
    # An elongated off-centre box: a wrong axis order would give a low IoU.
    box = trimesh.creation.box(extents=(1.2, 0.4, 0.2))
    box.apply_translation((0.3, -0.2, 0.1))
    inside = ((centres - torch.tensor([0.3, -0.2, 0.1])).abs() < torch.tensor([0.6, 0.2, 0.1])).all(-1)
    v, f = _mesh_tensors(box)
    assert metrics.volume_iou(metrics.mesh_occupancy(v, f), inside) > 0.97
    # Two spheres, one with inverted faces: parity does not care about orientation.
    a = trimesh.creation.icosphere(3, radius=0.3)
    a.apply_translation((-0.45, 0.0, 0.0))
    b = trimesh.creation.icosphere(3, radius=0.3)
    b.apply_translation((0.45, 0.1, 0.0))
    b.invert()
    v, f = _mesh_tensors(trimesh.util.concatenate([a, b]))
    want = ((centres - torch.tensor([-0.45, 0.0, 0.0])).norm(dim=-1) < 0.3) | (
        (centres - torch.tensor([0.45, 0.1, 0.0])).norm(dim=-1) < 0.3)
    assert metrics.volume_iou(metrics.mesh_occupancy(v, f), want) > 0.95


def test_mesh_occupancy_edges_through_columns_are_counted_once():
    # Vertices exactly on the (y, z) coordinates of voxel columns, and faces split into many triangles
    # sharing edges: every column must see exactly one entry and one exit.
    h = 15.5 / 32  # a voxel-centre coordinate
    box = trimesh.creation.box(extents=(2 * h - 0.01, 2 * h, 2 * h)).subdivide().subdivide()
    v, f = _mesh_tensors(box)
    occ = metrics.mesh_occupancy(v, f)
    c = voxel_centres(64)
    strict = (c[..., 0].abs() < h - 0.005) & (c[..., 1].abs() < h) & (c[..., 2].abs() < h)
    loose = (c[..., 0].abs() < h - 0.005) & (c[..., 1].abs() <= h) & (c[..., 2].abs() <= h)
    assert (occ & ~loose).sum() == 0  # nothing outside the box
    assert (strict & ~occ).sum() == 0  # everything strictly inside


def test_mesh_occupancy_handles_many_faces_quickly():
    v, f = _mesh_tensors(trimesh.creation.icosphere(subdivisions=6, radius=0.6))  # 81920 faces
    assert f.shape[0] > 50000
    t0 = time.perf_counter()
    occ = metrics.mesh_occupancy(v, f, 64, max_pairs=200_000)  # small chunks: exercises the chunking
    elapsed = time.perf_counter() - t0
    assert metrics.volume_iou(occ, voxel_centres(64).norm(dim=-1) < 0.6) > 0.98
    assert elapsed < 20.0
    assert metrics.mesh_occupancy(v[:0], f[:0]).sum() == 0


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def test_silhouette_iou():
    a = torch.zeros(3, 4, 4)
    b = torch.zeros(3, 4, 4)
    a[0, :2] = 1.0
    b[0, :2] = 0.9  # same silhouette
    a[1, :2] = 1.0
    b[1, 1:3] = 1.0  # 4 shared of 12
    a[2, 0, 0] = 0.4  # below the threshold: both empty -> 1
    iou = metrics.silhouette_iou(a, b)
    assert iou.shape == (3,)
    assert torch.allclose(iou, torch.tensor([1.0, 4 / 12, 1.0]))
    assert metrics.silhouette_iou(a[1:2] > 0.5, ~(a[1:2] > 0.5)).item() == 0.0


def test_colour_error():
    gen = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 8, 8, 3, generator=gen) * 0.8
    mask = torch.ones(2, 8, 8)
    assert torch.equal(metrics.colour_error(rgb, rgb, mask, mask), torch.zeros(2))
    offset = rgb + torch.tensor([0.1, 0.0, 0.2])
    assert torch.allclose(metrics.colour_error(rgb, offset, mask, mask), torch.full((2,), 0.1), atol=1e-6)
    # Only pixels foreground in both count.
    other = rgb.clone()
    other[:, :4] = 1.0 - other[:, :4]
    mask_b = mask.clone()
    mask_b[:, :4] = 0.0
    assert torch.allclose(metrics.colour_error(rgb, other, mask, mask_b), torch.zeros(2))
    # No shared pixel: defined as 1.0, not NaN.
    err = metrics.colour_error(rgb, rgb, mask, torch.zeros(2, 8, 8))
    assert torch.equal(err, torch.ones(2))


def test_image_foreground():
    rgb = torch.ones(1, 2, 3, 3)
    rgb[0, 0, 0] = torch.tensor([0.9, 0.9, 0.9])  # near white: background
    rgb[0, 0, 1] = torch.tensor([1.0, 1.0, 0.1])  # yellow: one dark channel is enough
    rgb[0, 1, 2] = torch.tensor([0.3, 0.3, 0.3])
    fg = metrics.image_foreground(rgb)
    assert fg.dtype == torch.bool
    assert fg.tolist() == [[[False, True, False], [False, False, True]]]
    # Ground-truth renders: image foreground agrees with the renderer's mask.
    out = render_objects(all_objects()[::9], OrbitCameras.evaluation(8), 32)
    agree = (metrics.image_foreground(out["rgb"]) == (out["mask"] > 0.5)).float().mean()
    assert agree > 0.995


def test_retrieval_accuracy():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.1], [0.5, 0.6, 0.4], [0.0, 0.0, 1.0]])
    targets = torch.tensor([0, 1, 2, 2])
    assert metrics.retrieval_accuracy(scores, targets) == pytest.approx(0.75)
    assert metrics.retrieval_accuracy(torch.eye(5), torch.arange(5)) == 1.0
    assert metrics.retrieval_accuracy(torch.eye(5), torch.arange(5).flip(0)) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        metrics.retrieval_accuracy(scores, targets[:2])


# --------------------------------------------------------------------------------------------
# Ground truth views and object scores
# --------------------------------------------------------------------------------------------


def test_ground_truth_views_are_the_evaluation_renders_and_cached():
    objs = [WorldObject("cone", "pink"), WorldObject("torus", "blue")]
    gt = metrics.ground_truth_views(objs, 24, 8)
    assert gt["rgb"].shape == (2, 8, 24, 24, 3) and gt["mask"].shape == (2, 8, 24, 24)
    assert gt["mask"].dtype == torch.bool
    direct = render_objects([objs[1]] * 8, OrbitCameras.evaluation(8), 24)
    assert torch.allclose(gt["rgb"][1], direct["rgb"])
    assert torch.equal(gt["mask"][1], direct["mask"] > 0.5)
    again = metrics.ground_truth_views(tuple(objs), 24, 8)
    assert again["rgb"] is gt["rgb"]  # served from the cache


def test_perfect_object_scores_perfectly_and_is_retrieved():
    obj = WorldObject("capsule", "green")
    gt = metrics.ground_truth_views([obj], 32)
    occ = occupancy(obj)
    rgb, mask = gt["rgb"][0], gt["mask"][0].float()
    s = metrics.score_object(occ, rgb, mask, obj)
    assert s == {"volume_iou": 1.0, "silhouette_iou": 1.0, "colour_error": 0.0}
    scores = metrics.retrieval_scores(occ, rgb, mask)
    assert scores.shape == (64,)
    own = all_objects().index(obj)
    assert scores.argmax().item() == own
    assert scores[own].item() == pytest.approx(1.0)
    # Same shape, other colour: volume IoU 1 but a colour error.
    red = all_objects().index(WorldObject("capsule", "red"))
    assert 0.0 < scores[own] - scores[red] < 1.0


def test_wrong_colour_and_wrong_shape_score_worse():
    truth = WorldObject("cylinder", "yellow")
    gen = metrics.ground_truth_views([WorldObject("cylinder", "purple"), WorldObject("sphere", "yellow")], 32)
    purple = metrics.score_renders(gen["rgb"][0], gen["mask"][0], truth)
    assert purple["silhouette_iou"] == 1.0 and purple["colour_error"] > 0.2
    sphere = metrics.score_renders(gen["rgb"][1], gen["mask"][1], truth)
    assert sphere["silhouette_iou"] < 0.9 and sphere["colour_error"] < 0.1


def test_image_retrieval_scores():
    gt = metrics.ground_truth_views(None, 16, 8)
    assert gt["rgb"].shape == (64, 8, 16, 16, 3)
    view = 3
    for idx in (0, 27, 63):
        rgb = gt["rgb"][idx, view]
        scores = metrics.image_retrieval_scores(rgb, metrics.image_foreground(rgb[None])[0], gt["rgb"][:, view],
                                                gt["mask"][:, view])
        assert scores.shape == (64,) and scores.argmax().item() == idx
        assert scores[idx].item() > 0.9
    assert math.isfinite(float(scores.min()))
