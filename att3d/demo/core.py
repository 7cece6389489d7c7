"""The demo's logic without its page: input checks, the output folder, models, and the handlers.

Nothing here imports gradio, and torch is imported only when a model is used, so the rules that keep
the app safe are tested without a browser:

- **Input**: :func:`validate_prompt` accepts text only, at most :data:`MAX_PROMPT_CHARS` characters
  after white space is collapsed, without control characters; anything else is a
  :class:`DemoInputError` whose one-line message the page shows.
- **Files**: the app writes only under its output folder (:class:`OutputStore`): one folder per request,
  named by the app (``gen-20260101-120000-1a2b3c4d``), never by user text; file names inside it are
  slugs (``[a-z0-9-]``, with a hash when the slug loses information) and every path is checked to
  lie inside the folder. Old request folders beyond :data:`KEEP_RUNS` are deleted (only folders with
  the app's own names are ever touched).
- **Models**: :func:`find_models` lists model folders (``model_config.json`` + ``model.safetensors``)
  under the given paths; the page picks one by its label, never by a path. :class:`ModelCache` loads
  each model once.
- **Handlers** (:class:`DemoBackend`): prompt -> textured mesh (GLB for the viewer, OBJ as a zip with
  its material and texture, PLY), a turntable video of it, the object at a point of the interpolation
  between two prompts (computed on demand, cached), an animation along the interpolation, and the
  model card's text and figures.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from att3d.utils.errors import Att3dError
from att3d.utils.paths import REPO_ROOT

log = logging.getLogger(__name__)

#: Longest prompt the app accepts (characters, after white space is collapsed).
MAX_PROMPT_CHARS = 200
#: Where the app writes (relative to the current directory) unless told otherwise.
DEFAULT_OUT_DIR = "outputs/demo-app"
#: Folders scanned for models when none are given (relative to the current directory, else to the repository).
DEFAULT_MODEL_PATHS = ("assets", "runs")
#: Request folders kept in the output folder; older ones are deleted.
KEEP_RUNS = 64
#: The object generated when the app starts (warm-up), shown until the first request.
START_PROMPT = "a red cube"
#: Mesh detail choices of :meth:`DemoBackend.generate`.
DETAILS = ("fast", "fine")
#: Kinds of request folders (the first part of their names).
RUN_KINDS = ("gen", "interp", "turn", "anim")
RUN_NAME = re.compile("^(?:" + "|".join(RUN_KINDS) + r")-\d{8}-\d{6}-[0-9a-f]{12}$")
#: Model card figures shown per model, and the largest figure copied (bytes).
MAX_FIGURES = 12
MAX_FIGURE_BYTES = 16 << 20
FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")
#: Skipped when looking for model folders.
_SKIP_DIRS = {"__pycache__", "node_modules", "site-packages", "tensorboard", "checkpoints", "eval", "samples"}

ProgressFn = Callable[[float, str], None]


class DemoInputError(Att3dError):
    """Input the page cannot use (empty, too long or non-text prompt, unknown model); its message is shown."""


# ---------------------------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------------------------

def validate_prompt(value: Any, what: str = "prompt") -> str:
    """The prompt to generate from ``value``, normalised as the CLI does (:func:`att3d.text.prompts.normalize_prompt`).

    Raises:
        DemoInputError: ``value`` is not a string, is empty (or only white space), holds control
            characters, or is longer than :data:`MAX_PROMPT_CHARS` characters.
    """
    if value is None:
        raise DemoInputError(f"empty {what}: type what to make, e.g. 'a red cube'")
    if not isinstance(value, str):
        raise DemoInputError(f"the {what} must be text, not {type(value).__name__}")
    if len(value) > 8 * MAX_PROMPT_CHARS:  # do not even normalise megabytes
        raise DemoInputError(f"{what} too long ({len(value)} characters; at most {MAX_PROMPT_CHARS})")
    from att3d.text.prompts import PromptError, normalize_prompt

    try:  # the CLI's normalisation (NFC, BOMs dropped, white space collapsed; control characters refused)
        text = normalize_prompt(value)
    except PromptError as e:
        if str(e) == "empty prompt":
            raise DemoInputError(f"empty {what}: type what to make, e.g. 'a red cube'") from None
        raise DemoInputError(f"{what}: {e}") from None
    if len(text) > MAX_PROMPT_CHARS:
        raise DemoInputError(f"{what} too long ({len(text)} characters; at most {MAX_PROMPT_CHARS})")
    return text


def validate_fraction(value: Any, what: str = "position") -> float:
    """A number in [0, 1] (the interpolation slider)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DemoInputError(f"the {what} must be a number between 0 and 1")
    try:
        t = float(value)
    except ValueError:
        raise DemoInputError(f"the {what} must be a number between 0 and 1, got {str(value)[:20]!r}") from None
    if not 0.0 <= t <= 1.0:  # also rejects NaN
        raise DemoInputError(f"the {what} must be between 0 and 1, got {t:g}")
    return t


def file_stem(text: str, max_length: int = 40) -> str:
    """A file name stem from user text: lower-case ``[a-z0-9]`` words joined by ``-`` and 8 hex digits of its
    SHA-1 (``"a red cube" -> "a-red-cube-0a1b2c3d"``); never a path, never empty, never starting with a dot."""
    words = re.findall(r"[a-z0-9]+", str(text).lower())
    slug = "-".join(words)[:max_length].strip("-") or "prompt"
    return f"{slug}-{hashlib.sha1(str(text).encode('utf-8', 'replace')).hexdigest()[:8]}"


# ---------------------------------------------------------------------------------------------------------------
# The output folder
# ---------------------------------------------------------------------------------------------------------------

class OutputStore:
    """The app's own output folder: one sub-folder per request, the oldest deleted beyond ``keep``.

    Args:
        root: the folder (created).
        keep: request folders kept (at least 1).
    """

    def __init__(self, root: str | os.PathLike, keep: int = KEEP_RUNS):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = max(1, int(keep))
        self._lock = threading.Lock()

    def contains(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` (resolved, symlinks followed) lies inside the output folder."""
        try:
            Path(path).resolve().relative_to(self.root)
        except (ValueError, OSError):
            return False
        return True

    def check(self, path: str | os.PathLike) -> Path:
        """``path`` resolved, if it lies inside the output folder; else ValueError."""
        p = Path(path).resolve()
        if not self.contains(p):
            raise ValueError(f"{path} is outside the demo's output folder {self.root}")
        return p

    def new_run(self, kind: str) -> Path:
        """A new, empty request folder ``<kind>-<date>-<time>-<random>`` (then older ones are pruned)."""
        if kind not in RUN_KINDS:
            raise ValueError(f"unknown kind of request folder {kind!r}")
        with self._lock:
            name = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}"
            path = self.root / name
            path.mkdir()
            self._prune_locked(protect=path)
        return path

    def runs(self) -> list[Path]:
        """The request folders, oldest first."""
        out = []
        for p in self.root.iterdir():
            if RUN_NAME.match(p.name) and p.is_dir() and not p.is_symlink():
                try:
                    out.append((p.stat().st_mtime, p.name, p))
                except OSError:
                    continue
        return [p for _, _, p in sorted(out)]

    def prune(self) -> list[Path]:
        """Delete the oldest request folders beyond ``keep``; returns those deleted."""
        with self._lock:
            return self._prune_locked()

    def _prune_locked(self, protect: Path | None = None) -> list[Path]:
        runs = [p for p in self.runs() if p != protect]
        excess = len(runs) + (protect is not None) - self.keep
        removed = []
        for p in runs[:max(0, excess)]:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        return removed

    def sub(self, name: str) -> Path:
        """A fixed sub-folder of the app (e.g. ``cards``), created; ``name`` must be a plain folder name."""
        if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
            raise ValueError(f"bad folder name {name!r}")
        path = self.root / name
        path.mkdir(exist_ok=True)
        return path


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------

def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an att3d model folder (``model_config.json`` and ``model.safetensors``)."""
    p = Path(path)
    return (p / "model_config.json").is_file() and (p / "model.safetensors").is_file()


def _label(path: Path) -> str:
    for base in (Path.cwd().resolve(), REPO_ROOT):
        try:
            return path.relative_to(base).as_posix()
        except ValueError:
            continue
    return path.as_posix()


def find_models(paths: Iterable[str | os.PathLike] = DEFAULT_MODEL_PATHS, max_depth: int = 4,
                limit: int = 50) -> dict[str, Path]:
    """Model folders at or under ``paths``, by label (the folder relative to the current directory or the
    repository, e.g. ``assets/att3d-shapes64``), in the order found.

    A relative path that does not exist here is looked up relative to the repository root (the shipped
    ``assets/``). Folders are searched ``max_depth`` levels down (hidden folders and run internals such as
    ``checkpoints/`` skipped), at most ``limit`` models in all.
    """
    found: dict[str, Path] = {}
    seen: set[Path] = set()

    def add(p: Path) -> None:
        p = p.resolve()
        if p not in seen and len(found) < limit:
            seen.add(p)
            found[_label(p)] = p

    def walk(p: Path, depth: int) -> None:
        if len(found) >= limit:
            return
        if is_model_dir(p):
            add(p)
            return
        if depth >= max_depth:
            return
        try:
            children = sorted(c for c in p.iterdir() if c.is_dir())
        except OSError:
            return
        for c in children:
            if not c.name.startswith(".") and c.name not in _SKIP_DIRS:
                walk(c, depth + 1)

    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists() and not p.is_absolute() and (REPO_ROOT / p).exists():
            p = REPO_ROOT / p
        if p.is_dir():
            walk(p, 0)
    return found


class ModelCache:
    """Loads each model folder once (on first use), keeping at most ``max_loaded`` in memory.

    Args:
        models: label -> model folder (:func:`find_models`).
        device: where models run.
        max_loaded: models kept loaded; the least recently used is dropped beyond it.
    """

    def __init__(self, models: dict[str, Path], device: str = "cpu", max_loaded: int = 2):
        self.models = dict(models)
        self.device = device
        self.max_loaded = max(1, int(max_loaded))
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, label: Any) -> str:
        """``label`` if it names a known model; else :class:`DemoInputError`."""
        if not isinstance(label, str) or label not in self.models:
            names = ", ".join(self.models) or "none found"
            raise DemoInputError(f"unknown model {str(label)[:80]!r}; choose one of: {names}")
        return label

    def get(self, label: Any) -> Any:
        """The loaded model of ``label`` (loaded now if needed)."""
        label = self.check(label)
        with self._lock:
            if label in self._loaded:
                self._loaded.move_to_end(label)
                return self._loaded[label]
            import att3d

            t0 = time.perf_counter()
            model = att3d.load(self.models[label], device=self.device)
            log.info("loaded %s in %.1fs", label, time.perf_counter() - t0)
            self._loaded[label] = model
            while len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)
            return model

    def is_loaded(self, label: str) -> bool:
        return label in self._loaded


# ---------------------------------------------------------------------------------------------------------------
# Examples and model cards
# ---------------------------------------------------------------------------------------------------------------

def example_prompts() -> dict[str, list[str]]:
    """Example prompts of the shapes world: ``seen`` (one training caption per shape, e.g. ``a red cube``)
    and ``held_out`` (the 8 captions never shown in training, e.g. ``a orange cube``)."""
    from att3d.world.shapes import COLOUR_NAMES, SHAPE_NAMES, caption, heldout_captions, train_captions

    train = set(train_captions())
    # shape i in colour i - 1: every shape and every colour once, all seen in training; "a red cube" first
    seen = [caption(COLOUR_NAMES[(i - 1) % len(COLOUR_NAMES)], s) for i, s in enumerate(SHAPE_NAMES)]
    seen = [p for p in seen[1:] + seen[:1] if p in train]
    return {"seen": seen, "held_out": list(heldout_captions())}


_IMAGE_LINE = re.compile(r"^\s*!\[[^\]]*\]\([^)]*\)\s*$")


def model_card(folder: str | os.PathLike, max_chars: int = 8000) -> str:
    """The model card (``README.md``) of a model folder as Markdown without its image lines (the figures are
    shown apart), cut at ``max_chars``; a short note when the folder has none."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        return f"*No model card (README.md) in `{Path(folder).name}`.*"
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = [ln for ln in text.splitlines() if not _IMAGE_LINE.match(ln)]
    text = "\n".join(lines)
    if len(text) > max_chars:
        text = text[:max_chars].rsplit("\n", 1)[0] + "\n\n*(cut; see README.md in the model folder)*"
    return text


def card_figures(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """The figures of a model folder (images in it and one level down, e.g. ``curves.png``,
    ``eval/renders.png``): (path, caption) pairs, at most :data:`MAX_FIGURES`."""
    folder = Path(folder)
    out: list[tuple[Path, str]] = []
    candidates = sorted(folder.iterdir()) if folder.is_dir() else []
    for sub in [c for c in candidates if c.is_dir() and not c.name.startswith(".")]:
        candidates += sorted(sub.iterdir())
    for p in candidates:
        if (p.is_file() and not p.is_symlink() and p.suffix.lower() in FIGURE_SUFFIXES
                and not p.name.startswith(".") and p.stat().st_size <= MAX_FIGURE_BYTES):
            out.append((p, p.relative_to(folder).as_posix()))
        if len(out) >= MAX_FIGURES:
            break
    return out


# ---------------------------------------------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class DemoSettings:
    """Sizes of what the app makes (small enough for a 2-core CPU: a quarter to half a second per object).

    Attributes:
        grid_resolution, texture_size, smooth_iterations: mesh extraction (see
            :func:`att3d.mesh.extract.meshes_from_conditioning`); the shipped model's finest grid level is
            32^3, so a 40^3 extraction loses little against 96^3, at a fifth of the time and vertices.
        fine_grid_resolution, fine_texture_size: the same for ``detail="fine"``.
        slider_steps: positions of the interpolation slider (0, 1 / (n - 1), ..., 1).
        video_frames, video_resolution, video_fps: the interpolation animation (volume-rendered, orbiting).
        turntable_frames, turntable_resolution, turntable_fps: the turntable of a generated mesh.
        mode: interpolation of the text embeddings (``linear`` or ``slerp``).
    """

    grid_resolution: int = 40
    texture_size: int = 128
    smooth_iterations: int = 10
    fine_grid_resolution: int = 96
    fine_texture_size: int = 512
    slider_steps: int = 11
    video_frames: int = 20
    video_resolution: int = 80
    video_fps: int = 10
    turntable_frames: int = 36
    turntable_resolution: int = 192
    turntable_fps: int = 18
    mode: str = "linear"


@dataclass
class MeshResult:
    """What a generation or an interpolation frame produced.

    ``glb`` is None when the field had no surface (``message`` says why); ``seconds`` is the generation
    (forward pass, extraction, texture, GLB), ``run`` the request folder's name.
    """

    message: str
    glb: Path | None = None
    seconds: float = 0.0
    run: str | None = None
    vertices: int = 0
    faces: int = 0
    files: dict[str, Path] = field(default_factory=dict)


def _no_progress(fraction: float, desc: str) -> None:
    pass


class DemoBackend:
    """The handlers of the page, on a set of models and an output folder.

    Args:
        models: label -> model folder (:func:`find_models`); the first is the default.
        out_dir: the app's output folder (:class:`OutputStore`).
        settings: sizes (:class:`DemoSettings`).
        device: where the models run.
        keep: request folders kept.
    """

    def __init__(self, models: dict[str, Path], out_dir: str | os.PathLike = DEFAULT_OUT_DIR,
                 settings: DemoSettings | None = None, device: str = "cpu", keep: int = KEEP_RUNS):
        if not models:
            raise Att3dError("no model folders found (a model folder holds model_config.json and "
                             "model.safetensors); pass --model PATH")
        self.settings = settings or DemoSettings()
        self.store = OutputStore(out_dir, keep=keep)
        self.cache = ModelCache(models, device=device)
        self._lock = threading.Lock()
        self._meshes: OrderedDict[str, tuple[str, Any]] = OrderedDict()  # run name -> (prompt, mesh)
        self._paths: OrderedDict[tuple, tuple[Any, Path]] = OrderedDict()  # interpolation -> (embeddings, folder)
        self._frames: dict[tuple, MeshResult] = {}

    # -- models --------------------------------------------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        return list(self.cache.models)

    @property
    def default_model(self) -> str:
        return self.labels[0]

    def preload(self, label: str | None = None, warm_up: bool = True) -> MeshResult | None:
        """Load a model (the default one) now, so that the first request does not wait for it.

        With ``warm_up`` it also generates :data:`START_PROMPT` once (the first run of each stage is slower) and
        writes it as the page's opening object (``<out>/start/``); returns it (None without ``warm_up``).
        """
        label = label or self.default_model
        model = self.cache.get(label)
        if not warm_up:
            return None
        s = self.settings
        t0 = time.perf_counter()
        mesh = model.generate([START_PROMPT], grid_resolution=s.grid_resolution, texture_size=s.texture_size,
                              smooth_iterations=s.smooth_iterations, progress=False)[0]
        seconds = time.perf_counter() - t0
        log.info("warmed up in %.1fs", seconds)
        folder = self.store.sub("start")
        for old in folder.iterdir():
            if old.is_file() and not old.is_symlink():
                old.unlink()
        result = self._write(mesh, START_PROMPT, folder, "glb")
        result.seconds, result.run = seconds, None
        if result.glb is not None:
            result.message = f"Showing **{START_PROMPT}** from `{label}`. Type a prompt, or pick an example below."
        return result

    def card(self, label: Any) -> tuple[str, list[tuple[str, str]]]:
        """The model card of ``label``: Markdown text and its figures, copied into the output folder."""
        label = self.cache.check(label)
        folder = self.cache.models[label]
        dest = self.store.sub("cards") / hashlib.sha1(label.encode()).hexdigest()[:12]
        dest.mkdir(exist_ok=True)
        figures = []
        for src, caption in card_figures(folder):
            target = dest / re.sub(r"[^a-z0-9.-]+", "-", caption.lower()).strip("-.")
            if not target.exists() or target.stat().st_mtime < src.stat().st_mtime:
                shutil.copyfile(src, target)
            figures.append((str(target), caption))
        return f"**{label}**\n\n" + model_card(folder), figures

    # -- text to 3D ---------------------------------------------------------------------------------------------
    def generate(self, prompt: Any, label: Any, progress: ProgressFn = _no_progress,
                 detail: Any = "fast") -> MeshResult:
        """Prompt -> textured mesh in one forward pass, written as GLB into a new request folder.

        Args:
            detail: ``fast`` (the settings' grid and texture) or ``fine`` (their ``fine_`` sizes).

        Raises:
            DemoInputError: bad prompt, model or detail.
        """
        prompt = validate_prompt(prompt)
        label = self.cache.check(label)
        if detail not in DETAILS:
            raise DemoInputError(f"unknown detail {str(detail)[:20]!r}; choose {' or '.join(DETAILS)}")
        if not self.cache.is_loaded(label):
            progress(0.05, f"loading {label}")
        model = self.cache.get(label)
        progress(0.2, "text -> hypernetwork -> field -> mesh")
        s = self.settings
        fine = detail == "fine"
        t0 = time.perf_counter()
        mesh = model.generate([prompt], grid_resolution=s.fine_grid_resolution if fine else s.grid_resolution,
                              texture_size=s.fine_texture_size if fine else s.texture_size,
                              smooth_iterations=s.smooth_iterations, progress=False)[0]
        run = self.store.new_run("gen")
        result = self._write(mesh, prompt, run, "glb")
        result.seconds = time.perf_counter() - t0
        if result.glb is None:
            return result
        with self._lock:
            self._meshes[run.name] = (prompt, mesh)
            while len(self._meshes) > 8:
                self._meshes.popitem(last=False)
        log.info("generated %r in %.2fs (%d vertices)", prompt, result.seconds, result.vertices)
        result.message = (f"**{prompt}**: generated in **{result.seconds:.2f} s** (one forward pass; "
                          f"{result.vertices:,} vertices, {result.faces:,} faces) with `{label}`.")
        return result

    def _write(self, mesh: Any, name: str, run: Path, fmt: str) -> MeshResult:
        from att3d.infer.generate import is_empty, write_outputs

        if is_empty(mesh):
            reason = mesh.metadata.get("att3d", {}).get("reason", "empty mesh")
            return MeshResult(f"No object for this input: {reason.split(';')[0]}.", run=run.name)
        rows = write_outputs([mesh], [name], run, format=fmt, turntable=False, progress=False)
        files = [self.store.check(p) for p in rows[0]["files"]]
        result = MeshResult("", glb=files[0] if fmt == "glb" else None, run=run.name,
                            vertices=rows[0]["vertices"], faces=rows[0]["faces"], files={fmt: files[0]})
        if fmt == "obj":  # the OBJ with its material and texture, as one download
            archive = files[0].with_suffix(".zip")
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
                for f in files:
                    z.write(f, f.name)
            result.files["obj"] = archive
        return result

    def _run_folder(self, run: Any) -> tuple[str, Any, Path]:
        if not isinstance(run, str) or not RUN_NAME.match(run):
            raise DemoInputError("generate an object first")
        with self._lock:
            entry = self._meshes.get(run)
        folder = self.store.root / run
        if entry is None or not folder.is_dir():
            raise DemoInputError("that object is no longer kept; generate it again")
        return entry[0], entry[1], folder

    def downloads(self, run: Any) -> dict[str, Path]:
        """OBJ (zip of .obj, .mtl, .png) and PLY files of a generated mesh, beside its GLB."""
        prompt, mesh, folder = self._run_folder(run)
        out = {}
        for fmt in ("obj", "ply"):
            out[fmt] = self._write(mesh, prompt, folder, fmt).files[fmt]
        return out

    def turntable(self, run: Any, progress: ProgressFn = _no_progress) -> Path:
        """A turntable video (MP4; GIF without ffmpeg) of a generated mesh."""
        from att3d.infer.turntable import mesh_turntable
        from att3d.infer.video import write_video

        prompt, mesh, folder = self._run_folder(run)
        s = self.settings
        progress(0.1, "rendering the turntable")
        frames = mesh_turntable(mesh, frames=s.turntable_frames, resolution=s.turntable_resolution,
                                device=self.cache.device)
        progress(0.9, "writing the video")
        return self.store.check(write_video(frames, folder / "turntable.mp4", fps=s.turntable_fps))

    # -- interpolation ------------------------------------------------------------------------------------------
    def _path(self, label: str, a: str, b: str, mode: str) -> tuple[Any, Path]:
        """Embeddings along the path a -> b at the slider's positions, and the request folder of its frames."""
        import torch

        from att3d.infer.interpolate import embedding_path

        key = (label, a, b, mode)
        with self._lock:
            hit = self._paths.get(key)
        if hit is not None and hit[1].is_dir():
            return hit
        model = self.cache.get(label)
        with torch.no_grad():
            path = embedding_path(model.embed([a, b]), self.settings.slider_steps, mode)
        entry = (path, self.store.new_run("interp"))
        with self._lock:
            self._paths[key] = entry
            while len(self._paths) > 16:
                self._paths.popitem(last=False)
        return entry

    def _interp_inputs(self, a: Any, b: Any, mode: Any, label: Any) -> tuple[str, str, str, str]:
        from att3d.infer.interpolate import MODES

        a = validate_prompt(a, "first prompt")
        b = validate_prompt(b, "second prompt")
        mode = self.settings.mode if mode in (None, "") else mode
        if mode not in MODES:
            raise DemoInputError(f"unknown interpolation mode {str(mode)[:20]!r}; choose {' or '.join(MODES)}")
        return a, b, mode, self.cache.check(label)

    def slider_index(self, t: Any) -> int:
        """The frame of the slider position ``t`` in [0, 1]."""
        return int(round(validate_fraction(t) * (self.settings.slider_steps - 1)))

    def interpolation_frame(self, a: Any, b: Any, t: Any, mode: Any, label: Any,
                            progress: ProgressFn = _no_progress) -> MeshResult:
        """The object at position ``t`` of the path from prompt ``a`` to prompt ``b`` (GLB), computed on demand
        and cached per model, prompts, mode and slider position."""
        import torch

        from att3d.mesh.extract import meshes_from_conditioning

        a, b, mode, label = self._interp_inputs(a, b, mode, label)
        k = self.slider_index(t)
        key = (label, a, b, mode, k)
        with self._lock:
            hit = self._frames.get(key)
        if hit is not None and (hit.glb is None or hit.glb.is_file()):
            return hit
        progress(0.1, "interpolating the text embeddings")
        model = self.cache.get(label)
        s = self.settings
        t0 = time.perf_counter()
        path, folder = self._path(label, a, b, mode)
        with torch.no_grad():
            cond = model.conditioning(path.index(torch.tensor([k], device=model.device)))
        progress(0.3, "field -> mesh")
        mesh = meshes_from_conditioning(model, cond, grid_resolution=s.grid_resolution, texture_size=s.texture_size,
                                        smooth_iterations=s.smooth_iterations)[0]
        result = self._write(mesh, f"frame {k:02d}", folder, "glb")
        result.seconds = time.perf_counter() - t0
        w = k / (s.slider_steps - 1)
        if result.glb is not None:
            result.message = (f"**{1 - w:.0%}** *{a}* + **{w:.0%}** *{b}* ({mode}): {result.seconds:.2f} s, "
                              f"{result.vertices:,} vertices.")
        with self._lock:
            if len(self._frames) > 256:
                self._frames.clear()
            self._frames[key] = result
        return result

    def interpolation_video(self, a: Any, b: Any, mode: Any, label: Any,
                            progress: ProgressFn = _no_progress) -> tuple[Path, float]:
        """An animation along the path a -> b (the camera orbits while the object morphs), volume-rendered in
        batches: (video path, seconds)."""
        from att3d.infer.interpolate import render_interpolation
        from att3d.infer.video import write_video

        a, b, mode, label = self._interp_inputs(a, b, mode, label)
        model = self.cache.get(label)
        s = self.settings
        progress(0.05, "rendering the animation")
        t0 = time.perf_counter()
        frames = render_interpolation(model, [a, b], frames=s.video_frames, mode=mode,
                                      resolution=s.video_resolution, orbit=True, progress=True)
        run = self.store.new_run("anim")
        video = write_video(frames, run / f"{file_stem(a + ' to ' + b)}.mp4", fps=s.video_fps)
        return self.store.check(video), time.perf_counter() - t0


def as_list(values: str | Sequence[str] | None) -> list[str]:
    """``None`` -> [], a string -> [it], else a list."""
    if values is None:
        return []
    return [values] if isinstance(values, str) else list(values)
