"""Generation outputs: meshes of prompts -> mesh files and turntable videos, and the table that lists them.

The meshes come from one forward pass per batch of prompts (no per-prompt optimisation)::

    encode   frozen text encoder            prompts -> TextEmbedding (B, L, D)
    mapping  hypernetwork                   -> field conditioning {name: (B, ...)}
    field, extraction, texture              -> textured trimesh (att3d.mesh.extract)
    export   GLB / OBJ / PLY files and turntable videos (:class:`OutputFolder`, :func:`write_outputs`)

:func:`generate` (:func:`att3d.model.generate_meshes`, also ``AmortizedModel.generate``) makes the
meshes; this module writes them: :func:`generate_to_folder` streams (each batch generated, written and dropped
before the next, so memory stays flat and an interrupted run keeps what it finished), :func:`write_outputs`
writes a list of meshes. :class:`OutputFolder` gives every prompt of a run its own file names and never
overwrites an earlier run's files unless told to (``att3d generate`` is :mod:`att3d.cli.generate`). The extraction
itself (:func:`~att3d.mesh.extract.meshes_from_conditioning`, the extraction threshold, empty meshes)
lives in :mod:`att3d.mesh.extract` (also exported by :mod:`att3d.mesh`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import trimesh

from att3d.infer.video import write_video
from att3d.mesh.export import EXPORTERS
from att3d.mesh.extract import GenerationError, is_empty
from att3d.model import generate_meshes
from att3d.utils.timing import STAGES, StageTimer, maybe_timed

#: Mesh file formats: the registered exporters (``att3d.registry.EXPORTERS``, :mod:`att3d.mesh.export`).
FORMATS = tuple(EXPORTERS.names())

#: Prompts -> textured meshes in one forward pass per batch (:func:`att3d.model.generate_meshes`).
generate = generate_meshes

__all__ = ["EXISTS_MODES", "FORMATS", "MANIFEST", "STAGES", "GenerationError", "OutputExistsError", "OutputFolder",
           "Planned", "StageTimer", "format_table", "generate", "generate_to_folder", "is_empty", "slugify",
           "write_outputs"]


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


#: Mesh files per format: the file that :func:`att3d.mesh.export_mesh` writes last (the mesh itself) first.
_MESH_FILES = {"glb": (".glb",), "ply": (".ply",), "obj": (".obj", ".mtl", ".png")}
#: Video files of a turntable (``.gif`` when ffmpeg is not available).
_VIDEO_FILES = (".mp4", ".gif")
#: The record of a run's prompts and files in the output folder of ``att3d generate``.
MANIFEST = "manifest.jsonl"
#: What :class:`OutputFolder` does with a prompt whose files exist already.
EXISTS_MODES = ("error", "skip", "overwrite")


class OutputExistsError(GenerationError):
    """A file that generation would write exists already (an earlier run's output)."""


@dataclass(frozen=True)
class Planned:
    """One prompt of a run and its file name stem.

    Attributes:
        prompt: the prompt.
        stem: the file name stem of its files (unique in the run and among the folder's recorded prompts).
        skip: its files exist and the folder's mode is ``skip``: it is not generated again.
    """

    prompt: str
    stem: str
    skip: bool = False


class OutputFolder:
    """Where generation writes: a unique file name stem per prompt, no silent overwrite, every file atomic.

    Names: a prompt's stem is :func:`slugify` of it; when that stem is taken already (the same prompt twice, or a
    prompt that reads like another's hashed stem, ``"a red cube 1a2b3c4d"``), ``-2``, ``-3``, ... is appended until
    it is free, so that no two prompts of a run share a file whatever the prompts. The stems depend only on the
    prompts' order (a run repeated with the same prompts gets the same names) and, with a manifest, on the
    folder's recorded prompts: a prompt recorded there keeps its stem, and no other prompt takes it.

    Files: each prompt's video is written first and its mesh last, each to a temporary name renamed into place, so
    a prompt whose mesh file exists is complete and an interrupted run leaves no half-written file. With
    ``manifest=True`` a line ``{"prompt", "slug", "files", ...}`` is appended to :data:`MANIFEST` after each prompt
    whose files are written (flushed to disk; the last line wins when a prompt is written again); a last line cut
    by an interruption is ignored when the folder is read again.

    Args:
        out_dir: the folder (created on the first write).
        format: ``glb``, ``obj`` (+ ``.mtl`` + ``.png``) or ``ply`` (vertex colours).
        turntable: also render a turntable video of each mesh (:func:`att3d.infer.turntable.mesh_turntable`).
        frames, turntable_resolution, fps: the video's frames, size and rate.
        device: where turntables are rasterized.
        timer: ``export`` (mesh files) and ``turntable`` seconds are added to it.
        exists: a prompt whose files exist already: ``error`` (:class:`OutputExistsError` when it is planned,
            before anything is written), ``skip`` (a complete prompt is not generated again; an incomplete one is)
            or ``overwrite``.
        manifest: keep :data:`MANIFEST` (``att3d generate``).
        hint: appended to the message of :class:`OutputExistsError`.

    Attributes:
        guard: a context manager factory entered around each prompt's writes (video, mesh, manifest line);
            ``att3d generate`` holds Ctrl-C and SIGTERM back inside it (:class:`att3d.cli.generate.StopSignals`).
    """

    def __init__(self, out_dir: str | os.PathLike, format: str = "glb", turntable: bool = True, frames: int = 48,
                 turntable_resolution: int = 256, fps: int = 24, device: str | torch.device = "cpu",
                 timer: StageTimer | None = None, exists: str = "error", manifest: bool = False,
                 hint: str = "pass exists='skip' to continue that run or exists='overwrite' to replace its files"):
        fmt = format.lower().lstrip(".")
        if fmt not in FORMATS:
            raise GenerationError(f"unknown mesh format {format!r}; choose one of {', '.join(FORMATS)}")
        if exists not in EXISTS_MODES:
            raise GenerationError(f"exists must be one of {', '.join(EXISTS_MODES)}, got {exists!r}")
        self.out = Path(out_dir)
        if self.out.exists() and not self.out.is_dir():
            raise GenerationError(f"output folder {self.out} is a file, not a folder")
        self.format, self.turntable, self.frames = fmt, bool(turntable), int(frames)
        self.turntable_resolution, self.fps, self.device, self.timer = int(turntable_resolution), fps, device, timer
        self.exists, self.hint = exists, hint
        self.manifest_path = self.out / MANIFEST if manifest else None
        self._recorded: dict[str, str] = self._read_manifest()  # prompt -> stem of the folder's earlier runs
        self._taken: set[str] = set(self._recorded.values())
        self._claimed: set[str] = set()  # prompts of this run that took their recorded stem
        self._manifest_file: Any = None
        self.guard: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext

    # -- names and plans ------------------------------------------------------------------------------------------

    def _read_manifest(self) -> dict[str, str]:
        if self.manifest_path is None or not self.manifest_path.is_file():
            return {}
        recorded: dict[str, str] = {}
        with open(self.manifest_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    prompt, stem = rec["prompt"], rec["slug"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by an interruption
                if isinstance(prompt, str) and isinstance(stem, str) and re.fullmatch(r"[a-z0-9-]+", stem):
                    recorded[prompt] = stem
        return recorded

    def mesh_path(self, stem: str) -> Path:
        """The mesh file of ``stem`` (``out/<stem>.<format>``)."""
        return self.out / f"{stem}.{self.format}"

    def targets(self, stem: str) -> list[Path]:
        """Every file a prompt with this stem may get: the mesh file(s), and the video (``.mp4`` or ``.gif``)."""
        files = [self.out / f"{stem}{suffix}" for suffix in _MESH_FILES[self.format]]
        if self.turntable:
            files += [self.out / f"{stem}{suffix}" for suffix in _VIDEO_FILES]
        return files

    def complete(self, stem: str) -> bool:
        """Whether the files of ``stem`` are all there: the mesh (written last) and, with turntables, a video."""
        if not self.mesh_path(stem).is_file():
            return False
        return not self.turntable or any((self.out / f"{stem}{s}").is_file() for s in _VIDEO_FILES)

    def _stem(self, prompt: str) -> str:
        recorded = self._recorded.get(prompt)
        if recorded is not None and prompt not in self._claimed:
            self._claimed.add(prompt)
            return recorded
        base = slugify(prompt)
        stem, k = base, 2
        while stem in self._taken:
            stem, k = f"{base}-{k}", k + 1
        self._taken.add(stem)
        return stem

    def plan_one(self, prompt: str) -> Planned:
        """The stem of the next prompt, and whether it is skipped (see ``exists``).

        Raises:
            OutputExistsError: ``exists="error"`` and a file of the prompt exists.
        """
        stem = self._stem(prompt)
        if self.exists == "overwrite":
            return Planned(prompt, stem)
        if self.exists == "skip":
            return Planned(prompt, stem, skip=self.complete(stem))
        found = next((f for f in self.targets(stem) if f.exists()), None)
        if found is not None:
            raise OutputExistsError(f"{found} exists (an earlier run's output); {self.hint}")
        return Planned(prompt, stem)

    def plan(self, prompts: Iterable[str]) -> list[Planned]:
        """:meth:`plan_one` of every prompt, in order: all names fixed and all conflicts found before any work."""
        return [self.plan_one(p) for p in prompts]

    # -- writing --------------------------------------------------------------------------------------------------

    def skipped_row(self, planned: Planned) -> dict[str, Any]:
        """The row of a skipped prompt: its existing files, ``skipped`` True."""
        files = [f for f in self.targets(planned.stem) if f.is_file()]
        return {"prompt": planned.prompt, "slug": planned.stem, "files": files, "mesh": self.mesh_path(planned.stem),
                "video": next((f for f in files if f.suffix in _VIDEO_FILES), None), "vertices": 0, "faces": 0,
                "seconds": 0.0, "empty": False, "skipped": True, "note": "skipped: its files exist"}

    def write(self, planned: Planned | str, mesh: trimesh.Trimesh) -> dict[str, Any]:
        """Write one prompt's files (video first, mesh last, each atomically) and its manifest line.

        Returns:
            The prompt's row: ``prompt``, ``slug``, ``files`` (paths written, mesh first), ``mesh``, ``video``
            (paths or None), ``vertices``, ``faces``, ``seconds`` (generation + mesh file), ``empty``,
            ``skipped`` (False) and ``note``.
        """
        from att3d.mesh import export_mesh

        if isinstance(planned, str):
            planned = self.plan_one(planned)
        stem = planned.stem
        meta = mesh.metadata.get("att3d", {})
        row: dict[str, Any] = {"prompt": planned.prompt, "slug": stem, "files": [], "mesh": None, "video": None,
                               "vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces)),
                               "seconds": float(meta.get("seconds", 0.0)), "empty": is_empty(mesh),
                               "skipped": False, "note": ""}
        if row["empty"]:
            row["note"] = meta.get("reason", "empty mesh")
            return row
        self.out.mkdir(parents=True, exist_ok=True)
        video = None
        if self.turntable:
            from att3d.infer.turntable import mesh_turntable

            with maybe_timed(self.timer, "turntable"):
                video = mesh_turntable(mesh, frames=self.frames, resolution=self.turntable_resolution,
                                       device=self.device)
        with self.guard():  # the prompt's files and its manifest line, all or (but for a kill -9) none
            if video is not None:
                with maybe_timed(self.timer, "turntable"):
                    row["video"] = write_video(video, self.out / f"{stem}.mp4", fps=self.fps)
            t0 = time.perf_counter()
            with maybe_timed(self.timer, "export"):
                written = export_mesh(_for_format(mesh, self.format), self.mesh_path(stem), self.format)
            row["seconds"] += time.perf_counter() - t0
            row["mesh"] = written[0]
            row["files"] = [*written, *([row["video"]] if row["video"] is not None else [])]
            self._record(row)
        return row

    def _record(self, row: dict[str, Any]) -> None:
        """Append a written prompt's line to the manifest (flushed and synced: it survives a kill)."""
        if self.manifest_path is None:
            return
        if self._manifest_file is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self._manifest_file = open(self.manifest_path, "a", encoding="utf-8")
        rec = {"prompt": row["prompt"], "slug": row["slug"], "files": [Path(f).name for f in row["files"]],
               "vertices": row["vertices"], "faces": row["faces"], "empty": row["empty"], "note": row["note"]}
        self._manifest_file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._manifest_file.flush()
        os.fsync(self._manifest_file.fileno())
        self._recorded[row["prompt"]] = row["slug"]

    def close(self) -> None:
        """Close the manifest (each line is on disk already)."""
        if self._manifest_file is not None:
            self._manifest_file.close()
            self._manifest_file = None

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def generate_to_folder(model: Any, prompts: Iterable[Planned | str], folder: OutputFolder, batch_size: int = 16,
                       timer: StageTimer | None = None, **mesh_options: Any) -> Iterator[dict[str, Any]]:
    """Generate and write prompt after prompt: yields each prompt's row as soon as its files are on disk.

    Prompts are taken from ``prompts`` lazily, ``batch_size`` at a time; each batch is one call of
    :func:`att3d.model.generate_meshes` (one forward pass) and its meshes are written by ``folder`` and dropped
    before the next batch starts, so memory does not grow with the number of prompts and an interrupted run keeps
    every prompt it finished (``OutputFolder(..., exists="skip")`` continues it).

    Args:
        model: an amortized model.
        prompts: prompts (normalised), or :class:`Planned` ones from ``folder.plan``; skipped ones are not
            generated (their row has ``skipped`` True).
        folder: where the files go (format, turntables, what to do with existing files).
        batch_size: prompts per forward pass.
        timer: seconds per stage (``encode``, ``mapping``, ``field``, ..., ``export``, ``turntable``).
        **mesh_options: options of :func:`att3d.mesh.extract.meshes_from_conditioning` (``grid_resolution``,
            ``threshold``, ``texture_size``, ``smooth_iterations``, ``uv_method``, ...).

    Yields:
        :meth:`OutputFolder.write`'s row of each prompt, in prompt order.
    """
    if batch_size < 1:
        raise GenerationError(f"batch size must be >= 1, got {batch_size}")
    if timer is not None and folder.timer is None:
        folder.timer = timer

    def run(batch: list[Planned]) -> Iterator[dict[str, Any]]:
        meshes = generate_meshes(model, [p.prompt for p in batch], batch_size=len(batch), timer=timer,
                                 progress=False, **mesh_options)
        for planned, mesh in zip(batch, meshes):
            yield folder.write(planned, mesh)
        meshes.clear()

    batch: list[Planned] = []
    for item in prompts:
        planned = folder.plan_one(item) if isinstance(item, str) else item
        if planned.skip:
            yield folder.skipped_row(planned)
            continue
        batch.append(planned)
        if len(batch) == batch_size:
            yield from run(batch)
            batch = []
    if batch:
        yield from run(batch)


def write_outputs(meshes: Sequence[trimesh.Trimesh], prompts: Sequence[str], out_dir: str | os.PathLike,
                  format: str = "glb", turntable: bool = True, frames: int = 48, turntable_resolution: int = 256,
                  fps: int = 24, device: str | torch.device = "cpu", timer: StageTimer | None = None,
                  progress: bool = True, exists: str = "overwrite") -> list[dict[str, Any]]:
    """Write each mesh as ``<stem>.<format>`` and, optionally, a turntable ``<stem>.mp4`` (``.gif`` without ffmpeg).

    The stems are unique among the call's prompts whatever they are (:class:`OutputFolder`: the same prompt twice
    gets ``<slug>`` and ``<slug>-2``), so no file of the call overwrites another. Files of an earlier call are
    handled by ``exists``.

    Args:
        meshes: P meshes (from :func:`generate`); empty ones are reported, not written.
        prompts: their P prompts (file names from :func:`slugify`, made unique).
        out_dir: output folder (created).
        format: ``glb``, ``obj`` (+ ``.mtl`` + ``.png``) or ``ply`` (vertex colours).
        turntable: also render a turntable video of each mesh (:func:`att3d.infer.turntable.mesh_turntable`).
        frames, turntable_resolution, fps: the video's frames, size and rate.
        device: where turntables are rasterized.
        timer: ``export`` (mesh files) and ``turntable`` seconds are added to it.
        exists: files that exist already: ``overwrite`` (the default of this Python function), ``error``
            (:class:`OutputExistsError` before anything is written) or ``skip`` (see :class:`OutputFolder`).

    Returns:
        One dict per prompt: ``prompt``, ``slug``, ``files`` (paths written, mesh first), ``mesh``,
        ``video`` (paths or None), ``vertices``, ``faces``, ``seconds`` (generation + mesh file),
        ``empty``, ``skipped`` and ``note``.
    """
    from tqdm import tqdm

    if len(meshes) != len(prompts):
        raise GenerationError(f"{len(meshes)} meshes for {len(prompts)} prompts")
    folder = OutputFolder(out_dir, format=format, turntable=turntable, frames=frames,
                          turntable_resolution=turntable_resolution, fps=fps, device=device, timer=timer,
                          exists=exists)
    plans = folder.plan(prompts)  # every name and conflict first: nothing is written when one fails
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for mesh, planned in tqdm(list(zip(meshes, plans)), desc="write", disable=not progress or len(meshes) < 2):
        rows.append(folder.skipped_row(planned) if planned.skip else folder.write(planned, mesh))
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
