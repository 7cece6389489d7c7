"""The metrics of the shapes world (``shared/WORLD.md``): the one module every test and benchmark uses.

Definitions (WORLD.md, "Metrics"):

- **Volume IoU** of two occupancies on the 64^3 grid of voxel centres over [-1, 1]^3
  (:func:`volume_iou`); the ground truth is SDF < 0 (:func:`att3d.world.render.occupancy`),
  a mesh is voxelised by ray parity (:func:`mesh_occupancy`).
- **Silhouette IoU** of foreground masks (foreground: value > 0.5) in the 8 evaluation
  views (:func:`silhouette_iou`).
- **Colour error**: mean absolute sRGB difference over the pixels that are foreground in
  both images (:func:`colour_error`); 1.0 (the worst possible) when no pixel is shared.
- **Retrieval accuracy**: a generated object is retrieved when its own prompt scores
  highest among the 64 ground-truth objects (:func:`retrieval_scores`, :func:`retrieval_accuracy`).

Every function is pure apart from two in-process caches of ground truth (renders at the
evaluation views and voxel occupancies), which are read-only to callers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from att3d.render.cameras import OrbitCameras
from att3d.world.render import occupancy, render_objects
from att3d.world.shapes import WorldObject, all_objects

#: Resolution of the voxel grid of the volume IoU.
VOXEL_RESOLUTION = 64
#: Foreground threshold on accumulated opacity / masks.
MASK_THRESHOLD = 0.5
#: Foreground threshold of :func:`image_foreground` (distance from the white background).
IMAGE_FOREGROUND_THRESHOLD = 0.15
#: Colour error reported when two images share no foreground pixel.
NO_OVERLAP_COLOUR_ERROR = 1.0

# Fixed, irrational-looking offsets of the (y, z) columns of mesh_occupancy: a column never
# passes exactly through a mesh vertex or edge that lies on a grid-aligned coordinate, so a
# crossing on a shared edge is never counted twice (or not at all).
_COLUMN_OFFSET_Y = 1.0e-6 * math.sqrt(2.0)
_COLUMN_OFFSET_Z = 1.0e-6 * math.sqrt(3.0)

_GT_VIEWS_CACHE: dict[tuple, dict[str, torch.Tensor]] = {}
_GT_OCCUPANCY_CACHE: dict[tuple, torch.Tensor] = {}


# --------------------------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------------------------

def volume_iou_batch(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Volume IoU of batches of occupancies (broadcasting over the leading dimension).

    Args:
        pred: (B, R, R, R) or (R, R, R) bool occupancy.
        target: (B, R, R, R) or (R, R, R) bool occupancy.

    Returns:
        (B,) float IoU; 1.0 where both occupancies are empty.
    """
    pred = pred.bool()
    target = target.bool()
    if pred.dim() == 3:
        pred = pred[None]
    if target.dim() == 3:
        target = target[None]
    if pred.shape[1:] != target.shape[1:]:
        raise ValueError(f"occupancy grids differ: {tuple(pred.shape[1:])} vs {tuple(target.shape[1:])}")
    inter = (pred & target).flatten(1).sum(1).double()
    union = (pred | target).flatten(1).sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return iou.float()


def volume_iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Volume IoU of two occupancies.

    Args:
        pred: (R, R, R) bool occupancy (e.g. of the generated object).
        target: (R, R, R) bool occupancy (e.g. :func:`att3d.world.render.occupancy`).

    Returns:
        |pred & target| / |pred | target| in [0, 1]; 1.0 when both are empty.
    """
    if pred.dim() != 3 or target.dim() != 3:
        raise ValueError(f"volume_iou takes (R, R, R) grids, got {tuple(pred.shape)} and {tuple(target.shape)}")
    return float(volume_iou_batch(pred, target)[0])


def ground_truth_occupancy(obj: WorldObject, resolution: int = VOXEL_RESOLUTION) -> torch.Tensor:
    """(R, R, R) bool ground-truth occupancy of ``obj`` (SDF < 0 on the voxel centres), cached per shape.

    The returned tensor is shared by the cache: do not modify it in place.
    """
    key = (obj.shape, int(resolution))
    if key not in _GT_OCCUPANCY_CACHE:
        _GT_OCCUPANCY_CACHE[key] = occupancy(obj, resolution)
    return _GT_OCCUPANCY_CACHE[key]


def ground_truth_occupancies(objects: Sequence[WorldObject] | None = None,
                             resolution: int = VOXEL_RESOLUTION) -> torch.Tensor:
    """(O, R, R, R) bool ground-truth occupancies of ``objects`` (default: the 64 of :func:`all_objects`)."""
    objects = all_objects() if objects is None else list(objects)
    return torch.stack([ground_truth_occupancy(o, resolution) for o in objects])


def mesh_occupancy(verts: torch.Tensor, faces: torch.Tensor, resolution: int = VOXEL_RESOLUTION,
                   bound: float = 1.0, max_pairs: int = 2_000_000) -> torch.Tensor:
    """Voxelise a closed triangle mesh by ray parity.

    For every (y, z) column of voxel centres a line is cast along +x; each triangle whose
    projection onto the yz plane contains the column contributes one crossing at the x of
    the intersection, and a voxel centre is inside when an odd number of crossings lie
    below its x. Columns are shifted by a tiny fixed offset (``~1e-6``) so that they never
    pass exactly through an edge or vertex of the mesh: a crossing on an edge shared by two
    triangles is counted exactly once. The winding order of the faces is irrelevant.

    Only triangles are tested against the columns inside their yz bounding box, in chunks
    of at most ``max_pairs`` (triangle, column) pairs, so memory stays bounded and ~50k
    faces take a few seconds on a CPU.

    Args:
        verts: (V, 3) float vertex positions (world units).
        faces: (F, 3) long vertex indices.
        resolution: R, voxels per axis.
        bound: the grid covers [-bound, bound]^3 (voxel centres as in
            :func:`att3d.world.render.voxel_centres` for bound 1).
        max_pairs: chunk size in (triangle, column) pairs.

    Returns:
        (R, R, R) bool occupancy indexed [x, y, z], on the device of ``verts``.
    """
    device = verts.device
    R = int(resolution)
    if faces.numel() == 0:
        return torch.zeros(R, R, R, dtype=torch.bool, device=device)
    tri = verts.double()[faces.long()]  # (F, 3, 3)
    ay, az = tri[:, :, 1], tri[:, :, 2]  # (F, 3)
    # Signed doubled area of the yz projection; edge-on triangles are never crossed by a shifted column.
    area = (ay[:, 1] - ay[:, 0]) * (az[:, 2] - az[:, 0]) - (az[:, 1] - az[:, 0]) * (ay[:, 2] - ay[:, 0])
    step = 2.0 * bound / R

    def index_range(lo: torch.Tensor, hi: torch.Tensor, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
        # Columns c_j = -bound + (j + 0.5) * step + offset with lo <= c_j <= hi.
        j_lo = torch.ceil((lo - offset + bound) / step - 0.5).clamp(0, R).long()
        j_hi = torch.floor((hi - offset + bound) / step - 0.5).clamp(-1, R - 1).long()
        return j_lo, (j_hi - j_lo + 1).clamp(min=0)

    j_lo, nj = index_range(ay.min(1).values, ay.max(1).values, _COLUMN_OFFSET_Y)
    k_lo, nk = index_range(az.min(1).values, az.max(1).values, _COLUMN_OFFSET_Z)
    counts = nj * nk
    keep = (counts > 0) & (area != 0)
    tri, area, j_lo, k_lo, nk, counts = tri[keep], area[keep], j_lo[keep], k_lo[keep], nk[keep], counts[keep]

    # toggles[column, i]: crossings whose first voxel centre above them is i (i = R: none).
    toggles = torch.zeros(R * R * (R + 1), dtype=torch.int32, device=device)
    cum = torch.cumsum(counts, 0)
    start = 0
    while start < tri.shape[0]:
        base = int(cum[start - 1]) if start > 0 else 0
        end = int(torch.searchsorted(cum, torch.tensor(base + max_pairs, device=device), right=True))
        end = max(end, start + 1)
        sl = slice(start, end)
        n_pairs = counts[sl]
        tid = torch.repeat_interleave(torch.arange(end - start, device=device), n_pairs)
        first = torch.cumsum(n_pairs, 0) - n_pairs
        local = torch.arange(int(n_pairs.sum()), device=device) - first[tid]
        jj = j_lo[sl][tid] + torch.div(local, nk[sl][tid], rounding_mode="floor")
        kk = k_lo[sl][tid] + local % nk[sl][tid]
        py = -bound + (jj.double() + 0.5) * step + _COLUMN_OFFSET_Y
        pz = -bound + (kk.double() + 0.5) * step + _COLUMN_OFFSET_Z
        t = tri[sl][tid]  # (P, 3, 3)
        y0, y1, y2 = t[:, 0, 1], t[:, 1, 1], t[:, 2, 1]
        z0, z1, z2 = t[:, 0, 2], t[:, 1, 2], t[:, 2, 2]
        # Edge functions: e_i is proportional to the barycentric weight of vertex i.
        e0 = (y2 - y1) * (pz - z1) - (z2 - z1) * (py - y1)
        e1 = (y0 - y2) * (pz - z2) - (z0 - z2) * (py - y2)
        e2 = (y1 - y0) * (pz - z0) - (z1 - z0) * (py - y0)
        inside = ((e0 > 0) & (e1 > 0) & (e2 > 0)) | ((e0 < 0) & (e1 < 0) & (e2 < 0))
        a = area[sl][tid]
        x = (e0 * t[:, 0, 0] + e1 * t[:, 1, 0] + e2 * t[:, 2, 0]) / a
        x, jj, kk = x[inside], jj[inside], kk[inside]
        # First voxel centre strictly above the crossing.
        i0 = (torch.floor((x + bound) / step - 0.5) + 1).clamp(0, R).long()
        flat = (jj * R + kk) * (R + 1) + i0
        toggles.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        start = end
    parity = torch.cumsum(toggles.view(R, R, R + 1)[:, :, :R], dim=2) % 2  # [y, z, x]
    return parity.bool().permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

def _foreground(mask: torch.Tensor, threshold: float) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > threshold


def silhouette_iou(mask_a: torch.Tensor, mask_b: torch.Tensor, threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """IoU of foreground masks, per image.

    Args:
        mask_a: (B, H, W) opacity / mask (float, foreground where > ``threshold``) or bool.
        mask_b: (B, H, W) likewise (broadcastable to ``mask_a``).

    Returns:
        (B,) float IoU; 1.0 where both images are empty.
    """
    fa = _foreground(mask_a, threshold)
    fb = _foreground(mask_b, threshold)
    fa, fb = torch.broadcast_tensors(fa, fb)
    inter = (fa & fb).flatten(1).sum(1).float()
    union = (fa | fb).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def colour_error(rgb_a: torch.Tensor, rgb_b: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor,
                 threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """Mean absolute sRGB difference over the pixels that are foreground in both images.

    The error of a pixel is the mean over its 3 channels of ``|rgb_a - rgb_b|``; the error of
    an image is the mean over its shared foreground pixels. When the two foregrounds share
    no pixel the error is defined as 1.0 (the largest possible value), never NaN.

    Args:
        rgb_a: (B, H, W, 3) sRGB in [0, 1].
        rgb_b: (B, H, W, 3) sRGB in [0, 1] (broadcastable to ``rgb_a``).
        mask_a: (B, H, W) opacity (foreground where > ``threshold``) or bool.
        mask_b: (B, H, W) likewise.

    Returns:
        (B,) float error in [0, 1].
    """
    shared = _foreground(mask_a, threshold) & _foreground(mask_b, threshold)
    diff = (rgb_a.float() - rgb_b.float()).abs().mean(-1)  # (B, H, W)
    diff, shared = torch.broadcast_tensors(diff, shared)
    n = shared.flatten(1).sum(1)
    total = torch.where(shared, diff, torch.zeros_like(diff)).flatten(1).sum(1)
    return torch.where(n > 0, total / n.clamp(min=1).float(), torch.full_like(total, NO_OVERLAP_COLOUR_ERROR))


def image_foreground(rgb: torch.Tensor, threshold: float = IMAGE_FOREGROUND_THRESHOLD) -> torch.Tensor:
    """Foreground of images on a white background (for samples that have no opacity channel).

    A pixel is foreground when some channel is darker than white by more than ``threshold``:
    ``max_c (1 - rgb_c) > threshold``.

    Args:
        rgb: (B, H, W, 3) sRGB in [0, 1].

    Returns:
        (B, H, W) bool.
    """
    return (1.0 - rgb.float()).amax(dim=-1) > threshold


def retrieval_accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of rows whose highest score is at their target column.

    Args:
        scores: (N, M) similarity of query n to candidate m (higher is better).
        targets: (N,) long index of the correct candidate of each query.

    Returns:
        accuracy in [0, 1] (ties are broken towards the lower column index, as ``argmax``).
    """
    if scores.dim() != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(f"scores (N, M) and targets (N,) expected, got {tuple(scores.shape)}, {tuple(targets.shape)}")
    if scores.shape[0] == 0:
        return 0.0
    return float((scores.argmax(dim=1) == targets.to(scores.device).long()).float().mean())


# --------------------------------------------------------------------------------------------
# Ground truth at the evaluation views and per-object scores
# --------------------------------------------------------------------------------------------

def ground_truth_views(objects: Sequence[WorldObject] | None, resolution: int, n_views: int = 8,
                       chunk: int = 8) -> dict[str, torch.Tensor]:
    """Ground-truth renders of objects at the evaluation views ``OrbitCameras.evaluation(n_views)``.

    Results are cached in-process by ``(objects, resolution, n_views)``; the returned tensors
    are shared with the cache and must not be modified in place.

    Args:
        objects: O objects (None: the 64 of :func:`all_objects`).
        resolution: H = W.
        n_views: V evaluation views (azimuth k 2 pi / V, elevation 20 degrees).
        chunk: objects rendered per batch (bounds memory).

    Returns:
        dict with ``rgb`` (O, V, H, W, 3) in [0, 1] on white and ``mask`` (O, V, H, W) bool.
    """
    objects = tuple(all_objects() if objects is None else objects)
    key = (objects, int(resolution), int(n_views))
    if key not in _GT_VIEWS_CACHE:
        cams = OrbitCameras.evaluation(n_views)
        rgbs, masks = [], []
        for s in range(0, len(objects), chunk):
            objs = objects[s:s + chunk]
            flat = [o for o in objs for _ in range(n_views)]
            cam_idx = torch.arange(n_views).repeat(len(objs))
            out = render_objects(flat, cams.index(cam_idx), resolution)
            rgbs.append(out["rgb"].reshape(len(objs), n_views, resolution, resolution, 3))
            masks.append(out["mask"].reshape(len(objs), n_views, resolution, resolution) > MASK_THRESHOLD)
        _GT_VIEWS_CACHE[key] = {"rgb": torch.cat(rgbs), "mask": torch.cat(masks)}
    return dict(_GT_VIEWS_CACHE[key])


def clear_caches() -> None:
    """Drop the cached ground-truth renders and occupancies."""
    _GT_VIEWS_CACHE.clear()
    _GT_OCCUPANCY_CACHE.clear()


def score_renders(rgb: torch.Tensor, opacity: torch.Tensor, obj: WorldObject) -> dict[str, float]:
    """Score renders of a generated object at the V evaluation views against ``obj``.

    Args:
        rgb: (V, H, W, 3) renders at ``OrbitCameras.evaluation(V)`` on any background.
        opacity: (V, H, W) accumulated opacity (foreground where > 0.5) or bool mask.
        obj: the ground-truth object.

    Returns:
        ``silhouette_iou``: mean over the V views of the per-view silhouette IoU;
        ``colour_error``: mean absolute sRGB error pooled over the pixels foreground in both,
        over all V views (1.0 when no pixel is shared).
    """
    V, H, W, _ = rgb.shape
    gt = ground_truth_views([obj], H, V)
    gt_rgb, gt_mask = gt["rgb"][0].to(rgb.device), gt["mask"][0].to(rgb.device)
    sil = silhouette_iou(opacity, gt_mask).mean()
    col = colour_error(rgb.reshape(1, V * H, W, 3), gt_rgb.reshape(1, V * H, W, 3),
                       opacity.reshape(1, V * H, W), gt_mask.reshape(1, V * H, W))[0]
    return {"silhouette_iou": float(sil), "colour_error": float(col)}


def score_object(occ: torch.Tensor, rgb: torch.Tensor, opacity: torch.Tensor, obj: WorldObject) -> dict[str, float]:
    """All per-object metrics of a generated object against ``obj``.

    Args:
        occ: (R, R, R) bool occupancy of the generated object on the voxel centres over [-1, 1]^3.
        rgb: (V, H, W, 3) renders at ``OrbitCameras.evaluation(V)``.
        opacity: (V, H, W) accumulated opacity or bool mask.
        obj: the ground-truth object.

    Returns:
        dict with ``volume_iou``, ``silhouette_iou`` and ``colour_error`` (see :func:`score_renders`).
    """
    vol = volume_iou(occ.cpu(), ground_truth_occupancy(obj, occ.shape[0]))
    return {"volume_iou": vol, **score_renders(rgb, opacity, obj)}


def retrieval_scores(occ: torch.Tensor, rgb: torch.Tensor, opacity: torch.Tensor,
                     objects: Sequence[WorldObject] | None = None) -> torch.Tensor:
    """Score a generated object against every ground-truth object: ``volume IoU - colour error``.

    Args:
        occ: (R, R, R) bool occupancy of the generated object.
        rgb: (V, H, W, 3) its renders at ``OrbitCameras.evaluation(V)``.
        opacity: (V, H, W) their accumulated opacity or bool masks.
        objects: the O candidates (None: the 64 of :func:`all_objects`).

    Returns:
        (O,) scores; the generated object is retrieved when its own object's score is the highest
        (see :func:`retrieval_accuracy`).
    """
    objects = all_objects() if objects is None else list(objects)
    V, H, W, _ = rgb.shape
    vol = volume_iou_batch(occ.cpu(), ground_truth_occupancies(objects, occ.shape[0]))
    gt = ground_truth_views(objects, H, V)
    n_obj = len(objects)
    col = colour_error(rgb.cpu().reshape(1, V * H, W, 3), gt["rgb"].reshape(n_obj, V * H, W, 3),
                       opacity.cpu().reshape(1, V * H, W), gt["mask"].reshape(n_obj, V * H, W))
    return vol - col


def image_retrieval_scores(rgb: torch.Tensor, foreground: torch.Tensor, gt_rgb: torch.Tensor,
                           gt_mask: torch.Tensor) -> torch.Tensor:
    """Score one image against O ground-truth images of the same view: ``silhouette IoU - colour error``.

    The image-space analogue of :func:`retrieval_scores`, for 2D samples (e.g. of the prior).

    Args:
        rgb: (H, W, 3) the image; foreground: (H, W) its bool / opacity foreground.
        gt_rgb: (O, H, W, 3) candidates; gt_mask: (O, H, W) their foregrounds.

    Returns:
        (O,) scores.
    """
    sil = silhouette_iou(foreground[None], gt_mask)
    col = colour_error(rgb[None], gt_rgb, foreground[None], gt_mask)
    return sil - col


# --------------------------------------------------------------------------------------------
# A model's field, measured as the metrics need it
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def field_occupancy(model, cond: dict[str, torch.Tensor], resolution: int = VOXEL_RESOLUTION,
                    threshold: float | None = None, chunk: int = 65536) -> torch.Tensor:
    """(B, R, R, R) bool on the CPU: density above ``threshold`` at the voxel centres over [-1, 1]^3.

    Args:
        model: anything with ``field.density(points (B, N, 3), cond)``, ``device`` and ``config`` (an amortized
            model).
        cond: field conditioning of B prompts, ``{name: (B, ...)}``.
        threshold: None: the model's extraction threshold (:func:`att3d.mesh.extract.extraction_threshold`).
    """
    from att3d.mesh.extract import extraction_threshold
    from att3d.world.render import voxel_centres

    threshold = extraction_threshold(model) if threshold is None else threshold
    pts = voxel_centres(resolution, model.device).reshape(1, -1, 3)
    B = next(iter(cond.values())).shape[0]
    out = []
    for s in range(0, pts.shape[1], chunk):
        p = pts[:, s:s + chunk].expand(B, -1, -1)
        out.append(model.field.density(p, cond) > threshold)
    return torch.cat(out, dim=1).reshape(B, resolution, resolution, resolution).cpu()


@torch.no_grad()
def render_views(model, cond: dict[str, torch.Tensor], resolution: int = 64, n_views: int = 8,
                 background=(1.0, 1.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Render each prompt at the evaluation views, one prompt at a time.

    Args:
        model: anything with ``render(cond, cameras, resolution, background=...)`` and ``device``.
        cond: field conditioning of B prompts, ``{name: (B, ...)}``.

    Returns:
        rgb (B, V, H, W, 3) and opacity (B, V, H, W) on the CPU.
    """
    cams = OrbitCameras.evaluation(n_views, device=model.device)
    B = next(iter(cond.values())).shape[0]
    rgbs, ops = [], []
    for b in range(B):
        cb = {k: v[b:b + 1].repeat_interleave(n_views, dim=0) for k, v in cond.items()}
        out = model.render(cb, cams, resolution, background=background)
        rgbs.append(out["rgb"].cpu())
        ops.append(out["opacity"].cpu())
    return torch.stack(rgbs), torch.stack(ops)
