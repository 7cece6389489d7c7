"""Field -> mesh: the extraction threshold, the density grid, iso-surface, cleanup, UV atlas and texture.

Per batch of B prompts' field conditioning (no per-prompt optimisation)::

    field    density on a grid              -> (B, R, R, R) over the field's box [-bound, bound]^3, computed
             at full resolution only near the surface (:func:`att3d.mesh.density.surface_density_grid`)
    extraction  solid fill, trimmed to the visual hull of the field's own silhouettes
             (:mod:`att3d.mesh.visibility`), marching cubes at the extraction threshold (density above it is
             inside; scikit-image's Lewiner table), drop floaters, Taubin smoothing, the face budget
    texture  UV atlas (box projection, :mod:`att3d.mesh.atlas`; or xatlas) + texture baked from
             the field's colour, plus per-vertex colours
    export   trimesh

The per-prompt stages (extraction, texture, export) of a batch run in two threads.

Colour is read slightly *inside* the surface: at the iso-surface the density equals the
extraction threshold, a thin, barely opaque shell whose colour the training signal hardly
constrains (volume rendering sees a pixel's colour where the accumulated weight is large, i.e.
just below that shell). Every colour query point is therefore moved ``colour_offset`` (default:
one grid cell) along the inward normal: the extracted surface's own vertex normal (interpolated over
each face), or with ``colour_normals="field"`` the normalised gradient of the density (autograd at every
texel, about twice the bake's time for the same colours within a few thousandths).

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

from att3d.mesh.density import batch_of, density_grid, dilate_cube, fill_interior, surface_density_grid
from att3d.mesh.visibility import OPACITY_DEPTH, line_optical_depth
from att3d.utils.errors import Att3dError
from att3d.utils.timing import StageTimer, maybe_timed

#: Density above which a point is inside: occupancy, meshes and volume IoU (``configs/train.yaml``'s
#: ``extraction.threshold`` writes the same value into every trained model's config).
DEFAULT_THRESHOLD = 5.0
#: UV atlas methods.
UV_METHODS = ("box", "xatlas")
#: Surface extraction heads: ``nerf`` (the density's iso-surface, coloured one grid cell inside) or ``mesh`` (the
#: mesh stage's surface: the level set its DMTet trained, coloured where the stage read its colour), both extracted
#: on the generation grid by ``iso_method``.
HEADS = ("auto", "nerf", "mesh")
#: The default face budget of generated meshes (0: no limit).
DEFAULT_MAX_FACES = 20_000


class GenerationError(Att3dError):
    """Generation cannot run as asked (bad option, no prompt, missing model)."""


def extraction_threshold(model: Any) -> float:
    """The density threshold of extraction: ``model.config["extraction"]["threshold"]`` or :data:`DEFAULT_THRESHOLD`."""
    config = getattr(model, "config", None) or {}
    return float((config.get("extraction") or {}).get("threshold", DEFAULT_THRESHOLD))


def rendered_radius(model: Any, bound: float) -> float | None:
    """The radius of the ball that the model's renders sample (``model.renderer.region_radius``), or None (no such
    ball: the whole box). Extraction treats the field as empty outside it: no render ever showed that density, so
    score distillation never shaped it (a triplane's planes are free there, and leave floaters in the box's
    corners)."""
    region_radius = getattr(getattr(model, "renderer", None), "region_radius", None)
    return region_radius(bound) if callable(region_radius) else None


def mesh_head(model: Any, head: str = "auto") -> str:
    """Which surface a model's meshes come from: ``"nerf"`` or ``"mesh"``.

    ``auto`` is ``mesh`` for a model trained by the mesh stage (which records its settings in
    ``config["extra"]["mesh"]``) and ``nerf`` otherwise.
    """
    if head not in HEADS:
        raise GenerationError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    extra = (getattr(model, "config", None) or {}).get("extra") or {}
    if head == "auto":
        return "mesh" if isinstance(extra.get("mesh"), dict) else "nerf"
    return head


def colour_shading(model: Any) -> str:
    """What a model's colour field holds: ``"none"`` (radiance: draw it as it is) or ``"lambert"`` (an albedo,
    from a mesh stage trained with ``stage.shading=lambert``: light it with the world's light to view it)."""
    settings = ((getattr(model, "config", None) or {}).get("extra") or {}).get("mesh")
    return str(settings.get("shading", "none")) if isinstance(settings, dict) else "none"


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
                             head: str = "auto", max_faces: int = DEFAULT_MAX_FACES, tet_resolution: int | None = None,
                             solid: bool = True, close_radius: float = 0.1, coarse_step: int = 4,
                             iso_method: str = "lewiner", colour_normals: str = "mesh", surface: str = "opacity",
                             workers: int | None = None,
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
        head: the surface (:func:`mesh_head`): ``nerf``, the density's iso-surface at ``grid_resolution``, coloured
            one grid cell inside; ``mesh``, the mesh stage's surface: the same level set that the stage's DMTet
            trained (on its own tet grid), sampled at ``grid_resolution`` (or ``tet_resolution``) and coloured
            where the stage read its colour (its ``colour_offset``); both extracted by ``iso_method``, cleaned
            and smoothed alike; ``auto`` by the model.
        max_faces: the face budget (quadric decimation, :func:`att3d.mesh.decimate.decimate`, before the UV
            atlas so that the texture is baked on the final mesh); 0: no limit.
        tet_resolution: the DMTet grid of ``head="mesh"`` if it should differ from ``grid_resolution`` (e.g. the
            stage's own training grid, ``model.config["extra"]["mesh"]["tet_resolution"]``); None: ``grid_resolution``.
        solid: fill the object's hidden cavities before extraction (:func:`fill_interior`), so that the mesh is
            one solid without inner shells; False: extract the raw level set.
        close_radius: the radius of the fill's closing in world units (tunnels and cracks up to about twice as
            wide are shut; 0: enclosed cavities only), rounded to whole grid cells.
        coarse_step: the field is evaluated at full resolution only near the surface
            (:func:`att3d.mesh.density.surface_density_grid`: every ``coarse_step``-th sample first); 1: everywhere.
        iso_method: the iso-surface algorithm (:data:`att3d.mesh.marching_cubes.METHODS`): ``lewiner``
            (scikit-image's marching cubes: a third of the triangles, so the face budget rarely needs decimation)
            or ``tets`` (the torch marching tetrahedra of the Kuhn-split grid cubes, the mesh stage's own
            extraction). Both place their vertices on the same linearly interpolated level set.
        surface: which surface is extracted (:data:`SURFACES`): ``opacity`` (default), the density's solid
            trimmed to the visual hull of the field's own silhouettes along 49 lines
            (:func:`att3d.mesh.visibility.line_optical_depth`: where every line through a point is at least half
            opaque), so that the mesh covers what the volume renders show and not the soft fringe of density
            outside them; ``density``, the density's solid alone (the iso-surface at the threshold).
        colour_normals: the inward direction along which colour is read ``colour_offset`` inside: ``mesh`` (the
            extracted surface's vertex normals, interpolated over faces) or ``field`` (the density's gradient by
            autograd at every texel: slower, :func:`surface_colour_fn`).
        workers: prompts meshed at once in threads (extraction, atlas and bake of different prompts overlap;
            torch, scipy and the decimation release the GIL); None: 1 for one prompt, else 2.
        timer: stages ``field``, ``extraction``, ``texture``, ``export`` are added to it (with ``workers > 1`` the
            per-prompt stages are charged their wall time, which overlaps).
        progress: progress bars.

    The field counts as empty outside the ball that the model's renders sample (:func:`rendered_radius`; the
    default renderer's unit ball), where nothing trained it.

    Returns:
        B ``trimesh.Trimesh`` in the field's frame: ``TextureVisuals`` (PBR material with the baked
        texture; the per-vertex colours are kept in ``mesh.vertex_attributes["color"]``, (V, 4)
        RGBA uint8, which GLB stores as the application attribute ``_color``: a glTF ``COLOR_0``
        would multiply the texture in viewers) or, with ``texture_size=0``, ``ColorVisuals``.
        Vertex normals are the welded surface's (area-weighted), kept across UV seams.
        ``mesh.metadata["att3d"]`` holds ``threshold``, ``grid_resolution``, ``head``, ``shading``
        (:func:`colour_shading`: whether the texture is radiance or albedo), ``faces_before``
        (before the face budget), ``empty`` (and ``reason`` when empty).
    """
    from att3d.mesh.marching_cubes import METHODS

    if grid_resolution < 4:
        raise GenerationError(f"grid resolution must be >= 4, got {grid_resolution}")
    if texture_size < 0:
        raise GenerationError(f"texture size must be >= 0, got {texture_size}")
    if uv_method not in UV_METHODS:
        raise GenerationError(f"unknown uv method {uv_method!r}; choose one of {', '.join(UV_METHODS)}")
    if not isinstance(max_faces, int) or isinstance(max_faces, bool) or max_faces < 0:
        raise GenerationError(f"the face budget must be an integer >= 0 (0: no limit), got {max_faces!r}")
    if not isinstance(coarse_step, int) or isinstance(coarse_step, bool) or coarse_step < 1:
        raise GenerationError(f"coarse step must be an integer >= 1, got {coarse_step!r}")
    if iso_method not in METHODS:
        raise GenerationError(f"unknown iso-surface method {iso_method!r}; choose one of {', '.join(METHODS)}")
    if surface not in SURFACES:
        raise GenerationError(f"unknown surface {surface!r}; choose one of {', '.join(SURFACES)}")
    if colour_normals not in COLOUR_NORMALS:
        raise GenerationError(f"unknown colour normals {colour_normals!r}; choose one of {', '.join(COLOUR_NORMALS)}")
    head = mesh_head(model, head)
    if head == "mesh" and tet_resolution is not None:
        if int(tet_resolution) < 4:
            raise GenerationError(f"tet resolution must be >= 4, got {tet_resolution}")
        grid_resolution = int(tet_resolution)
    field = model.field
    thr = extraction_threshold(model) if threshold is None else float(threshold)
    bound = float(getattr(field, "bound", 1.0))
    R = int(grid_resolution)
    if colour_offset is None and head == "mesh":  # where the mesh stage read its colour (one 128^3 cell inside)
        stage_offset = (((getattr(model, "config", None) or {}).get("extra") or {}).get("mesh") or {}).get(
            "colour_offset")
        colour_offset = 2.0 * bound / 127 if stage_offset is None else float(stage_offset)
    offset = 2.0 * bound / (R - 1) if colour_offset is None else float(colour_offset)
    radius = rendered_radius(model, bound)
    B, _ = batch_of(cond)

    density = None
    if coarse_step == 1:  # the dense grid, batched
        with maybe_timed(timer, "field"):
            density = _close_box(density_grid(field, cond, R, bound, progress=progress, radius=radius))
    job = _MeshJob(field=field, head=head, threshold=thr, bound=bound, R=R, shading=colour_shading(model),
                   surface=surface, solid=solid, close_voxels=int(round(close_radius * (R - 1) / (2.0 * bound))),
                   min_component_fraction=min_component_fraction, smooth_iterations=smooth_iterations,
                   max_faces=max_faces, iso_method=iso_method, texture_size=texture_size,
                   texture_padding=texture_padding, uv_method=uv_method, offset=offset,
                   colour_normals=colour_normals, timer=timer)
    conds = [{k: v[b:b + 1] for k, v in cond.items()} for b in range(B)]

    def one(b: int) -> trimesh.Trimesh:
        if density is not None:
            return job(density[b], conds[b])
        with maybe_timed(timer, "field"):  # near the surface only, per prompt (in the prompt's thread)
            vol = _close_box(surface_density_grid(field, conds[b], R, thr, bound, step=coarse_step,
                                                  radius=radius)[0])[0]
        return job(vol, conds[b])

    n_workers = (1 if B == 1 else 2) if workers is None else max(1, int(workers))
    return _map_progress(one, range(B), min(n_workers, B), desc="meshes", progress=progress and B > 1)


def _close_box(density: torch.Tensor) -> torch.Tensor:
    """(B, R, R, R) with nothing inside on the box's faces, so that every level set closes (the field is empty
    outside the box). In place; returned."""
    density[:, [0, -1]] = 0.0
    density[:, :, [0, -1]] = 0.0
    density[:, :, :, [0, -1]] = 0.0
    return density


#: Surfaces (:func:`meshes_from_conditioning`'s ``surface``): the density's solid trimmed to what the volume
#: renders show (:mod:`att3d.mesh.visibility`; the default), or the density's solid alone.
SURFACES = ("opacity", "density")
#: Directions of the colour offset (:func:`meshes_from_conditioning`'s ``colour_normals``).
COLOUR_NORMALS = ("mesh", "field")


def _map_progress(fn: Callable[[int], Any], items: range, workers: int, desc: str, progress: bool) -> list[Any]:
    """``[fn(i) for i in items]``, in ``workers`` threads (results in order), with a progress bar."""
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc=desc, disable=not progress, leave=False)
    try:
        if workers <= 1:
            out = []
            for i in items:
                out.append(fn(i))
                bar.update()
            return out
        from concurrent.futures import ThreadPoolExecutor

        # one torch thread per worker: the prompts run side by side instead of each op being split in two
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // workers))
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(fn, i) for i in items]
                out = []
                for fut in futures:
                    out.append(fut.result())
                    bar.update()
                return out
        finally:
            torch.set_num_threads(threads)
    finally:
        bar.close()


class _MeshJob:
    """One prompt's density grid -> textured mesh (the per-prompt part of :func:`meshes_from_conditioning`)."""

    def __init__(self, **settings: Any):
        self.__dict__.update(settings)

    def __call__(self, vol: torch.Tensor, cond_b: dict[str, torch.Tensor]) -> trimesh.Trimesh:
        from att3d.mesh.cleanup import clean_mesh, vertex_normals
        from att3d.mesh.decimate import decimate
        from att3d.mesh.export import to_trimesh
        from att3d.mesh.marching_cubes import marching_cubes, marching_cubes_lewiner
        from att3d.mesh.texture import bake_texture

        thr, timer = self.threshold, self.timer
        meta: dict[str, Any] = {"threshold": thr, "grid_resolution": self.R, "head": self.head,
                                "shading": self.shading, "surface": self.surface}
        with maybe_timed(timer, "extraction"):
            peak = float(vol.max())
            level, vol_in = thr, vol
            if self.solid and peak > thr:
                vol = fill_interior(vol, thr, close_voxels=self.close_voxels)
            if self.surface == "opacity" and peak > thr:
                # inside: above the threshold and inside every silhouette, both scaled to 1 at their level. Marching
                # cubes reads the hull only at the corners of cubes with a corner inside, i.e. at or next to the
                # solid (a 3^3 neighbourhood); every other cube has all its corners below 1 whatever the hull, so
                # the hull's 0 there (not computed) gives the same surface.
                near = dilate_cube(vol >= thr)
                hull = line_optical_depth(vol_in, 2.0 * self.bound / (self.R - 1), where=near) / OPACITY_DEPTH
                vol = torch.minimum(vol / thr, hull)
                level = 1.0
            found = float(vol.max()) > level
            verts = faces = None
            if found:
                # Both heads extract the same level set (the mesh stage trains the density's, on a tet grid);
                # ``tets`` is the stage's own marching tetrahedra (Kuhn split of the grid cubes), ``lewiner`` the
                # same surface in about a third of the triangles.
                iso = marching_cubes_lewiner if self.iso_method == "lewiner" else marching_cubes
                verts, faces = iso(vol, level, self.bound, inside="above")
                verts, faces = clean_mesh(verts, faces, self.min_component_fraction,
                                          smooth_iterations=self.smooth_iterations,
                                          weld_tolerance=None if self.iso_method == "lewiner" else 1e-6)
            if faces is not None and faces.shape[0]:
                meta["faces_before"] = int(faces.shape[0])
                if self.max_faces and faces.shape[0] > self.max_faces:
                    verts, faces = decimate(verts, faces, self.max_faces)
        if verts is None or faces is None or faces.shape[0] == 0:
            if self.surface == "opacity" and peak > thr:
                reason = ("no surface: the field's renders are nowhere half opaque along every line "
                          f"(max density {peak:.3g}); try --surface density")
            else:
                reason = (f"no surface: the density never exceeds the extraction threshold {thr:g} "
                          f"(max {peak:.3g}); try a lower --threshold")
            return empty_mesh(reason, **meta)
        with maybe_timed(timer, "texture"):
            normals = vertex_normals(verts, faces)
            if self.colour_normals == "mesh":  # read inside along the surface's own inward normal
                colour = surface_colour_fn(self.field, cond_b, 0.0)
                probe = verts - self.offset * normals
            else:
                colour = surface_colour_fn(self.field, cond_b, self.offset)
                probe = verts
            if self.texture_size > 0:
                vmap, faces, uvs = uv_atlas(verts, faces, self.texture_size, self.texture_padding, self.uv_method)
                verts, normals, probe = verts[vmap], normals[vmap], probe[vmap]
                texture = bake_texture(probe.detach(), faces, uvs, colour, size=self.texture_size,
                                       padding=self.texture_padding)
            else:
                uvs = texture = None
            vcol = colour(probe)
        with maybe_timed(timer, "export"):
            if texture is not None:
                mesh = to_trimesh(verts, faces, uvs=uvs, texture=texture)
                rgba = np.concatenate([_uint8(vcol), np.full((vcol.shape[0], 1), 255, np.uint8)], axis=1)
                mesh.vertex_attributes["color"] = rgba
            else:
                mesh = to_trimesh(verts, faces, vertex_colors=vcol)
            mesh.vertex_normals = normals.detach().cpu().numpy().astype(np.float64)
            mesh.metadata["att3d"] = {**meta, "empty": False}
        return mesh


def _uint8(colours: torch.Tensor) -> np.ndarray:
    return (colours.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
