"""``att3d bench TARGET``: run the speed benchmarks of :mod:`att3d.eval.bench`, print the Markdown report and
optionally write it (``--out FILE.md``) with the JSON beside it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from att3d.cli._args import CommandParser
from att3d.eval.bench import BENCHMARKS, BenchError
from att3d.utils.paths import DEFAULT_MODEL


def build_parser() -> CommandParser:
    p = CommandParser("bench")
    p.add_argument("target", metavar="TARGET", help=f"{', '.join(BENCHMARKS)} or all")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--out", default=None, metavar="FILE.md",
                   help="write the Markdown report here and the JSON next to it (default: print only)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("generate")
    g.add_argument("--checkpoint", default=DEFAULT_MODEL, help=f"model folder (default: {DEFAULT_MODEL})")
    g.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], metavar="B", help="default: 1 16")
    g.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (default: 3)")
    g.add_argument("--resolution", type=int, default=96, help="density grid per axis (default: 96)")
    g.add_argument("--texture-size", type=int, default=256, help="default: 256")
    g.add_argument("--threshold", type=float, default=None, help="density threshold (default: the model's)")
    g.add_argument("--smooth", type=int, default=10, help="Taubin iterations (default: 10)")
    g.add_argument("--uv", default="box", help="UV atlas: box or xatlas (default: box)")
    g.add_argument("--format", default="glb", help="mesh file format (default: glb)")
    t = p.add_argument_group("train")
    t.add_argument("--experiment", default="quickstart", help="train config experiment (default: quickstart)")
    t.add_argument("--steps", type=int, default=5, help="timed training steps (default: 5)")
    t.add_argument("--train-batch-size", type=int, default=None, help="prompts per step (default: the config's)")
    t.add_argument("--train-resolution", type=int, default=None, help="render size (default: the config's)")
    t.add_argument("--backends", nargs="+", default=None,
                   help="renderer backends (default: torch cuda; cuda is skipped without CUDA)")
    t.add_argument("--prior", default="auto", help="auto (shipped, else tiny), tiny, or a prior folder")
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more train config overrides")
    return p


def validate(args: argparse.Namespace) -> list[str]:
    """The benchmarks to run; a bad option is a one-line :class:`~att3d.eval.bench.BenchError`."""
    from att3d.infer.generate import FORMATS

    targets = list(BENCHMARKS) if args.target == "all" else [args.target]
    if args.target != "all" and args.target not in BENCHMARKS:
        raise BenchError(f"unknown benchmark {args.target!r}; choose {', '.join(BENCHMARKS)} or all")
    checks = [("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0), ("--steps", args.steps, 1),
              ("--resolution", args.resolution, 4), ("--texture-size", args.texture_size, 0),
              ("--smooth", args.smooth, 0)]
    checks += [("--batch-sizes", b, 1) for b in args.batch_sizes]
    for name, value, low in checks:
        if value < low:
            raise BenchError(f"{name} must be >= {low}, got {value}")
    if args.format.lower() not in FORMATS:
        raise BenchError(f"unknown format {args.format!r}; choose one of {', '.join(FORMATS)}")
    args.format = args.format.lower()
    return targets


def main(argv: list[str] | None = None) -> int:
    """``att3d bench TARGET``: run benchmarks, print the Markdown report, optionally write it (and JSON)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    targets = validate(args)

    from att3d.eval.bench import machine_info, report
    from att3d.utils.devices import pick_device

    device = pick_device(args.device)
    info = machine_info(device)
    results = {name: BENCHMARKS[name](args, device) for name in targets}
    text = report(info, results)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        data = {"machine": info, "benchmarks": {k: {kk: vv for kk, vv in v.items() if kk != "markdown"}
                                                 for k, v in results.items()}}
        json_path = out.with_suffix(".json")
        json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"wrote {out} and {json_path}")
    return 0
