"""UV atlas (xatlas) and texture baking in torch.

UV convention (shared with :func:`att3d.mesh.rasterize.texture_sample` and trimesh/OBJ):
``(0, 0)`` is the bottom-left of the texture image and ``v`` points up, so texel
``(row, col)`` of a ``size x size`` texture has its centre at
``u = (col + 0.5) / size``, ``v = 1 - (row + 0.5) / size``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from att3d.mesh.rasterize import rasterize_screen

ColourFn = Callable[[torch.Tensor], torch.Tensor]


def _numpy(a: torch.Tensor | np.ndarray) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def uv_unwrap(verts: torch.Tensor | np.ndarray, faces: torch.Tensor | np.ndarray, resolution: int = 512,
              padding: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut a mesh into charts and pack them into a UV atlas with xatlas.

    Vertices on chart seams are split, so the output has V' >= V vertices.

    Args:
        verts: (V, 3) positions; faces: (F, 3) indices (torch or numpy).
        resolution: the texture size the atlas is packed for.
        padding: texels of empty space between charts.

    Returns:
        vmapping: (V',) int64 index of the input vertex of every output vertex
            (``new_verts = verts[vmapping]``); new_faces: (F, 3) int64 into the output vertices
            (same face order); uvs: (V', 2) float32 in [0, 1], v up.
    """
    import xatlas

    v = np.ascontiguousarray(_numpy(verts), dtype=np.float32)
    f = np.ascontiguousarray(_numpy(faces), dtype=np.uint32)
    atlas = xatlas.Atlas()
    atlas.add_mesh(v, f)
    pack = xatlas.PackOptions()
    pack.resolution = int(resolution)
    pack.padding = int(padding)
    pack.bilinear = True
    atlas.generate(xatlas.ChartOptions(), pack)
    vmapping, new_faces, uvs = atlas[0]
    return vmapping.astype(np.int64), new_faces.astype(np.int64), uvs.astype(np.float32)


def _query(colour_fn: ColourFn, points: torch.Tensor, chunk: int) -> torch.Tensor:
    """colour_fn over (N, 3) points in chunks -> (N, C)."""
    if points.shape[0] == 0:
        return colour_fn(points)
    return torch.cat([colour_fn(points[i:i + chunk]) for i in range(0, points.shape[0], chunk)], dim=0)


def vertex_colours(verts: torch.Tensor, colour_fn: ColourFn, chunk: int = 65536) -> torch.Tensor:
    """Per-vertex colours ``colour_fn(verts)``: (V, 3) -> (V, C), evaluated in chunks."""
    return _query(colour_fn, verts, chunk)


def dilate(texture: torch.Tensor, filled: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grow filled texels into the empty space (each step: mean of the filled 8-neighbours).

    Args:
        texture: (H, W, C); filled: (H, W) bool.
        iterations: number of one-texel steps.

    Returns:
        texture: (H, W, C) with the newly filled texels set; filled: (H, W) bool.
    """
    C = texture.shape[-1]
    tex = texture.permute(2, 0, 1)  # (C, H, W)
    m = filled[None].to(texture.dtype)  # (1, H, W)
    for _ in range(iterations):
        sums = _box3(torch.cat([tex * m, m]))  # (C + 1, H, W): 3x3 sums of the filled colours and their count
        total, count = sums[:C], sums[C:]
        grow = (count > 0) & (m == 0)
        if not bool(grow.any()):
            break
        tex = torch.where(grow, total / count.clamp(min=1), tex)
        m = m + grow.to(m.dtype)
    return tex.permute(1, 2, 0), m[0] > 0


def _box3(x: torch.Tensor) -> torch.Tensor:
    """3x3 box sums with zero padding, as shifted adds (separable): (C, H, W) -> (C, H, W)."""
    p = torch.nn.functional.pad(x, (1, 1, 1, 1))
    rows = p[:, :-2] + p[:, 1:-1] + p[:, 2:]  # (C, H, W + 2)
    return rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]


def bake_texture(verts: torch.Tensor, faces: torch.Tensor, uvs: torch.Tensor, colour_fn: ColourFn,
                 size: int = 512, padding: int = 4, background: float = 0.0, chunk: int = 65536,
                 return_mask: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Bake a colour function of 3D position into a texture over a UV atlas.

    The UV triangles are rasterized into texture space (the 2D core of the rasterizer, affine
    barycentrics at texel centres); the 3D point of every covered texel is the barycentric
    interpolation of the face's vertices, ``colour_fn`` is queried there, and the filled region
    is dilated ``padding`` texels into the empty space so that bilinear lookups at chart
    borders do not bleed in the background.

    Args:
        verts: (V, 3) positions; faces: (F, 3) long; uvs: (V, 2) per-vertex uvs in [0, 1]
            (e.g. ``verts[vmapping]``, ``new_faces`` and ``uvs`` from :func:`uv_unwrap`).
        colour_fn: (N, 3) points -> (N, C) colours.
        size: texture height = width.
        padding: dilation in texels.
        background: value of texels neither covered nor reached by the dilation.
        chunk: points per ``colour_fn`` call.
        return_mask: also return the (size, size) bool mask of covered texels (before dilation).

    Returns:
        texture: (size, size, C), row 0 is the top of the image (``v = 1``); optionally the mask.
    """
    device = verts.device
    uvs = torch.as_tensor(uvs, dtype=verts.dtype, device=device)
    faces = torch.as_tensor(faces, dtype=torch.long, device=device)
    xy = torch.stack([uvs[:, 0] * size, (1.0 - uvs[:, 1]) * size], dim=-1)
    rast = rasterize_screen(xy, None, faces, size)
    face_id, bary = rast.face_id[0], rast.bary[0]
    covered = face_id >= 0
    rows, cols = covered.nonzero(as_tuple=True)
    tri = faces[face_id[rows, cols]]  # (N, 3)
    points = (bary[rows, cols][..., None] * verts[tri]).sum(1)  # (N, 3)
    colours = _query(colour_fn, points, chunk)
    texture = torch.full((size, size, colours.shape[-1]), float(background), dtype=colours.dtype, device=device)
    texture = texture.index_put((rows, cols), colours)
    if padding > 0:
        texture, _ = dilate(texture, covered, padding)
    return (texture, covered) if return_mask else texture


def texture_mesh(verts: torch.Tensor, faces: torch.Tensor, colour_fn: ColourFn, size: int = 512,
                 padding: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """UV-unwrap a mesh and bake ``colour_fn`` into a texture (:func:`uv_unwrap` + :func:`bake_texture`).

    Args:
        verts: (V, 3); faces: (F, 3) long.

    Returns:
        verts: (V', 3) seam-split positions; faces: (F, 3) long; uvs: (V', 2); texture: (size, size, C).
    """
    vmapping, new_faces, uvs = uv_unwrap(verts, faces, resolution=size, padding=padding)
    device = verts.device
    new_verts = verts[torch.from_numpy(vmapping).to(device)]
    new_faces_t = torch.from_numpy(new_faces).to(device)
    uvs_t = torch.from_numpy(uvs).to(device=device, dtype=verts.dtype)
    with torch.no_grad():
        texture = bake_texture(new_verts.detach(), new_faces_t, uvs_t, colour_fn, size=size, padding=padding)
    return new_verts, new_faces_t, uvs_t, texture
