"""Refinement from the amortized model vs optimisation from scratch, on the held-out shapes64 prompts.

For each prompt (default: the 8 held-out captions, ``att3d.world.shapes.heldout_captions()``) it runs
N SDS steps twice with the same prior, architecture, settings and seed:

- **amortized**: :func:`att3d.train.refine.refine`, starting from the trained model's output;
- **scratch**: :func:`att3d.train.refine.from_scratch`, the DreamFusion-style baseline from a fresh
  initialisation of the same architecture;

each with its own SDS schedule (``--{amortized,scratch}-{guidance-scale,t-max,lr-final}``): the refinement
starts from the right shape and only needs the lower noise levels, the baseline must first form the shape;

and scores the object every k steps (and at step 0) with WORLD.md's metrics (volume IoU on 64^3,
colour error and silhouette IoU in the 8 evaluation views). It writes, in ``--out``:

- ``refine_curve.json``: every run's history (written after each run; ``--resume`` skips finished runs);
- ``refine_curve.md``: the mean over prompts of each metric at each evaluated step, for both starts;
- ``refine_curve.png``: metric vs steps, both starts, mean over prompts (shaded: min..max over prompts).

Budget (one core of the 2-core CPU, default settings: 32x32 renders, 4 views per step, 64x64 evaluation
renders): about 0.3 s per SDS step and ~2 s per evaluation, so the default 8 prompts x 2 starts x 200
steps with an evaluation every 25 steps take about 20 minutes (measured: 61 s of optimisation per run).
The command that produces the issue's numbers, once the trained model and prior are in ``assets/``::

    python scripts/refine_curve.py --checkpoint assets/att3d-shapes64 --prior assets/shapes-prior \\
        --steps 200 --every 25 --amortized-guidance-scale 5.0 --amortized-guidance-scale-low 2.0 \\
        --amortized-low-t 0.5 --amortized-lr-final 0.1 --scratch-guidance-scale 5.0 --out docs/results/refine_curve

(the amortized schedule is ``configs/guidance/shapes.yaml``'s ``refine:`` block, which ``att3d refine``
uses; the baseline keeps the amortized model's training schedule: guidance 5, constant learning rate).

A quick check (about 1-2 minutes)::

    python scripts/refine_curve.py --prompts "a red sphere" "a orange cube" --steps 10 --every 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("volume_iou", "colour_error", "silhouette_iou")
LABELS = {"volume_iou": "volume IoU (higher is better)", "colour_error": "colour error (lower is better)",
          "silhouette_iou": "silhouette IoU (higher is better)"}
STARTS = ("amortized", "scratch")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="assets/att3d-shapes64", help="trained amortized model folder")
    ap.add_argument("--prior", default="assets/shapes-prior", help="shapes prior folder")
    ap.add_argument("--guidance", default="shapes", help="guidance config (configs/guidance/NAME.yaml)")
    ap.add_argument("--prompts", nargs="+", default=None, help="prompts (default: the 8 held-out shapes64 captions)")
    ap.add_argument("--steps", type=int, default=200, help="SDS steps per run")
    ap.add_argument("--every", type=int, default=25, help="evaluate every k steps")
    ap.add_argument("--mode", choices=("params", "model"), default="params")
    ap.add_argument("--lr", type=float, default=None)
    # Each start has its own SDS schedule (both default to the guidance config's): refinement starts from an
    # object of the right shape and needs only detail-level noise, the baseline must first form the shape.
    for start in STARTS:
        ap.add_argument(f"--{start}-guidance-scale", type=float, default=None,
                        help=f"{start} start: classifier-free guidance scale (default: the guidance config's)")
        ap.add_argument(f"--{start}-guidance-scale-low", type=float, default=None,
                        help=f"{start} start: guidance scale of the low-noise steps (t <= low-t T; default: none)")
        ap.add_argument(f"--{start}-low-t", type=float, default=None,
                        help=f"{start} start: boundary of the low-noise guidance scale, fraction of T (default 0.5)")
        ap.add_argument(f"--{start}-t-max", type=float, default=None,
                        help=f"{start} start: upper end of the SDS timestep range, fraction of T (default: config)")
        ap.add_argument(f"--{start}-lr-final", type=float, default=1.0,
                        help=f"{start} start: learning rates decay (cosine) to this fraction at the end (default 1)")
    ap.add_argument("--resolution", type=int, default=32, help="render resolution of the SDS steps")
    ap.add_argument("--batch-views", type=int, default=4)
    ap.add_argument("--eval-resolution", type=int, default=64, help="resolution of the evaluation renders")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="outputs/refine_curve")
    ap.add_argument("--resume", action="store_true", help="keep finished runs of an earlier refine_curve.json")
    return ap.parse_args(argv)


def summarise(runs: dict[str, dict[str, Any]], prompts: list[str]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """start -> metric -> {"steps", "mean", "min", "max"} over the prompts (steps common to all prompts)."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for start in STARTS:
        hists = [runs[f"{start}|{p}"]["evals"] for p in prompts if f"{start}|{p}" in runs]
        if not hists:
            continue
        steps = sorted(set.intersection(*[{e["step"] for e in h} for h in hists]))
        out[start] = {}
        for m in METRICS:
            vals = np.array([[next(e[m] for e in h if e["step"] == s) for s in steps] for h in hists])
            out[start][m] = {"steps": steps, "mean": vals.mean(0).tolist(), "min": vals.min(0).tolist(),
                             "max": vals.max(0).tolist(), "prompts": len(hists)}
    return out


def markdown(summary: dict, seconds: dict[str, float]) -> str:
    starts = [s for s in STARTS if s in summary]
    if not starts:
        return "no finished runs\n"
    steps = summary[starts[0]]["volume_iou"]["steps"]
    head = "| step | " + " | ".join(f"{s} {m.replace('_', ' ')}" for m in METRICS for s in starts) + " |"
    lines = [head, "|---:|" + "---:|" * (len(METRICS) * len(starts))]
    for i, step in enumerate(steps):
        cells = []
        for m in METRICS:
            for s in starts:
                data = summary[s][m]
                cells.append(f"{data['mean'][i]:.3f}" if step in data["steps"] else "")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    n = summary[starts[0]]["volume_iou"]["prompts"]
    lines.append("")
    lines.append(f"Mean over {n} prompts. Optimisation time per run (mean): "
                 + ", ".join(f"{s} {seconds.get(s, float('nan')):.0f} s" for s in starts) + ".")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.4))
    colours = {"amortized": "tab:blue", "scratch": "tab:orange"}
    names = {"amortized": "from the amortized model", "scratch": "from scratch"}
    for ax, m in zip(axes, METRICS):
        for s in STARTS:
            if s not in summary:
                continue
            d = summary[s][m]
            ax.plot(d["steps"], d["mean"], marker="o", ms=3, color=colours[s], label=names[s])
            ax.fill_between(d["steps"], d["min"], d["max"], color=colours[s], alpha=0.15)
        ax.set_xlabel("SDS steps")
        ax.set_title(LABELS[m], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from att3d.config import background_of, build_guidance, guidance_config
    from att3d.eval.refine_eval import shapes_eval_fn
    from att3d.model import load
    from att3d.train.refine import SDS_KEYS, from_scratch, refine
    from att3d.utils.devices import pick_device
    from att3d.utils.paths import resolve_path
    from att3d.world.shapes import heldout_captions

    if args.steps < 1 or args.every < 1:
        print("--steps and --every must be positive", file=sys.stderr)
        return 2
    prompts = list(args.prompts or heldout_captions())
    device = pick_device(args.device)
    model = load(resolve_path(args.checkpoint), device=device)
    schedules = {start: {k: getattr(args, f"{start}_{k}") for k in ("guidance_scale", "guidance_scale_low", "low_t",
                                                                     "t_max", "lr_final")}
                 for start in STARTS}
    gcfg = guidance_config(args.guidance, args.prior)
    base, background = build_guidance(gcfg, device), background_of(gcfg)  # one prior, shared by both starts
    guidances = {start: base.replace(**{k: sch[k] for k in SDS_KEYS if sch[k] is not None})
                 for start, sch in schedules.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result_path = out / "refine_curve.json"
    settings = {k: getattr(args, k) for k in ("checkpoint", "prior", "guidance", "steps", "every", "mode", "lr",
                                              "resolution", "batch_views", "eval_resolution", "seed")}
    settings["schedules"] = schedules
    runs: dict[str, dict[str, Any]] = {}
    if args.resume and result_path.is_file():
        old = json.loads(result_path.read_text())
        same = {k: v for k, v in old.get("settings", {}).items() if k != "schedules"} == \
            {k: v for k, v in settings.items() if k != "schedules"}
        kept = [s for s in STARTS if same and old["settings"].get("schedules", {}).get(s) == schedules[s]]
        runs = {k: r for k, r in old.get("runs", {}).items() if r["start"] in kept}
        if len(kept) < len(STARTS):
            print(f"settings differ from the earlier run: keeping the finished runs of {kept or 'neither start'}",
                  file=sys.stderr)
    kwargs = dict(mode=args.mode, lr=args.lr, resolution=args.resolution, batch_views=args.batch_views,
                  seed=args.seed, eval_every=args.every, background=background)
    t_all = time.time()
    for i, prompt in enumerate(prompts):
        eval_fn = shapes_eval_fn(prompt, resolution=args.eval_resolution)
        for start in STARTS:
            key = f"{start}|{prompt}"
            if key in runs:
                continue
            print(f"[{i + 1}/{len(prompts)}] {prompt!r} from {start}", flush=True)
            fn = refine if start == "amortized" else from_scratch
            sch = schedules[start]
            _, hist = fn(model, prompt, args.steps, guidances[start], eval_fn=eval_fn, t_max=sch["t_max"],
                         lr_final=sch["lr_final"], **kwargs)
            runs[key] = {"prompt": prompt, "start": start, "evals": hist.evals, "seconds": hist.seconds,
                         "final_loss": hist.train[-1]["loss"] if hist.train else None}
            first, last = hist.evals[0], hist.evals[-1]
            print("    " + ", ".join(f"{m} {first[m]:.3f} -> {last[m]:.3f}" for m in METRICS)
                  + f" ({hist.seconds:.0f} s)", flush=True)
            result_path.write_text(json.dumps({"settings": settings, "prompts": prompts, "runs": runs}, indent=1)
                                   + "\n")
    summary = summarise(runs, prompts)
    seconds = {s: float(np.mean([r["seconds"] for r in runs.values() if r["start"] == s]))
               for s in STARTS if any(r["start"] == s for r in runs.values())}
    result_path.write_text(json.dumps({"settings": settings, "prompts": prompts, "runs": runs, "summary": summary,
                                       "seconds": seconds}, indent=1) + "\n")
    table = markdown(summary, seconds)
    (out / "refine_curve.md").write_text(table)
    plot(summary, out / "refine_curve.png",
         f"{len(prompts)} prompts, {args.mode} mode, {args.resolution}px x {args.batch_views} views per step")
    print(table, end="")
    print(f"wrote {result_path}, {out / 'refine_curve.md'}, {out / 'refine_curve.png'} "
          f"({time.time() - t_all:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
