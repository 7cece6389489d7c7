"""``att3d generate``: prompts -> mesh files and turntable videos with a trained model (one forward pass each).

Generation streams (:func:`att3d.infer.generate.generate_to_folder`): every batch of prompts is generated, written
(each file atomically) and dropped before the next starts, and its rows of the table are printed at once; memory
does not grow with the number of prompts. ``--out`` gets ``manifest.jsonl``, one line per written prompt (prompt,
file name stem, files). Existing files are never overwritten silently: a prompt whose files exist is an error
before any work, unless ``--skip-existing`` (continue an earlier run: complete prompts are skipped) or
``--overwrite`` is given. Ctrl-C (exit 130) or SIGTERM (exit 143) stop the run at once, except while a prompt's
files are being written (those are finished first): every finished prompt keeps its files and manifest line,
nothing is left half written, and the same command with ``--skip-existing`` continues.

A memory estimate of the request (:mod:`att3d.utils.resources`: the density grid of ``--resolution``, the texture
bake of ``--texture-size``, the turntables) is checked before the model loads; one that exceeds the available
memory (or ``--max-memory``) is refused with the estimate.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from att3d.cli._args import CommandParser, UsageError, add_max_memory
from att3d.infer.generate import FORMATS
from att3d.mesh.extract import DEFAULT_MAX_FACES, HEADS, SURFACES, UV_METHODS, GenerationError
from att3d.mesh.marching_cubes import METHODS as ISO_METHODS
from att3d.utils.paths import DEFAULT_MODEL

#: Widest prompt column of the printed table (longer prompts are cut there; manifest.jsonl has them whole).
PROMPT_COLUMN = 48


def build_parser() -> CommandParser:
    p = CommandParser("generate", epilog="Example: att3d generate \"a red cube\" \"a blue torus\" --out out/")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts to generate (quote each one)")
    p.add_argument("--prompts-file", metavar="FILE", help="more prompts, one per line (# comments)")
    p.add_argument("--out", default="out", metavar="DIR", help="output folder (default: out)")
    p.add_argument("--checkpoint", default=DEFAULT_MODEL, metavar="PATH",
                   help=f"model folder (default: {DEFAULT_MODEL})")
    p.add_argument("--format", default="glb", metavar="FMT", help="mesh format: glb, obj or ply (default: glb)")
    p.add_argument("--resolution", type=int, default=96, help="density grid samples per axis (default: 96)")
    p.add_argument("--texture-size", type=int, default=256, help="texture size; 0: vertex colours only (default: 256)")
    p.add_argument("--threshold", type=float, default=None,
                   help="density threshold of the surface (default: the model's extraction threshold)")
    p.add_argument("--smooth", type=int, default=10, help="Taubin smoothing iterations (default: 10)")
    p.add_argument("--uv", default="box", choices=UV_METHODS, help="UV atlas: box (fast) or xatlas (slow)")
    p.add_argument("--head", default="auto", choices=HEADS,
                   help="surface: mesh (the mesh stage's surface, coloured where it trained), nerf (the density's "
                        "iso-surface), "
                        "auto (mesh for a model trained by the mesh stage; default)")
    p.add_argument("--iso", default="lewiner", choices=ISO_METHODS,
                   help="iso-surface algorithm: lewiner (marching cubes, fewer triangles; default) or tets (marching "
                        "tetrahedra, the mesh stage's own extraction)")
    p.add_argument("--faces", type=int, default=DEFAULT_MAX_FACES,
                   help=f"face budget (quadric decimation before texturing; 0: no limit; default: {DEFAULT_MAX_FACES})")
    p.add_argument("--no-solid", action="store_true", help="keep hidden inner cavities (default: filled, one solid)")
    p.add_argument("--surface", default="opacity", choices=SURFACES,
                   help="opacity: the density's solid trimmed to what the field's renders show (default); "
                        "density: the iso-surface at --threshold alone")
    p.add_argument("--no-turntable", action="store_true", help="do not render turntable videos")
    p.add_argument("--frames", type=int, default=48, help="turntable frames (default: 48)")
    p.add_argument("--turntable-resolution", type=int, default=256, help="turntable size in pixels (default: 256)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default: 16)")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--skip-existing", action="store_true",
                          help="continue an earlier run into --out: prompts whose files are there are skipped")
    existing.add_argument("--overwrite", action="store_true",
                          help="replace the files of prompts that --out holds already (default: refuse)")
    add_max_memory(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def mesh_options(args: Any) -> dict[str, Any]:
    """The command line's options of :func:`att3d.model.generate_meshes` (``**kw`` of
    :func:`~att3d.mesh.extract.meshes_from_conditioning`): the one place where they become its arguments."""
    if args.faces < 0:
        raise UsageError(f"--faces must be >= 0 (0: no limit), got {args.faces}")
    return {"grid_resolution": args.resolution, "threshold": args.threshold, "texture_size": args.texture_size,
            "smooth_iterations": args.smooth, "uv_method": args.uv, "head": args.head, "max_faces": args.faces,
            "solid": not args.no_solid, "surface": args.surface, "iso_method": args.iso}


def memory_estimate(args: Any, options: dict[str, Any], batch: int):
    """The memory estimate of a run (:func:`att3d.utils.resources.mesh_estimate`) from its options."""
    from att3d.utils.resources import mesh_estimate

    turntable = 0 if args.no_turntable else args.frames
    return mesh_estimate(options["grid_resolution"], options["texture_size"], batch, turntable,
                         args.turntable_resolution)


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt: no ``except Exception`` swallows it)."""


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM as exceptions, held back while a prompt's files are written.

    Inside ``with StopSignals() as stop``, SIGINT raises :class:`KeyboardInterrupt` and SIGTERM :class:`Terminated`
    in the main thread, at once, unless inside ``with stop.guard():`` (one prompt's video, mesh and manifest line):
    there the signal is held until the guard ends, so that an interrupted run never leaves a prompt half written or
    written but not recorded. A second signal while one is held raises at once (the temporary file being written
    is removed). Outside the main thread it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._depth = 0
        self._pending: int | None = None
        self._previous: dict[int, Any] = {}

    @staticmethod
    def _exception(signum: int) -> BaseException:
        return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()

    def _handler(self, signum: int, frame: object) -> None:
        if self._depth > 0 and self._pending is None:
            self._pending = signum
            return
        raise self._exception(signum)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Hold the signals back while inside (see the class docstring)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self._pending is not None:
                signum, self._pending = self._pending, None
                raise self._exception(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


class _Table:
    """The printed table, one prompt's lines at a time: prompt, file, vertices, faces, seconds."""

    def __init__(self, prompt_width: int, file_width: int):
        self.widths = [max(6, prompt_width), max(4, file_width), 8, 8, 7]

    def _line(self, cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, self.widths))
                         ).rstrip()

    def header(self) -> str:
        return self._line(("prompt", "file", "vertices", "faces", "seconds")) + "\n" + "  ".join(
            "-" * w for w in self.widths)

    def row(self, row: dict[str, Any]) -> str:
        from att3d.text.prompts import shorten

        files = [str(f) for f in row["files"]] or [f"(nothing written: {row['note']})"]
        lines = [self._line((shorten(row["prompt"], self.widths[0]), files[0], str(row["vertices"]),
                             str(row["faces"]), f"{row['seconds']:.2f}"))]
        lines += [self._line(("", f, "", "", "")) for f in files[1:]]
        return "\n".join(lines)


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
    from att3d.text.prompts import dedupe, normalize_prompts, read_prompt_file

    raw = normalize_prompts(args.prompts) if args.prompts else []
    if args.prompts_file:
        raw += read_prompt_file(args.prompts_file)
    if not raw:
        raise GenerationError("no prompts: give them as arguments or with --prompts-file")
    prompts = dedupe(raw)

    from att3d.infer.generate import OutputFolder
    from att3d.utils.devices import pick_device
    from att3d.utils.paths import resolve_model_folder
    from att3d.utils.resources import check_memory

    options = mesh_options(args)
    folder_path = resolve_model_folder(args.checkpoint)
    device = pick_device(args.device)
    mode = "skip" if args.skip_existing else "overwrite" if args.overwrite else "error"
    folder = OutputFolder(args.out, format=fmt, turntable=not args.no_turntable, frames=args.frames,
                          turntable_resolution=args.turntable_resolution, device=device, exists=mode, manifest=True,
                          hint="add --skip-existing to continue that run, or --overwrite to replace its files")
    plans = folder.plan(prompts)  # names of every prompt, and existing files refused, before any work
    todo = [p for p in plans if not p.skip]
    check_memory(memory_estimate(args, options, min(args.batch_size, max(len(todo), 1))), args.max_memory, device)
    if len(todo) < len(plans):
        print(f"skipping {len(plans) - len(todo)} of {len(plans)} prompts: their files are in {folder.out}/ already")
    if not todo:
        print("nothing left to generate")
        return 0
    return _run(args, folder, todo, options, folder_path, device)


def _run(args: Any, folder: Any, todo: list, options: dict[str, Any], model_folder: Any, device: Any) -> int:
    """Load the model and stream the planned prompts into ``folder``, printing each prompt's rows as it is done."""
    from tqdm import tqdm

    from att3d.infer.generate import generate_to_folder
    from att3d.model import load
    from att3d.utils.timing import STAGES, StageTimer

    model = load(model_folder, device=device)
    timer = StageTimer(sync=device.type == "cuda")
    folder.timer = timer
    table = _Table(min(PROMPT_COLUMN, max(len(p.prompt) for p in todo)),
                   max(len(str(folder.mesh_path(p.stem))) for p in todo))
    done = empty = 0
    first_note = ""
    t0 = time.perf_counter()
    print(table.header(), flush=True)
    try:
        with StopSignals() as stop, folder, tqdm(total=len(todo), unit="prompt", desc="generate",
                                                 disable=args.quiet or len(todo) < 2) as bar:
            folder.guard = stop.guard
            for row in generate_to_folder(model, todo, folder, batch_size=args.batch_size, timer=timer, **options):
                done += 1
                if row["empty"]:
                    empty += 1
                    first_note = first_note or row["note"]
                bar.update(1)
                tqdm.write(table.row(row))
    except (KeyboardInterrupt, Terminated) as e:
        name, code = ("SIGTERM", 143) if isinstance(e, Terminated) else ("Ctrl-C", 130)
        print(f"att3d: interrupted by {name}: {done} of {len(todo)} prompts done, their files are in {folder.out}/; "
              "the same command with --skip-existing continues", file=sys.stderr)
        return code
    total = time.perf_counter() - t0
    print(f"{done} prompt{'s' if done != 1 else ''} in {total:.2f}s on {device}; per prompt: "
          f"{timer.summary(STAGES, per=done)}"
          + (f", turntable {timer.seconds.get('turntable', 0.0) / done:.2f}s" if not args.no_turntable else ""))
    if empty:
        print(f"att3d: error: {empty} of {done} prompts gave no surface ({first_note})", file=sys.stderr)
        return 1
    return 0
