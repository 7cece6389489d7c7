"""Differentiable surfaces of a density field: DMTet extraction and surface rendering (LATTE3D's mesh stage).

A point is inside when the field's density exceeds the extraction threshold, so the tetrahedral grid's
signed function is the *linear* form ``sdf = threshold - density`` (negative inside): marching tetrahedra
then puts a surface vertex where the linearly interpolated density equals the threshold, exactly as
generation's marching cubes (:func:`att3d.mesh.extract.meshes_from_conditioning`) does, so the surface that
the mesh stage trains is the surface that generation exports. Grid vertices on the faces of the field's box
are outside, so every surface closes.

    field + cond --grid_sdf--> (B, R^3) sdf --surface_from_sdf / differentiable_surface--> SurfaceMesh
    SurfaceMesh + cameras --render_surfaces--> rgb (B, H, W, 3), coloured by the field's colour

Geometry moves through the interior of the rendered surface (the colour lookup position and the barycentrics)
and, with ``antialias`` (the default), through its silhouettes: :func:`att3d.mesh.rasterize.antialias` blends
the pixels on either side of every occlusion edge by where the edge crosses between them, so the image's
gradient moves the edge's vertices, hence the density at the tet grid's vertices that place them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from att3d.mesh.cleanup import vertex_normals
from att3d.mesh.density import density_grid, evaluate_at, surface_density_grid
from att3d.mesh.marching_tets import march_tets, marching_tetrahedra, tet_orientation
from att3d.mesh.rasterize import RasterOutput, interpolate, project_vertices, rasterize_screen
from att3d.mesh.rasterize import antialias as antialias_edges
from att3d.render.cameras import OrbitCameras
from att3d.render.shading import lambert

#: How :func:`render_surfaces` colours a pixel: the field's radiance, or its albedo lit by the world's light.
SHADINGS = ("none", "lambert")

__all__ = ["SHADINGS", "SurfaceMesh", "boundary_index", "density_to_sdf", "differentiable_surface", "grid_sdf",
           "render_surfaces", "surface_from_sdf"]


@dataclass
class SurfaceMesh:
    """One prompt's surface.

    Attributes:
        verts: (V, 3) positions (differentiable w.r.t. the density in geometry mode).
        faces: (F, 3) long, outward oriented.
        normals: (V, 3) unit outward vertex normals (no gradient).
    """

    verts: torch.Tensor
    faces: torch.Tensor
    normals: torch.Tensor

    @property
    def empty(self) -> bool:
        return self.faces.shape[0] == 0


# ---------------------------------------------------------------------------------------------------------------
# Density -> SDF -> mesh
# ---------------------------------------------------------------------------------------------------------------

def density_to_sdf(density: torch.Tensor, threshold: float) -> torch.Tensor:
    """The DMTet signed function of a density: ``threshold - density`` (negative inside; see the module docstring).

    Args:
        density: (...) >= 0.

    Returns:
        (...) same shape.
    """
    return threshold - density


@torch.no_grad()
def grid_sdf(field: torch.nn.Module, cond: dict[str, torch.Tensor], resolution: int, threshold: float,
             bound: float = 1.0, coarse_step: int = 1) -> torch.Tensor:
    """The signed function on the vertices of ``tet_grid(resolution, bound)`` for B prompts (no gradient).

    Args:
        field: ``field.density(points (B, N, 3), cond) -> (B, N)``.
        cond: conditioning of B prompts.
        resolution: R.
        threshold: the extraction threshold.
        coarse_step: 1: the field at every vertex (:func:`~att3d.mesh.density.density_grid`); > 1: coarse to fine
            (:func:`~att3d.mesh.density.surface_density_grid`), exact at the corners of every grid cube that the
            returned function's level set crosses (also next to the box's faces, which are forced outside), which
            is all that marching tetrahedra reads; elsewhere interpolated, on the right side of the threshold.

    Returns:
        (B, R^3) ``threshold - density``, with the box's boundary vertices set to ``threshold`` (outside).
    """
    B = next(iter(cond.values())).shape[0]
    if coarse_step > 1:
        grid, evaluated = surface_density_grid(field, cond, resolution, threshold, bound, step=coarse_step)
        # The box's vertices are forced outside below, so an inside sample next to them is a corner of a crossed
        # cube even where the field's own level set is not: evaluate those exactly too (an object touching the box)
        R = resolution
        next_to_box = torch.zeros(R, R, R, dtype=torch.bool, device=grid.device)
        next_to_box[1:-1, 1:-1, 1:-1] = True  # inside the box's faces ...
        next_to_box[2:-2, 2:-2, 2:-2] = False  # ... and not further in than the first layer
        where = next_to_box & (grid > threshold) & ~evaluated
        if where.any():
            lin = torch.linspace(-bound, bound, R, device=grid.device)
            for b, vals in enumerate(evaluate_at(field, cond, lin, where, chunk=1 << 18)):
                if vals is not None:
                    grid[b][where[b]] = vals
        density = grid.reshape(B, -1)
    else:
        density = density_grid(field, cond, resolution, bound).reshape(B, -1)
    density[:, boundary_index(resolution, density.device)] = 0.0
    return density_to_sdf(density, threshold)


def boundary_index(resolution: int, device: torch.device) -> torch.Tensor:
    """(K,) long indices of the vertices of ``tet_grid(resolution)`` on the box's faces."""
    i = torch.arange(resolution, device=device)
    ii, jj, kk = torch.meshgrid(i, i, i, indexing="ij")
    on = (ii == 0) | (ii == resolution - 1) | (jj == 0) | (jj == resolution - 1) | (kk == 0) | (kk == resolution - 1)
    return on.reshape(-1).nonzero().squeeze(1)


def surface_from_sdf(tet_verts: torch.Tensor, tets: torch.Tensor, sdf: torch.Tensor) -> SurfaceMesh:
    """Marching tetrahedra of one prompt's signed function, with vertex normals.

    Args:
        tet_verts: (V, 3); tets: (T, 4); sdf: (V,) (differentiable).

    Returns:
        :class:`SurfaceMesh`; its vertices carry the gradient of ``sdf``.
    """
    verts, faces = marching_tetrahedra(tet_verts, tets, sdf)
    normals = vertex_normals(verts.detach(), faces) if faces.shape[0] else torch.zeros_like(verts)
    return SurfaceMesh(verts, faces, normals)


def differentiable_surface(field: torch.nn.Module, cond: dict[str, torch.Tensor], tet_verts: torch.Tensor,
                           tets: torch.Tensor, sdf: torch.Tensor, threshold: float,
                           boundary: torch.Tensor) -> SurfaceMesh:
    """One prompt's surface whose vertices are differentiable w.r.t. the field and its conditioning.

    The topology (which tetrahedra and edges are crossed) is the one of ``sdf``, found once here; the density
    is re-evaluated with gradients only at the vertices of those crossed tetrahedra (the only ones that
    position surface vertices), which then place the surface vertices on their edges. Since the topology
    carries no gradient, taking it from ``sdf`` rather than from the re-evaluated density changes nothing but
    rounding: the faces are exactly ``surface_from_sdf(tet_verts, tets, sdf)``'s.

    Args:
        field: the field; cond: conditioning of ONE prompt ``{name: (1, ...)}`` (with gradients).
        tet_verts: (V, 3); tets: (T, 4) (all of the grid's, or a subset holding the crossed ones).
        sdf: (V,) the prompt's signed function without gradient (from :func:`grid_sdf`).
        threshold: the extraction threshold.
        boundary: (V,) bool box-face vertices (kept outside).

    Returns:
        :class:`SurfaceMesh` with vertices differentiable w.r.t. ``field`` parameters and ``cond``.
    """
    with torch.no_grad():
        inside = sdf < 0
        occ = inside[tets]
        band = tets[occ.any(-1) & ~occ.all(-1)]  # the crossed tetrahedra, the only ones that make faces
        idx = torch.unique(band)
        idx = idx[~boundary[idx]]
        flip = tet_orientation(tet_verts, band) < 0
    if idx.numel() == 0:
        return surface_from_sdf(tet_verts, tets, sdf)
    density = field.density(tet_verts[idx][None], cond)[0]
    live = sdf.detach().index_put((idx,), density_to_sdf(density, threshold).to(sdf.dtype))
    verts, faces = march_tets(band, live, inside, tet_verts, threshold=0.0, flip=flip)
    normals = vertex_normals(verts.detach(), faces) if faces.shape[0] else torch.zeros_like(verts)
    return SurfaceMesh(verts, faces, normals)


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------

def render_surfaces(field: torch.nn.Module, cond: dict[str, torch.Tensor], meshes: list[SurfaceMesh],
                    cameras: OrbitCameras, resolution: int,
                    background: tuple[float, float, float] | torch.Tensor = (1.0, 1.0, 1.0),
                    colour_offset: float = 0.0, shading: str = "none", antialias: bool = True,
                    aliased_share: float = 0.0
                    ) -> dict[str, torch.Tensor]:
    """Render B prompts' meshes, each from its own camera, coloured by the (amortized) colour field.

    Each pixel's colour is ``field(p - colour_offset * n, cond_b)``'s rgb at the visible surface point
    ``p`` (interpolated with the rasterizer's perspective-correct barycentrics) and its interpolated unit
    normal ``n``. All visible points of the batch go through the field in one call. With
    ``shading="none"`` that rgb is the pixel (the field holds radiance, lighting included); with
    ``shading="lambert"`` it is an albedo lit by the world's light (:func:`att3d.render.shading.lambert`)
    with the mesh's *differentiable* area-weighted vertex normals, so that the image's shading carries a
    gradient to the vertex positions (the geometry), as in Magic3D's and LATTE3D's shaded mesh stages.

    Args:
        field: ``field(points (B, N, 3), cond) -> (density (B, N), rgb (B, N, 3))``.
        cond: conditioning of the B prompts.
        meshes: B surfaces (empty ones render as background).
        cameras: B cameras.
        resolution: H = W.
        background: (3,) or (B, 3) colour behind the meshes.
        colour_offset: distance inside the surface at which the colour is read.
        shading: ``"none"`` or ``"lambert"`` (see above).
        antialias: antialias the occlusion edges (:func:`att3d.mesh.rasterize.antialias`): the image then has
            silhouette gradients w.r.t. the mesh vertices; False: the hard, aliased coverage (no such gradient).
        aliased_share: with ``antialias``, the share of the aliased render (each pixel the surface at its centre, or
            the background: what the shapes world's renderer, and so its prior's training images, show) in the
            image's values; the gradient stays the antialiased image's (straight through:
            ``blended + share (aliased - blended).detach()``). 0: the antialiased image; 1: the aliased values.

    Returns:
        ``rgb`` (B, H, W, 3) differentiable w.r.t. the field, ``cond`` and the mesh vertices;
        ``mask`` (B, H, W) float foreground; ``points`` (B,) long visible surface points per image.
    """
    B = len(meshes)
    if len(cameras) != B:
        raise ValueError(f"{len(cameras)} cameras for {B} meshes")
    if shading not in SHADINGS:
        raise ValueError(f"shading must be one of {', '.join(SHADINGS)}, got {shading!r}")
    if not 0.0 <= aliased_share <= 1.0:
        raise ValueError(f"aliased_share must be in [0, 1], got {aliased_share}")
    some = next(iter(cond.values()))
    device, dtype = some.device, torch.float32
    H = W = int(resolution)
    rows_b, rows_r, rows_c, points, lit = [], [], [], [], []
    edges: list[tuple[int, RasterOutput, torch.Tensor, torch.Tensor]] = []  # (b, rast, xy, faces) to antialias
    for b, mesh in enumerate(meshes):
        if mesh.empty:
            points.append(torch.zeros(0, 3, device=device, dtype=dtype))
            continue
        xy, zv = project_vertices(mesh.verts, cameras.index([b]), H)
        rast = rasterize_screen(xy, zv, mesh.faces, H)
        if antialias:
            edges.append((b, rast, xy, mesh.faces))
        fg = rast.mask[0]
        r, c = fg.nonzero(as_tuple=True)
        p = interpolate(mesh.verts, rast, mesh.faces)[0][r, c]  # (P, 3)
        if colour_offset > 0 and r.numel():
            n = F.normalize(interpolate(mesh.normals, rast, mesh.faces)[0][r, c].detach(), dim=-1)
            p = p - colour_offset * n
        if shading == "lambert":
            n_diff = vertex_normals(mesh.verts, mesh.faces)  # (V, 3), differentiable in the vertices
            n_pix = F.normalize(interpolate(n_diff, rast, mesh.faces)[0][r, c], dim=-1)
            lit.append(lambert(torch.ones_like(n_pix), n_pix).to(dtype))  # (P, 3) the light's factor
        points.append(p.to(dtype))
        rows_b.append(torch.full_like(r, b))
        rows_r.append(r)
        rows_c.append(c)
    counts = torch.tensor([p.shape[0] for p in points])
    bg = torch.as_tensor(background, dtype=dtype, device=device).reshape(-1, 3).expand(B, 3)
    image = bg[:, None, None, :].expand(B, H, W, 3)
    mask = torch.zeros(B, H, W, dtype=torch.bool, device=device)
    n_max = int(counts.max()) if B else 0
    if n_max > 0:
        padded = torch.stack([F.pad(p, (0, 0, 0, n_max - p.shape[0])) for p in points])  # (B, n_max, 3)
        _, rgb = field(padded, cond)
        keep = torch.arange(n_max)[None, :] < counts[:, None]  # (B, n_max)
        colours = rgb[keep.to(device)].to(dtype)  # (P_total, 3), in (b, pixel) order
        if shading == "lambert":
            colours = colours * torch.cat(lit)
        bi, ri, ci = torch.cat(rows_b), torch.cat(rows_r), torch.cat(rows_c)
        mask[bi, ri, ci] = True
        surface = torch.zeros(B, H, W, 3, dtype=dtype, device=device).index_put((bi, ri, ci), colours)
        image = torch.where(mask[..., None], surface, image)
    if edges:
        rows = list(image.unbind(0))
        for b, rast, xy, faces in edges:
            rows[b] = antialias_edges(rows[b][None], rast.face_id, xy.to(dtype), rast.depth, faces)[0]
        blended = torch.stack(rows)
        image = blended + aliased_share * (image - blended).detach() if aliased_share else blended
    return {"rgb": image, "mask": mask.to(dtype), "points": counts}
