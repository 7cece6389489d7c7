"""Meshes: iso-surface extraction, cleanup, a differentiable rasterizer, UV texturing and export.

All in torch (CPU and GPU); xatlas for the UV atlas and trimesh for file formats.
"""

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
from att3d.mesh.export import export_mesh, to_trimesh
from att3d.mesh.marching_cubes import grid_points, marching_cubes
from att3d.mesh.marching_tets import marching_tetrahedra, tet_grid
from att3d.mesh.rasterize import (
    RasterOutput,
    interpolate,
    rasterize,
    rasterize_screen,
    render_mesh,
    texture_sample,
)
from att3d.mesh.texture import bake_texture, dilate, texture_mesh, uv_unwrap, vertex_colours

__all__ = [
    "RasterOutput",
    "bake_texture",
    "clean_mesh",
    "connected_components",
    "dilate",
    "export_mesh",
    "face_areas",
    "face_normals",
    "grid_points",
    "interpolate",
    "laplacian_smooth",
    "marching_cubes",
    "marching_tetrahedra",
    "rasterize",
    "rasterize_screen",
    "remove_small_components",
    "remove_unreferenced",
    "render_mesh",
    "taubin_smooth",
    "tet_grid",
    "texture_mesh",
    "texture_sample",
    "to_trimesh",
    "uv_unwrap",
    "vertex_colours",
    "vertex_normals",
    "weld_vertices",
]
