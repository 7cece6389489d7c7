"""Generation outputs: meshes of prompts -> mesh files and turntable videos, and the table that lists them.

The meshes come from one forward pass per batch of prompts (no per-prompt optimisation)::

    encode   frozen text encoder            prompts -> TextEmbedding (B, L, D)
    mapping  hypernetwork                   -> field conditioning {name: (B, ...)}
    field, extraction, texture              -> textured trimesh (att3d.mesh.extract)
    export   GLB / OBJ / PLY files and turntable videos (:func:`write_outputs`)

:func:`generate` (:func:`att3d.model.generate_meshes`, also ``AmortizedModel.generate``) makes the
meshes; this module writes them (``att3d generate`` is :mod:`att3d.cli.generate`). The extraction
itself (:func:`~att3d.mesh.extract.meshes_from_conditioning`, the extraction threshold, empty meshes)
lives in :mod:`att3d.mesh.extract`; its names are re-exported here.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import trimesh

from att3d.mesh.extract import (  # re-exported: the names of generation
    DEFAULT_THRESHOLD,
    UV_METHODS,
    GenerationError,
    density_grid,
    empty_mesh,
    extraction_threshold,
    is_empty,
    meshes_from_conditioning,
    surface_colour_fn,
)
from att3d.model import generate_meshes
from att3d.utils.timing import STAGES, StageTimer, maybe_timed

#: Mesh file formats.
FORMATS = ("glb", "obj", "ply")

#: Prompts -> textured meshes in one forward pass per batch (:func:`att3d.model.generate_meshes`).
generate = generate_meshes

__all__ = ["DEFAULT_THRESHOLD", "FORMATS", "STAGES", "UV_METHODS", "GenerationError", "StageTimer", "density_grid",
           "empty_mesh", "extraction_threshold", "format_table", "generate", "is_empty", "meshes_from_conditioning",
           "slugify", "surface_colour_fn", "write_outputs"]


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------

def slugify(prompt: str, max_length: int = 64) -> str:
    """A file name stem for a prompt, unique per prompt.

    Lower-case words joined by ``-`` (``"a red cube" -> "a-red-cube"``); when that loses
    information (case, punctuation, non-ASCII letters, truncation to ``max_length``), 8 hex digits
    of the prompt's SHA-1 are appended (``"A red cube!" -> "a-red-cube-1a2b3c4d"``), so two
    different prompts never share a stem (up to hash collisions).
    """
    text = " ".join(str(prompt).split())
    words = re.findall(r"[a-z0-9]+", text.lower())
    slug = "-".join(words)[:max_length].strip("-") or "prompt"
    if slug.replace("-", " ") != text:
        slug = f"{slug[:max_length - 9].rstrip('-')}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]}"
    return slug


def write_outputs(meshes: Sequence[trimesh.Trimesh], prompts: Sequence[str], out_dir: str | os.PathLike,
                  format: str = "glb", turntable: bool = True, frames: int = 48, turntable_resolution: int = 256,
                  fps: int = 24, device: str | torch.device = "cpu", timer: StageTimer | None = None,
                  progress: bool = True) -> list[dict[str, Any]]:
    """Write each mesh as ``<slug>.<format>`` and, optionally, a turntable ``<slug>.mp4`` (``.gif`` without ffmpeg).

    Args:
        meshes: P meshes (from :func:`generate`); empty ones are reported, not written.
        prompts: their P prompts (file names come from :func:`slugify`).
        out_dir: output folder (created).
        format: ``glb``, ``obj`` (+ ``.mtl`` + ``.png``) or ``ply`` (vertex colours).
        turntable: also render a turntable video of each mesh (:func:`att3d.infer.turntable.mesh_turntable`).
        frames, turntable_resolution, fps: the video's frames, size and rate.
        device: where turntables are rasterized.
        timer: ``export`` (mesh files) and ``turntable`` seconds are added to it.

    Returns:
        One dict per prompt: ``prompt``, ``slug``, ``files`` (paths written, mesh first), ``mesh``,
        ``video`` (paths or None), ``vertices``, ``faces``, ``seconds`` (generation + mesh file),
        ``empty`` and ``note``.
    """
    from tqdm import tqdm

    from att3d.mesh import export_mesh

    fmt = format.lower().lstrip(".")
    if fmt not in FORMATS:
        raise GenerationError(f"unknown mesh format {format!r}; choose one of {', '.join(FORMATS)}")
    if len(meshes) != len(prompts):
        raise GenerationError(f"{len(meshes)} meshes for {len(prompts)} prompts")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    used: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    for mesh, prompt in tqdm(list(zip(meshes, prompts)), desc="write", disable=not progress or len(meshes) < 2):
        slug = slugify(prompt)
        used[slug] = used.get(slug, 0) + 1
        if used[slug] > 1:  # the same prompt twice
            slug = f"{slug}-{used[slug]}"
        meta = mesh.metadata.get("att3d", {})
        row: dict[str, Any] = {"prompt": prompt, "slug": slug, "files": [], "mesh": None, "video": None,
                               "vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces)),
                               "seconds": float(meta.get("seconds", 0.0)), "empty": is_empty(mesh), "note": ""}
        if row["empty"]:
            row["note"] = meta.get("reason", "empty mesh")
            rows.append(row)
            continue
        t0 = time.perf_counter()
        with maybe_timed(timer, "export"):
            written = export_mesh(_for_format(mesh, fmt), out / f"{slug}.{fmt}", fmt)
        row["seconds"] += time.perf_counter() - t0
        row["mesh"] = written[0]
        row["files"].extend(written)
        if turntable:
            from att3d.infer.turntable import mesh_turntable, write_video

            with maybe_timed(timer, "turntable"):
                video = mesh_turntable(mesh, frames=frames, resolution=turntable_resolution, device=device)
                path = write_video(video, out / f"{slug}.mp4", fps=fps)
            row["video"] = path
            row["files"].append(path)
        rows.append(row)
    return rows


def _for_format(mesh: trimesh.Trimesh, fmt: str) -> trimesh.Trimesh:
    """PLY keeps vertex colours: use the field's own per-vertex colours rather than texture samples."""
    rgba = mesh.vertex_attributes.get("color") if fmt == "ply" else None
    if rgba is None or len(rgba) != len(mesh.vertices):
        return mesh
    return trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, vertex_colors=rgba, process=False)


def format_table(rows: Sequence[dict[str, Any]], root: str | os.PathLike | None = None) -> str:
    """A plain-text table of :func:`write_outputs`' rows: prompt, file, vertices, faces, seconds."""
    def rel(p: Path) -> str:
        if root is None:
            return str(p)
        try:
            return str(Path(p).relative_to(root))
        except ValueError:
            return str(p)

    lines = [("prompt", "file", "vertices", "faces", "seconds")]
    for r in rows:
        files = [rel(p) for p in r["files"]] or [f"(nothing written: {r['note']})"]
        lines.append((r["prompt"], files[0], str(r["vertices"]), str(r["faces"]), f"{r['seconds']:.2f}"))
        lines.extend(("", f, "", "", "") for f in files[1:])
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    out = []
    for k, line in enumerate(lines):
        cells = [line[i].ljust(widths[i]) if i < 2 else line[i].rjust(widths[i]) for i in range(5)]
        out.append("  ".join(cells).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out) + "\n"
