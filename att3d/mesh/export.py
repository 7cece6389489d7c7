"""Mesh export: torch tensors -> trimesh -> GLB / OBJ (+ MTL + PNG) / PLY files, written atomically.

Each file format is one exporter function registered in ``att3d.registry.EXPORTERS``
(``exporter(mesh, path) -> list[Path]``, the files written); ``EXPORTERS.names()`` is the one list of formats
(``FORMATS`` here is that list as a tuple). A new format is one more ``@EXPORTERS.register(name)`` function.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import trimesh

from att3d.registry import EXPORTERS
from att3d.utils.checkpoint import atomic_write

ArrayLike = torch.Tensor | np.ndarray


def _numpy(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _to_uint8(colours: ArrayLike) -> np.ndarray:
    """Float colours in [0, 1] (or uint8 already) -> uint8 of the same shape."""
    a = _numpy(colours)
    if a.dtype == np.uint8:
        return a
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


#: zlib level of the PNG textures that GLB and OBJ exports write (Pillow's default is 6). Measured on the shipped
#: model's 256^2 textures: level 1 encodes in about a fifth of the time (5-7 ms instead of 22-30 ms on the 2-core
#: CPU) for a texture about 25% larger (39 KB instead of 31 KB, 1% of a 20k-face GLB).
PNG_COMPRESS_LEVEL = 1


def to_trimesh(verts: ArrayLike, faces: ArrayLike, vertex_colors: ArrayLike | None = None,
               uvs: ArrayLike | None = None, texture: ArrayLike | None = None,
               material: str = "pbr") -> trimesh.Trimesh:
    """Build a trimesh mesh, keeping the vertex order (no merging or reordering).

    Args:
        verts: (V, 3) positions; faces: (F, 3) indices.
        vertex_colors: (V, 3) or (V, 4), float in [0, 1] or uint8.
        uvs: (V, 2) per-vertex uvs in [0, 1] (v up), required with ``texture``.
        texture: (H, W, 3) or (H, W, 4) image, float in [0, 1] or uint8, row 0 at the top.
        material: ``"pbr"`` (glTF metallic-roughness, metallic 0, roughness 1) or ``"simple"``.

    Returns:
        ``trimesh.Trimesh`` with ``ColorVisuals`` (vertex colours) or ``TextureVisuals``.
    """
    from PIL import Image

    v = _numpy(verts).astype(np.float64)
    f = _numpy(faces).astype(np.int64)
    if texture is not None:
        if uvs is None:
            raise ValueError("a texture needs per-vertex uvs")
        uv = _numpy(uvs).astype(np.float64)
        if uv.shape != (v.shape[0], 2):
            raise ValueError(f"uvs must be (V, 2) = ({v.shape[0]}, 2), got {uv.shape}")
        image = Image.fromarray(_to_uint8(texture))
        image.encoderinfo = {"compress_level": PNG_COMPRESS_LEVEL}  # the defaults of image.save() (Pillow 12)
        if material == "pbr":
            mat = trimesh.visual.material.PBRMaterial(baseColorTexture=image, metallicFactor=0.0, roughnessFactor=1.0)
        elif material == "simple":
            mat = _simple_material(image)
        else:
            raise ValueError(f"material must be 'pbr' or 'simple', got {material!r}")
        visual = trimesh.visual.TextureVisuals(uv=uv, material=mat)
        return trimesh.Trimesh(vertices=v, faces=f, visual=visual, process=False)
    mesh = trimesh.Trimesh(vertices=v, faces=f, process=False)
    if vertex_colors is not None:
        vc = _to_uint8(vertex_colors)
        if vc.shape[0] != v.shape[0]:
            raise ValueError(f"vertex_colors must have {v.shape[0]} rows, got {vc.shape[0]}")
        mesh.visual = trimesh.visual.ColorVisuals(mesh=mesh, vertex_colors=vc)
    return mesh


def _simple_material(image) -> trimesh.visual.material.SimpleMaterial:
    """A plain textured material: white diffuse (so the texture is not darkened), no specular."""
    return trimesh.visual.material.SimpleMaterial(image=image, diffuse=[255, 255, 255, 255],
                                                  ambient=[255, 255, 255, 255], specular=[0, 0, 0, 255])


def _atomic_write(path: Path, data: bytes | str) -> None:
    """Write bytes or text atomically (temporary file in the same folder, fsync, rename; mode 0644)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(raw))


@EXPORTERS.register("glb")
def export_glb(mesh: trimesh.Trimesh, path: Path) -> list[Path]:
    """Binary glTF: vertex colours or the texture with its PBR material."""
    _atomic_write(path, mesh.export(file_type="glb"))
    return [path]


@EXPORTERS.register("ply")
def export_ply(mesh: trimesh.Trimesh, path: Path) -> list[Path]:
    """Binary PLY with vertex colours (a texture is sampled at the vertices)."""
    out = mesh
    if isinstance(mesh.visual, trimesh.visual.TextureVisuals):
        out = mesh.copy()
        out.visual = mesh.visual.to_color()
    _atomic_write(path, out.export(file_type="ply", encoding="binary"))
    return [path]


@EXPORTERS.register("obj")
def export_obj(mesh: trimesh.Trimesh, path: Path) -> list[Path]:
    """OBJ with its material library ``<stem>.mtl`` and the texture image(s) ``<stem>.png`` next to it."""
    from trimesh.exchange.obj import export_obj as trimesh_export_obj

    out = mesh
    if isinstance(mesh.visual, trimesh.visual.TextureVisuals):
        image = getattr(mesh.visual.material, "image", None)
        if image is None:
            image = getattr(mesh.visual.material, "baseColorTexture", None)
        if image is not None:  # OBJ materials are "simple": keep the texture, white diffuse
            out = mesh.copy()
            out.visual = trimesh.visual.TextureVisuals(uv=mesh.visual.uv, material=_simple_material(image))
    mtl_name = f"{path.stem}.mtl"
    text, files = trimesh_export_obj(out, include_texture=True, return_texture=True, mtl_name=mtl_name)
    # Name the texture images after the mesh so that several meshes can share a folder.
    renames = {}
    images = [n for n in files if n != mtl_name]
    for i, name in enumerate(images):
        suffix = Path(name).suffix or ".png"
        renames[name] = f"{path.stem}{suffix}" if len(images) == 1 else f"{path.stem}_{i}{suffix}"
    written = []
    for name, data in files.items():
        if name == mtl_name:
            mtl = data.decode("utf-8") if isinstance(data, bytes) else data
            for old, new in renames.items():
                mtl = mtl.replace(f" {old}", f" {new}")
            target, payload = path.parent / mtl_name, mtl
        else:
            target, payload = path.parent / renames[name], data
        _atomic_write(target, payload)
        written.append(target)
    _atomic_write(path, text)
    return [path, *written]


def export_mesh(mesh: trimesh.Trimesh, path: str | os.PathLike, format: str | None = None) -> list[Path]:
    """Write a mesh to disk with the exporter of its format.

    Args:
        mesh: a ``trimesh.Trimesh`` (e.g. from :func:`to_trimesh`).
        path: output file; for OBJ the material library ``<stem>.mtl`` and the texture image
            (PNG) are written next to it.
        format: a name of ``EXPORTERS`` (``"glb"``, ``"obj"``, ``"ply"``, ...); None infers it from the suffix of
            ``path``. PLY stores vertex colours (a texture is sampled at the vertices).

    Returns:
        The paths written.

    Raises:
        ValueError: unknown format.
    """
    path = Path(path)
    fmt = (format or path.suffix.lstrip(".")).lower()
    if fmt not in EXPORTERS:
        raise ValueError(f"unknown mesh format {fmt!r} for {path}; expected one of {tuple(EXPORTERS.names())}")
    return EXPORTERS.get(fmt)(mesh, path)


def __getattr__(name: str):
    if name == "FORMATS":  # computed on use, so that formats registered later are included
        return tuple(EXPORTERS.names())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
