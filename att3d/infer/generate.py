"""One-forward-pass generation: prompts -> textured meshes (``att3d generate``).

Per batch of prompts, with no per-prompt optimisation::

    encode   frozen text encoder            prompts -> TextEmbedding (B, L, D)
    mapping  hypernetwork                   -> field conditioning {name: (B, ...)}
    field    density on a grid              -> (B, R, R, R) over the field's box [-bound, bound]^3
    extraction  marching cubes at the extraction threshold (density above it is inside),
             weld, drop floaters, Taubin smoothing
    texture  UV atlas (box projection, :mod:`att3d.infer.atlas`; or xatlas) + texture baked from
             the field's colour, plus per-vertex colours
    export   trimesh (and files: GLB / OBJ / PLY, turntable videos in :func:`write_outputs`)

Colour is read slightly *inside* the surface: at the iso-surface the density equals the
extraction threshold, a thin, barely opaque shell whose colour the training signal hardly
constrains (volume rendering sees a pixel's colour where the accumulated weight is large, i.e.
just below that shell). Every colour query point is therefore moved ``colour_offset`` (default:
one grid cell) along the inward normal, the normalised gradient of the density (autograd).

The extraction threshold is the model's ``config["extraction"]["threshold"]`` if set, else
:data:`att3d.eval.model_eval.DEFAULT_THRESHOLD` (the same as the quality metrics'). A prompt
whose density never exceeds it gives an *empty* mesh (no vertices) flagged in
``mesh.metadata["att3d"]["empty"]`` with the reason; it is never a crash.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh

from att3d.utils.errors import Att3dError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The model ``att3d generate`` uses without ``--checkpoint`` (relative to the cwd, else to the repository).
DEFAULT_CHECKPOINT = "assets/att3d-shapes64"
#: Mesh file formats.
FORMATS = ("glb", "obj", "ply")
#: Stages timed by :class:`StageTimer` in :func:`generate` (and :func:`write_outputs`: ``export``, ``turntable``).
STAGES = ("encode", "mapping", "field", "extraction", "texture", "export")
#: UV atlas methods.
UV_METHODS = ("box", "xatlas")


class GenerationError(Att3dError):
    """Generation cannot run as asked (bad option, no prompt, missing model)."""


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------

class StageTimer:
    """Wall-clock seconds per named stage, accumulated over calls.

    ``with timer("field"): ...`` adds the block's duration to ``timer.seconds["field"]``. On CUDA
    (``sync=True``) the device is synchronised at both ends of a block so that asynchronous
    kernels are charged to the stage that launched them.

    Args:
        sync: synchronise CUDA around every stage (only if CUDA is initialised).
    """

    def __init__(self, sync: bool = False):
        self.sync = bool(sync)
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def _sync(self) -> None:
        if self.sync and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float) -> None:
        """Charge ``seconds`` to ``stage``."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + float(seconds)
        self.calls[stage] = self.calls.get(stage, 0) + 1

    def total(self, stages: Sequence[str] | None = None) -> float:
        """Sum over ``stages`` (default: all recorded)."""
        keys = self.seconds if stages is None else stages
        return float(sum(self.seconds.get(k, 0.0) for k in keys))

    def as_dict(self, stages: Sequence[str] = STAGES) -> dict[str, float]:
        """Seconds of ``stages`` in order (0 for stages not run), then any other recorded stage."""
        out = {k: self.seconds.get(k, 0.0) for k in stages}
        out.update({k: v for k, v in self.seconds.items() if k not in out})
        return out

    def merge(self, other: StageTimer) -> StageTimer:
        """Add another timer's seconds into this one; returns self."""
        for k, v in other.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v
            self.calls[k] = self.calls.get(k, 0) + other.calls.get(k, 0)
        return self

    def summary(self, stages: Sequence[str] | None = STAGES, per: int = 1) -> str:
        """One line ``encode 0.01s, mapping 0.00s, ...`` of ``stages`` (None: all recorded), divided by ``per``."""
        keys = list(self.seconds) if stages is None else list(stages)
        return ", ".join(f"{k} {self.seconds.get(k, 0.0) / max(per, 1):.2f}s" for k in keys)


@contextmanager
def _maybe(timer: StageTimer | None, stage: str) -> Iterator[None]:
    if timer is None:
        yield
    else:
        with timer(stage):
            yield


# ---------------------------------------------------------------------------------------------------------------
# Field -> mesh
# ---------------------------------------------------------------------------------------------------------------

def extraction_threshold(model: Any) -> float:
    """The density threshold of extraction: ``model.config["extraction"]["threshold"]`` or the metrics' default."""
    from att3d.eval.model_eval import DEFAULT_THRESHOLD

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

    from att3d.mesh import grid_points

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


def _atlas(verts: torch.Tensor, faces: torch.Tensor, size: int, padding: int, method: str
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(vmapping (V',), faces (F, 3), uvs (V', 2)) on the device of ``verts``."""
    if method == "box":
        from att3d.infer.atlas import box_atlas

        return box_atlas(verts, faces, size=size, padding=padding)
    if method == "xatlas":
        from att3d.mesh import uv_unwrap

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

    from att3d.mesh import bake_texture, clean_mesh, marching_cubes, to_trimesh

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

    with _maybe(timer, "field"):
        density = density_grid(field, cond, R, bound, progress=progress)
        # Nothing is inside on the box's faces, so every level set closes (the field is empty outside the box).
        density[:, [0, -1]] = 0.0
        density[:, :, [0, -1]] = 0.0
        density[:, :, :, [0, -1]] = 0.0

    meshes: list[trimesh.Trimesh] = []
    for b in tqdm(range(B), desc="meshes", disable=not progress or B == 1, leave=False):
        meta = {"threshold": thr, "grid_resolution": R}
        cond_b = {k: v[b:b + 1] for k, v in cond.items()}
        with _maybe(timer, "extraction"):
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
        with _maybe(timer, "texture"):
            colour = surface_colour_fn(field, cond_b, offset)
            if texture_size > 0:
                vmap, faces, uvs = _atlas(verts, faces, texture_size, texture_padding, uv_method)
                verts = verts[vmap]
                texture = bake_texture(verts.detach(), faces, uvs, colour, size=texture_size,
                                       padding=texture_padding)
            else:
                uvs = texture = None
            vcol = colour(verts)
        with _maybe(timer, "export"):
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


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    from att3d.text.prompts import PromptError, normalize_prompt

    if isinstance(prompts, str):
        prompts = [prompts]
    out = []
    for i, p in enumerate(prompts):
        try:
            out.append(normalize_prompt(p))
        except PromptError as e:
            raise GenerationError(f"prompt {i + 1}: {e}") from None
    if not out:
        raise GenerationError("no prompts to generate")
    return out


def generate(model: Any, prompts: Sequence[str], batch_size: int = 16, timer: StageTimer | None = None,
             progress: bool = True, **kw: Any) -> list[trimesh.Trimesh]:
    """Prompts -> textured meshes, one forward pass per batch (no per-prompt optimisation).

    Args:
        model: an :class:`~att3d.model.AmortizedModel` (``embed``, ``mapping``, ``field``).
        prompts: P prompts (white space normalised; empty prompts are an error).
        batch_size: prompts per forward pass.
        timer: collects seconds per stage (``encode``, ``mapping``, ``field``, ``extraction``,
            ``texture``, ``export``); a fresh one is used if None.
        progress: a progress bar over batches.
        **kw: options of :func:`meshes_from_conditioning` (``grid_resolution``, ``threshold``,
            ``texture_size``, ``smooth_iterations``, ``colour_offset``, ...).

    Returns:
        P meshes in prompt order; ``mesh.metadata["att3d"]`` adds ``prompt`` and ``seconds``
        (the batch's wall time divided by its size). Empty meshes are flagged, not raised.
    """
    from tqdm import tqdm

    prompts = _check_prompts(prompts)
    if batch_size < 1:
        raise GenerationError(f"batch size must be >= 1, got {batch_size}")
    timer = timer if timer is not None else StageTimer(sync=getattr(model, "device", None) is not None
                                                       and torch.device(model.device).type == "cuda")
    was_training = model.training
    model.eval()
    meshes: list[trimesh.Trimesh] = []
    starts = range(0, len(prompts), batch_size)
    try:
        for s in tqdm(starts, desc="generate", unit="batch", disable=not progress or len(starts) < 2):
            chunk = prompts[s:s + batch_size]
            t0 = time.perf_counter()
            with torch.no_grad():
                with timer("encode"):
                    emb = model.embed(chunk)
                with timer("mapping"):
                    cond = model.mapping(emb)
            out = meshes_from_conditioning(model, cond, timer=timer, progress=progress and len(chunk) == 1, **kw)
            per = (time.perf_counter() - t0) / len(chunk)
            for p, m in zip(chunk, out):
                m.metadata.setdefault("att3d", {}).update({"prompt": p, "seconds": per})
            meshes.extend(out)
    finally:
        model.train(was_training)
    return meshes


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
        with _maybe(timer, "export"):
            written = export_mesh(_for_format(mesh, fmt), out / f"{slug}.{fmt}", fmt)
        row["seconds"] += time.perf_counter() - t0
        row["mesh"] = written[0]
        row["files"].extend(written)
        if turntable:
            from att3d.infer.turntable import mesh_turntable, write_video

            with _maybe(timer, "turntable"):
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


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line :class:`GenerationError` s (printed by the ``att3d`` command)."""

    def error(self, message: str):  # type: ignore[override]
        raise GenerationError(f"{message} (see '{self.prog} --help')")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A model folder: as given if it exists, else relative to the repository root (shipped assets).

    Raises:
        GenerationError: found in neither place.
    """
    p = Path(path).expanduser()
    if p.exists():
        return p
    if not p.is_absolute() and (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    hint = " (the shipped model is not in this checkout; train one with `att3d train`)" \
        if str(path) == DEFAULT_CHECKPOINT else ""
    raise GenerationError(f"model not found: {path}{hint}; pass --checkpoint PATH to a model folder")


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without CUDA is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GenerationError(f"unknown device {name!r}; use cpu, cuda or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerationError(f"device {name!r} requested but CUDA is not available")
    return device


def build_parser(prog: str = "att3d generate") -> argparse.ArgumentParser:
    from att3d.cli import COMMANDS

    p = _Parser(prog=prog, description=COMMANDS["generate"].description,
                epilog="Example: att3d generate \"a red cube\" \"a blue torus\" --out out/")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts to generate (quote each one)")
    p.add_argument("--prompts-file", metavar="FILE", help="more prompts, one per line (# comments)")
    p.add_argument("--out", default="out", metavar="DIR", help="output folder (default: out)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, metavar="PATH",
                   help=f"model folder (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--format", default="glb", metavar="FMT", help="mesh format: glb, obj or ply (default: glb)")
    p.add_argument("--resolution", type=int, default=96, help="density grid samples per axis (default: 96)")
    p.add_argument("--texture-size", type=int, default=256, help="texture size; 0: vertex colours only (default: 256)")
    p.add_argument("--threshold", type=float, default=None,
                   help="density threshold of the surface (default: the model's extraction threshold)")
    p.add_argument("--smooth", type=int, default=10, help="Taubin smoothing iterations (default: 10)")
    p.add_argument("--uv", default="box", choices=UV_METHODS, help="UV atlas: box (fast) or xatlas (slow)")
    p.add_argument("--no-turntable", action="store_true", help="do not render turntable videos")
    p.add_argument("--frames", type=int, default=48, help="turntable frames (default: 48)")
    p.add_argument("--turntable-resolution", type=int, default=256, help="turntable size in pixels (default: 256)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default: 16)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """``att3d generate``: prompts -> mesh files and turntables; prints what it wrote. Returns the exit code."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    fmt = args.format.lower().lstrip(".")
    if fmt not in FORMATS:
        raise GenerationError(f"unknown format {args.format!r}; choose one of {', '.join(FORMATS)}")
    for name, value, low in (("--resolution", args.resolution, 4), ("--texture-size", args.texture_size, 0),
                             ("--frames", args.frames, 1), ("--turntable-resolution", args.turntable_resolution, 8),
                             ("--batch-size", args.batch_size, 1), ("--smooth", args.smooth, 0)):
        if value < low:
            raise GenerationError(f"{name} must be >= {low}, got {value}")
    raw = list(args.prompts)
    if args.prompts_file:
        from att3d.text.prompts import read_prompt_file

        raw += read_prompt_file(args.prompts_file)
    if not raw:
        raise GenerationError("no prompts: give them as arguments or with --prompts-file")
    from att3d.text.prompts import dedupe

    prompts = dedupe(_check_prompts(raw))
    folder = resolve_checkpoint(args.checkpoint)
    device = pick_device(args.device)

    from att3d.model import load

    model = load(folder, device=device)
    timer = StageTimer(sync=device.type == "cuda")
    t0 = time.perf_counter()
    meshes = generate(model, prompts, batch_size=args.batch_size, timer=timer, progress=not args.quiet,
                      grid_resolution=args.resolution, threshold=args.threshold, texture_size=args.texture_size,
                      smooth_iterations=args.smooth, uv_method=args.uv)
    rows = write_outputs(meshes, prompts, args.out, format=fmt, turntable=not args.no_turntable, frames=args.frames,
                         turntable_resolution=args.turntable_resolution, device=device, timer=timer,
                         progress=not args.quiet)
    total = time.perf_counter() - t0
    print(format_table(rows), end="")
    n = len(prompts)
    print(f"{n} prompt{'s' if n != 1 else ''} in {total:.2f}s on {device}; per prompt: "
          f"{timer.summary(STAGES, per=n)}"
          + (f", turntable {timer.seconds.get('turntable', 0.0) / n:.2f}s" if not args.no_turntable else ""))
    empty = [r for r in rows if r["empty"]]
    if empty:
        print(f"att3d: error: {len(empty)} of {n} prompts gave no surface ({empty[0]['note']})", file=sys.stderr)
        return 1
    return 0

