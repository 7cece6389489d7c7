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


#: glTF ``bufferView.target`` values: vertex attributes and triangle indices.
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963


def set_buffer_view_targets(glb: bytes) -> bytes:
    """A GLB whose mesh buffer views say what they hold: ``target`` ARRAY_BUFFER on the buffer views of vertex
    attributes and ELEMENT_ARRAY_BUFFER on those of indices (trimesh leaves them unset; the Khronos validator
    hints at each, and some loaders upload such views to the GPU only with it). Buffer views that anything else
    reads too (an image, another kind of accessor) are left as they are. The binary chunk is not touched."""
    import json
    import struct

    magic, version, _ = struct.unpack_from("<4sII", glb, 0)
    json_len, json_type = struct.unpack_from("<I4s", glb, 12)
    if magic != b"glTF" or version != 2 or json_type != b"JSON":
        raise ValueError("not a glTF 2.0 binary with a JSON chunk first")
    doc = json.loads(glb[20:20 + json_len])
    wanted: dict[int, set[int]] = {}
    for mesh in doc.get("meshes", []):
        for prim in mesh.get("primitives", []):
            for acc in prim.get("attributes", {}).values():
                wanted.setdefault(acc, set()).add(ARRAY_BUFFER)
            if "indices" in prim:
                wanted.setdefault(prim["indices"], set()).add(ELEMENT_ARRAY_BUFFER)
    accessors, views = doc.get("accessors", []), doc.get("bufferViews", [])
    per_view: dict[int, set[int]] = {}
    for i, acc in enumerate(accessors):
        if "bufferView" in acc:  # an accessor no primitive reads gets the marker 0: its view is left alone
            per_view.setdefault(acc["bufferView"], set()).update(wanted.get(i, {0}))
    shared = {img["bufferView"] for img in doc.get("images", []) if "bufferView" in img}
    for v, targets in per_view.items():
        if len(targets) == 1 and 0 not in targets and v not in shared and "target" not in views[v]:
            views[v]["target"] = next(iter(targets))
    text = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 4)
    rest = glb[20 + json_len:]
    return struct.pack("<4sII", b"glTF", 2, 12 + 8 + len(text) + len(rest)) + struct.pack("<I4s", len(text),
                                                                                         b"JSON") + text + rest


@EXPORTERS.register("glb")
def export_glb(mesh: trimesh.Trimesh, path: Path) -> list[Path]:
    """Binary glTF: vertex colours or the texture with its PBR material; buffer views with their targets."""
    _atomic_write(path, set_buffer_view_targets(mesh.export(file_type="glb")))
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
