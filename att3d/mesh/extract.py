"""Field -> mesh: the extraction threshold, the density grid, iso-surface, cleanup, UV atlas and texture.

Per batch of B prompts' field conditioning (no per-prompt optimisation)::

    field    density on a grid              -> (B, R, R, R) over the field's box [-bound, bound]^3
    extraction  marching cubes at the extraction threshold (density above it is inside),
             weld, drop floaters, Taubin smoothing
    texture  UV atlas (box projection, :mod:`att3d.mesh.atlas`; or xatlas) + texture baked from
             the field's colour, plus per-vertex colours
    export   trimesh

Colour is read slightly *inside* the surface: at the iso-surface the density equals the
extraction threshold, a thin, barely opaque shell whose colour the training signal hardly
constrains (volume rendering sees a pixel's colour where the accumulated weight is large, i.e.
just below that shell). Every colour query point is therefore moved ``colour_offset`` (default:
one grid cell) along the inward normal, the normalised gradient of the density (autograd).

The extraction threshold is the model's ``config["extraction"]["threshold"]`` if set, else
:data:`DEFAULT_THRESHOLD` (the same as the quality metrics'). A prompt whose density never exceeds
it gives an *empty* mesh (no vertices) flagged in ``mesh.metadata["att3d"]["empty"]`` with the
reason; it is never a crash.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import trimesh

from att3d.utils.errors import Att3dError
from att3d.utils.timing import StageTimer, maybe_timed

#: Density above which a point is inside: occupancy, meshes and volume IoU (``configs/train.yaml``'s
#: ``extraction.threshold`` writes the same value into every trained model's config).
DEFAULT_THRESHOLD = 5.0
#: UV atlas methods.
UV_METHODS = ("box", "xatlas")


class GenerationError(Att3dError):
    """Generation cannot run as asked (bad option, no prompt, missing model)."""


def extraction_threshold(model: Any) -> float:
    """The density threshold of extraction: ``model.config["extraction"]["threshold"]`` or :data:`DEFAULT_THRESHOLD`."""
    config = getattr(model, "config", None) or {}
    return float((config.get("extraction") or {}).get("threshold", DEFAULT_THRESHOLD))


def _batch_size(cond: dict[str, torch.Tensor]) -> int:
    if not cond:
        raise GenerationError("empty conditioning: the mapping produced no tensors")
    return int(next(iter(cond.values())).shape[0])


@torch.no_grad()
def density_grid(field: torch.nn.Module, cond: dict[str, torch.Tensor], resolution: int, bound: float = 1.0,
                 chunk: int = 1 << 18, progress: bool = False) -> torch.Tensor:
    """The field's density at :func:`att3d.mesh.grid_points` (the sampling of :func:`att3d.mesh.marching_cubes`).

    Args:
        field: ``field.density(points (B, N, 3), cond) -> (B, N)``.
        cond: conditioning of B prompts, ``{name: (B, ...)}``.
        resolution: R samples per axis over ``[-bound, bound]``.
        chunk: points evaluated per call, summed over the batch.

    Returns:
        (B, R, R, R) float density indexed ``[x, y, z]``.
    """
    from tqdm import tqdm

    from att3d.mesh.marching_cubes import grid_points

    B = _batch_size(cond)
    device = next(iter(cond.values())).device
    pts = grid_points(resolution, bound, device=device).reshape(1, -1, 3)
    n = pts.shape[1]
    step = max(1024, chunk // max(B, 1))
    out = []
    for s in tqdm(range(0, n, step), desc="field", disable=not progress, leave=False):
        out.append(field.density(pts[:, s:s + step].expand(B, -1, -1), cond).float())
    return torch.cat(out, dim=1).reshape(B, resolution, resolution, resolution)


def surface_colour_fn(field: torch.nn.Module, cond: dict[str, torch.Tensor], offset: float
                      ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Colour of the field near a surface, read ``offset`` inside it (see the module docstring).

    Args:
        field: ``field(points (1, N, 3), cond) -> (density (1, N), rgb (1, N, 3))``.
        cond: conditioning of ONE prompt, ``{name: (1, ...)}``.
        offset: distance (world units) along the inward normal ``normalize(grad density)``;
            0 reads at the points themselves.

    Returns:
        ``fn(points (N, 3)) -> rgb (N, 3)`` in [0, 1] (no gradients).
    """

    def fn(points: torch.Tensor) -> torch.Tensor:
        p = points.detach()[None].to(next(iter(cond.values())).dtype)
        if offset > 0 and p.shape[1] > 0:
            with torch.enable_grad():
                q = p.clone().requires_grad_(True)
                density = field.density(q, cond)
                grad = None
                if density.requires_grad:
                    (grad,) = torch.autograd.grad(density.sum(), q, allow_unused=True)
            if grad is not None:
                p = p + offset * torch.nn.functional.normalize(grad.detach(), dim=-1)
        with torch.no_grad():
            return field(p, cond)[1][0, :, :3].float().clamp(0.0, 1.0)

    return fn


def empty_mesh(reason: str, **meta: Any) -> trimesh.Trimesh:
    """A mesh without vertices, flagged ``metadata["att3d"]["empty"]`` with the reason."""
    mesh = trimesh.Trimesh(vertices=np.zeros((0, 3)), faces=np.zeros((0, 3), dtype=np.int64), process=False)
    mesh.metadata["att3d"] = {**meta, "empty": True, "reason": reason}
    return mesh


def is_empty(mesh: trimesh.Trimesh) -> bool:
    """Whether a generated mesh is empty (no surface above the threshold)."""
    return len(mesh.faces) == 0 or bool(mesh.metadata.get("att3d", {}).get("empty", False))


def uv_atlas(verts: torch.Tensor, faces: torch.Tensor, size: int, padding: int, method: str = "box"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A UV atlas by ``method`` (:data:`UV_METHODS`): vmapping (V',), faces (F, 3), uvs (V', 2) on verts' device."""
    if method == "box":
        from att3d.mesh.atlas import box_atlas

        return box_atlas(verts, faces, size=size, padding=padding)
    if method == "xatlas":
        from att3d.mesh.texture import uv_unwrap

        vm, nf, uv = uv_unwrap(verts, faces, resolution=size, padding=padding)
        dev = verts.device
        return torch.from_numpy(vm).to(dev), torch.from_numpy(nf).to(dev), torch.from_numpy(uv).to(dev)
    raise GenerationError(f"unknown uv method {method!r}; choose one of {', '.join(UV_METHODS)}")


def meshes_from_conditioning(model: Any, cond: dict[str, torch.Tensor], grid_resolution: int = 96,
                             threshold: float | None = None, texture_size: int = 256,
                             min_component_fraction: float = 0.05, smooth_iterations: int = 10,
                             colour_offset: float | None = None, uv_method: str = "box", texture_padding: int = 4,
                             timer: StageTimer | None = None, progress: bool = False) -> list[trimesh.Trimesh]:
    """Textured meshes of B prompts' fields.

    Args:
        model: anything with a ``field`` (``field(points, cond)``, ``field.density``, optional
            ``field.bound``) and optionally ``config`` (for the extraction threshold), e.g. an
            :class:`~att3d.model.AmortizedModel`.
        cond: field conditioning ``{name: (B, ...)}`` (from ``model.conditioning``, or interpolated).
        grid_resolution: R, density samples per axis over the field's box.
        threshold: density iso-value (inside: above); None: :func:`extraction_threshold`.
        texture_size: texture height = width; 0 keeps per-vertex colours only (no UV atlas).
        min_component_fraction: drop connected parts with fewer faces than this fraction of the largest.
        smooth_iterations: Taubin smoothing iterations (0: none).
        colour_offset: how far inside the surface colour is read (world units); None: one grid cell
            ``2 bound / (R - 1)``; 0: on the surface.
        uv_method: ``"box"`` (fast box-projection atlas) or ``"xatlas"`` (slow, fewer seams).
        texture_padding: gutter texels around charts (and dilation of the baked texture).
        timer: stages ``field``, ``extraction``, ``texture``, ``export`` are added to it.
        progress: progress bars.

    Returns:
        B ``trimesh.Trimesh`` in the field's frame: ``TextureVisuals`` (PBR material with the baked
        texture; the per-vertex colours are kept in ``mesh.vertex_attributes["color"]``, (V, 4)
        RGBA uint8, which GLB stores as the application attribute ``_color``: a glTF ``COLOR_0``
        would multiply the texture in viewers) or, with ``texture_size=0``, ``ColorVisuals``.
        ``mesh.metadata["att3d"]`` holds ``threshold``, ``grid_resolution``, ``empty`` (and
        ``reason`` when empty).
    """
    from tqdm import tqdm

    from att3d.mesh.cleanup import clean_mesh
    from att3d.mesh.export import to_trimesh
    from att3d.mesh.marching_cubes import marching_cubes
    from att3d.mesh.texture import bake_texture

    if grid_resolution < 4:
        raise GenerationError(f"grid resolution must be >= 4, got {grid_resolution}")
    if texture_size < 0:
        raise GenerationError(f"texture size must be >= 0, got {texture_size}")
    if uv_method not in UV_METHODS:
        raise GenerationError(f"unknown uv method {uv_method!r}; choose one of {', '.join(UV_METHODS)}")
    field = model.field
    thr = extraction_threshold(model) if threshold is None else float(threshold)
    bound = float(getattr(field, "bound", 1.0))
    R = int(grid_resolution)
    offset = 2.0 * bound / (R - 1) if colour_offset is None else float(colour_offset)
    B = _batch_size(cond)

    with maybe_timed(timer, "field"):
        density = density_grid(field, cond, R, bound, progress=progress)
        # Nothing is inside on the box's faces, so every level set closes (the field is empty outside the box).
        density[:, [0, -1]] = 0.0
        density[:, :, [0, -1]] = 0.0
        density[:, :, :, [0, -1]] = 0.0

    meshes: list[trimesh.Trimesh] = []
    for b in tqdm(range(B), desc="meshes", disable=not progress or B == 1, leave=False):
        meta = {"threshold": thr, "grid_resolution": R}
        cond_b = {k: v[b:b + 1] for k, v in cond.items()}
        with maybe_timed(timer, "extraction"):
            vol = density[b]
            peak = float(vol.max())
            verts = faces = None
            if peak > thr:
                verts, faces = marching_cubes(vol, thr, bound, inside="above")
                verts, faces = clean_mesh(verts, faces, min_component_fraction, smooth_iterations=smooth_iterations)
        if verts is None or faces is None or faces.shape[0] == 0:
            reason = (f"no surface: the density never exceeds the extraction threshold {thr:g} "
                      f"(max {peak:.3g}); try a lower --threshold")
            meshes.append(empty_mesh(reason, **meta))
            continue
        with maybe_timed(timer, "texture"):
            colour = surface_colour_fn(field, cond_b, offset)
            if texture_size > 0:
                vmap, faces, uvs = uv_atlas(verts, faces, texture_size, texture_padding, uv_method)
                verts = verts[vmap]
                texture = bake_texture(verts.detach(), faces, uvs, colour, size=texture_size,
                                       padding=texture_padding)
            else:
                uvs = texture = None
            vcol = colour(verts)
        with maybe_timed(timer, "export"):
            if texture is not None:
                mesh = to_trimesh(verts, faces, uvs=uvs, texture=texture)
                rgba = np.concatenate([_uint8(vcol), np.full((vcol.shape[0], 1), 255, np.uint8)], axis=1)
                mesh.vertex_attributes["color"] = rgba
            else:
                mesh = to_trimesh(verts, faces, vertex_colors=vcol)
            mesh.metadata["att3d"] = {**meta, "empty": False}
        meshes.append(mesh)
    return meshes


def _uint8(colours: torch.Tensor) -> np.ndarray:
    return (colours.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
