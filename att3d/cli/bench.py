"""``att3d bench TARGET``: run the speed benchmarks of :mod:`att3d.eval.bench`, print the Markdown report and
optionally write it (``--out FILE.md``) with the JSON beside it.

    att3d bench generate --baseline 1c8c525 --repeats 5 --out bench.md     # side by side with a release
    att3d bench scale --prompt-counts 64 1000 10000 100000 --out scale.md  # training at the prompt set's scale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from att3d.cli._args import CommandParser
from att3d.eval.bench import ALL, BENCHMARKS, BenchError
from att3d.utils.paths import DEFAULT_MODEL


def build_parser() -> CommandParser:
    p = CommandParser("bench")
    p.add_argument("target", metavar="TARGET", help=f"{', '.join(BENCHMARKS)} or all ({', '.join(ALL)})")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--out", default=None, metavar="FILE.md",
                   help="write the Markdown report here and the JSON next to it (default: print only)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads here and in every worker (default: all cores of this process)")
    p.add_argument("--baseline", default=None, metavar="REV",
                   help="generate, scale: also time this git revision (e.g. the previous release), checked out in "
                        "a worktree under .cache/bench-baseline/, side by side in alternating fresh processes")
    g = p.add_argument_group("generate")
    g.add_argument("--checkpoint", default=DEFAULT_MODEL, help=f"model folder (default: {DEFAULT_MODEL})")
    g.add_argument("--baseline-checkpoint", default=None, metavar="PATH",
                   help="with --baseline: the baseline's model folder, e.g. the previous release's model "
                        "(default: --checkpoint; a relative path is read in the baseline's worktree)")
    g.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], metavar="B", help="default: 1 16")
    g.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (default: 3)")
    g.add_argument("--prompts-per-round", type=int, default=8, metavar="K",
                   help="prompts a run times: K or more, in whole batches (default: 8, every shape once at batch 1)")
    g.add_argument("--resolution", type=int, default=96, help="density grid per axis (default: 96)")
    g.add_argument("--texture-size", type=int, default=256, help="default: 256")
    g.add_argument("--threshold", type=float, default=None, help="density threshold (default: the model's)")
    g.add_argument("--smooth", type=int, default=10, help="Taubin iterations (default: 10)")
    g.add_argument("--uv", default="box", help="UV atlas: box or xatlas (default: box)")
    g.add_argument("--format", default="glb", help="mesh file format (default: glb)")
    g.add_argument("--turntable", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the turntable video that att3d generate adds per prompt (default: on)")
    g.add_argument("--frames", type=int, default=48, help="turntable frames (default: 48)")
    g.add_argument("--turntable-resolution", type=int, default=256, help="turntable pixels (default: 256)")
    t = p.add_argument_group("train")
    t.add_argument("--experiment", default="quickstart", help="train config experiment (default: quickstart)")
    t.add_argument("--steps", type=int, default=5, help="timed training steps (default: 5)")
    t.add_argument("--train-batch-size", type=int, default=None, help="prompts per step (default: the config's)")
    t.add_argument("--train-resolution", type=int, default=None, help="render size (default: the config's)")
    t.add_argument("--backends", nargs="+", default=None,
                   help="renderer backends (default: torch cuda; cuda is skipped without CUDA)")
    t.add_argument("--prior", default=None,
                   help="auto (shipped, else tiny), tiny, or a prior folder (default: train auto, scale tiny)")
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more train config overrides")
    s = p.add_argument_group("scale (also --experiment, --steps, --prior, --set, --train-batch-size, ...)")
    s.add_argument("--prompt-counts", type=int, nargs="+", default=[64, 1000, 10000, 100000], metavar="N",
                   help="prompt set sizes (default: 64 1000 10000 100000; 100k embed for ~10 min on a small CPU "
                        "the first time)")
    s.add_argument("--embedding-cache", default=None, metavar="DIR",
                   help="embedding cache of the scale runs, one folder per N (default: ~/.cache/att3d/bench-scale)")
    s.add_argument("--fresh-cache", action="store_true",
                   help="empty the scale runs' cache folders first (start-up cold, then warm)")
    return p


def validate(args: argparse.Namespace) -> list[str]:
    """The benchmarks to run; a bad option is a one-line :class:`~att3d.eval.bench.BenchError`."""
    from att3d.infer.generate import FORMATS

    targets = list(ALL) if args.target == "all" else [args.target]
    if args.target != "all" and args.target not in BENCHMARKS:
        raise BenchError(f"unknown benchmark {args.target!r}; choose {', '.join(BENCHMARKS)} or all")
    checks = [("--repeats", args.repeats, 1), ("--prompts-per-round", args.prompts_per_round, 1),
              ("--warmup", args.warmup, 0), ("--steps", args.steps, 1),
              ("--resolution", args.resolution, 4), ("--texture-size", args.texture_size, 0),
              ("--smooth", args.smooth, 0), ("--frames", args.frames, 1),
              ("--turntable-resolution", args.turntable_resolution, 8)]
    checks += [("--batch-sizes", b, 1) for b in args.batch_sizes]
    checks += [("--prompt-counts", n, 1) for n in args.prompt_counts]
    if args.threads is not None:
        checks.append(("--threads", args.threads, 1))
    for name, value, low in checks:
        if value < low:
            raise BenchError(f"{name} must be >= {low}, got {value}")
    if args.format.lower() not in FORMATS:
        raise BenchError(f"unknown format {args.format!r}; choose one of {', '.join(FORMATS)}")
    args.format = args.format.lower()
    if args.baseline is not None and not set(targets) & {"generate", "scale"}:
        raise BenchError(f"--baseline is for generate and scale, not {args.target}")
    if args.baseline is not None and args.format != "glb":
        raise BenchError("--baseline times GLB files; drop --format")
    if args.baseline_checkpoint is not None and args.baseline is None:
        raise BenchError("--baseline-checkpoint needs --baseline REV")
    return targets


def main(argv: list[str] | None = None) -> int:
    """``att3d bench TARGET``: run benchmarks, print the Markdown report, optionally write it (and JSON)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    targets = validate(args)

    import torch

    from att3d.eval.bench import available_cores, machine_info, report
    from att3d.utils.devices import pick_device

    args.threads = args.threads or available_cores()
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # in-process benchmarks; the workers get the same
    try:
        device = pick_device(args.device)
        info = machine_info(device)
        results = {name: BENCHMARKS[name](args, device) for name in targets}
    finally:
        torch.set_num_threads(before)
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
