"""Meshes: iso-surface extraction, cleanup, a differentiable rasterizer, UV texturing and export.

All in torch (CPU and GPU), with maintained libraries where they are faster on a CPU: scikit-image's
marching cubes, fast-simplification's decimation, numba for the rasterizer's visibility pass
(:mod:`att3d.mesh.raster_cpu`), xatlas for an optional UV atlas and trimesh for file formats.
:mod:`att3d.mesh.extract` turns a field's conditioning into textured meshes (the extraction threshold, the
coarse-to-fine density grid of :mod:`att3d.mesh.density`, surface colour, UV atlas of :mod:`att3d.mesh.atlas`).
"""

from att3d.mesh.atlas import box_atlas
from att3d.mesh.cleanup import (
    clean_mesh,
    connected_components,
    face_areas,
    face_normals,
    laplacian_smooth,
    remove_small_components,
    remove_unreferenced,
    taubin_smooth,
    vertex_normals,
    weld_vertices,
)
from att3d.mesh.density import fill_interior, surface_density_grid
from att3d.mesh.export import export_mesh, to_trimesh
from att3d.mesh.extract import (
    DEFAULT_THRESHOLD,
    GenerationError,
    density_grid,
    empty_mesh,
    extraction_threshold,
    is_empty,
    meshes_from_conditioning,
    surface_colour_fn,
    uv_atlas,
)
from att3d.mesh.marching_cubes import grid_points, marching_cubes, marching_cubes_lewiner
from att3d.mesh.marching_tets import marching_tetrahedra, tet_grid
from att3d.mesh.rasterize import (
    RasterOutput,
    antialias,
    interpolate,
    rasterize,
    rasterize_screen,
    render_mesh,
    texture_sample,
)
from att3d.mesh.texture import bake_texture, dilate, texture_mesh, uv_unwrap, vertex_colours

__all__ = [
    "DEFAULT_THRESHOLD",
    "GenerationError",
    "RasterOutput",
    "antialias",
    "bake_texture",
    "box_atlas",
    "clean_mesh",
    "connected_components",
    "density_grid",
    "dilate",
    "empty_mesh",
    "export_mesh",
    "extraction_threshold",
    "face_areas",
    "face_normals",
    "fill_interior",
    "grid_points",
    "interpolate",
    "is_empty",
    "laplacian_smooth",
    "marching_cubes",
    "marching_cubes_lewiner",
    "marching_tetrahedra",
    "meshes_from_conditioning",
    "rasterize",
    "rasterize_screen",
    "remove_small_components",
    "remove_unreferenced",
    "render_mesh",
    "surface_colour_fn",
    "surface_density_grid",
    "taubin_smooth",
    "tet_grid",
    "texture_mesh",
    "texture_sample",
    "to_trimesh",
    "uv_atlas",
    "uv_unwrap",
    "vertex_colours",
    "vertex_normals",
    "weld_vertices",
]
