"""``att3d generate``: prompts -> mesh files and turntable videos with a trained model (one forward pass each)."""

from __future__ import annotations

import sys
import time

from att3d.cli._args import CommandParser
from att3d.infer.generate import FORMATS
from att3d.mesh.extract import UV_METHODS, GenerationError
from att3d.utils.paths import DEFAULT_MODEL


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
    from att3d.text.prompts import dedupe, read_prompt_file

    raw = list(args.prompts)
    if args.prompts_file:
        raw += read_prompt_file(args.prompts_file)
    if not raw:
        raise GenerationError("no prompts: give them as arguments or with --prompts-file")

    from att3d.infer.generate import format_table, write_outputs
    from att3d.model import check_prompts, generate_meshes, load
    from att3d.utils.devices import pick_device
    from att3d.utils.paths import resolve_model_folder
    from att3d.utils.timing import STAGES, StageTimer

    prompts = dedupe(check_prompts(raw))
    folder = resolve_model_folder(args.checkpoint)
    device = pick_device(args.device)
    model = load(folder, device=device)
    timer = StageTimer(sync=device.type == "cuda")
    t0 = time.perf_counter()
    meshes = generate_meshes(model, prompts, batch_size=args.batch_size, timer=timer, progress=not args.quiet,
                             grid_resolution=args.resolution, threshold=args.threshold,
                             texture_size=args.texture_size, smooth_iterations=args.smooth, uv_method=args.uv)
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
