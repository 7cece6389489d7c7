"""Quality against compute: amortized training vs per-prompt optimisation on shapes64 (ATT3D, Fig. 6).

Compute is counted, as in ATT3D, in **rendered frames per prompt** (each frame is one image that
receives the prior's score-distillation gradient):

- amortized training (one camera per prompt per step) at step s: ``s * batch_size / num_train_prompts``
  (shapes64: ``s * 8 / 56``; 4000 steps = 571 frames per prompt);
- per-prompt optimisation with V views per step at step s: ``s * V`` (default V = 4).

Two curves, both scored with WORLD.md's metrics (volume IoU on the 64^3 voxel centres from the
field's occupancy, colour error and silhouette IoU in the 8 evaluation views at 64 px, retrieval among
the 64 objects):

(a) **amortized**: every snapshot folder ``--snapshots/step-XXXXXXX`` (a model folder, ``att3d.load``)
    is scored by :func:`att3d.eval.model_eval.evaluate` on ``--prompts-per-split`` training and
    held-out prompts (evenly spaced over each split; 0: all 56 + 8);
(b) **per-prompt**: for ``--scratch-prompts-per-split`` prompts of each split (evenly spaced among the
    amortized ones), :func:`att3d.train.refine.from_scratch` (DreamFusion-style: a fresh initialisation
    of the amortized model's architecture, the same prior, 32 px renders) runs ``--steps`` SDS steps
    and is scored every ``--every`` steps.

It writes into ``--out``: ``compute_quality.json`` (every unit's raw scores, the curves and the
answers), ``compute_quality.md`` (tables) and ``compute_quality.png`` (volume IoU and colour error vs
frames per prompt, log x, both methods, training and held-out prompts), and answers the issue's two
questions:

1. **Times fewer frames**: per split and metric, the per-prompt runs' final mean score is the target;
   the amortized curve on the same prompts is interpolated (linearly in log frames, first crossing)
   to the frames per prompt where it reaches the target; the answer is
   ``per-prompt frames / amortized frames``. "not reached" when the amortized curve never gets there;
   a lower bound (``>=``) when its first snapshot already does.
2. **Held-out / training quality** at the last snapshot: ``heldout / train`` of volume IoU, silhouette
   IoU and retrieval, and of colour accuracy ``1 - colour error``.

The results file is written after every unit (one snapshot's evaluation, one prompt's per-prompt run);
``--resume`` keeps the finished units and runs only the rest (new snapshots included, so the curve can
be extended while training goes on). ``--parts amortized`` / ``--parts scratch`` run one half.

Budget (2-core CPU, one thread; measured: ~1.5 s per prompt for an evaluation, 0.3-0.7 s per SDS step of
4 views at 32 px, ~2 s per per-prompt evaluation): with the defaults (16 snapshots of 4000 steps, 8 + 8
prompts per snapshot, 2 + 2 prompts optimised for 500 steps with 11 evaluations each):

- amortized: 16 snapshots x 16 prompts x 1.5 s = ~6.5 CPU minutes (all 64 prompts: ~26 minutes);
- per-prompt: 4 runs x (500 x 0.5 s + 11 x 2 s) = ~18 CPU minutes (range 12-25);
- about 25 CPU minutes in all; a GPU takes a few minutes.

The command for the issue's numbers (once training has written its snapshots)::

    python scripts/compute_quality.py --snapshots runs/shapes64_snapshots --prior assets/shapes-prior \\
        --prompts-per-split 8 --scratch-prompts-per-split 2 --steps 500 --every 50 \\
        --out outputs/compute_quality --resume

A quick check (about 2 minutes): ``--prompts-per-split 1 --scratch-prompts-per-split 1 --steps 10 --every 5``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "heldout")
#: Metrics of both curves; those of :data:`PLOTTED` are plotted and answered.
METRICS = ("volume_iou", "colour_error", "silhouette_iou", "retrieval_accuracy")
PLOTTED = ("volume_iou", "colour_error")
HIGHER_IS_BETTER = {"volume_iou": True, "colour_error": False, "silhouette_iou": True, "retrieval_accuracy": True}
LABELS = {"volume_iou": "volume IoU (higher is better)", "colour_error": "colour error (lower is better)",
          "silhouette_iou": "silhouette IoU", "retrieval_accuracy": "retrieval accuracy"}
SHORT = {"volume_iou": "volume IoU", "colour_error": "colour error", "silhouette_iou": "silhouette IoU",
         "retrieval_accuracy": "retrieval"}
SNAPSHOT_RE = re.compile(r"^step-(\d+)$")
RESULTS_NAME = "compute_quality.json"


class ComputeQualityError(Exception):
    """A setting or input that this benchmark cannot use (printed as one line, exit code 2)."""


# ---------------------------------------------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------------------------------------------

def amortized_frames_per_prompt(step: int, batch_size: int, num_prompts: int) -> float:
    """Frames per prompt rendered by amortized training after ``step`` steps of ``batch_size`` prompts (one view
    each) drawn from ``num_prompts`` training prompts: ``step * batch_size / num_prompts``."""
    if batch_size <= 0 or num_prompts <= 0:
        raise ValueError(f"batch_size and num_prompts must be positive, got {batch_size}, {num_prompts}")
    return step * batch_size / num_prompts


def per_prompt_frames(step: int, views_per_step: int) -> float:
    """Frames rendered by per-prompt optimisation after ``step`` steps of ``views_per_step`` views."""
    if views_per_step <= 0:
        raise ValueError(f"views_per_step must be positive, got {views_per_step}")
    return float(step * views_per_step)


def evenly_spaced(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items spread evenly over ``items`` (the centres of n equal bins), in order; all when n <= 0 or n >= len."""
    if n <= 0 or n >= len(items):
        return list(items)
    return [items[(2 * i + 1) * len(items) // (2 * n)] for i in range(n)]


def frames_to_reach(frames: Sequence[float], values: Sequence[float], target: float,
                    higher_is_better: bool = True) -> dict[str, Any]:
    """Where a quality curve first reaches ``target``.

    The points are taken in order of increasing frames (non-finite values skipped). At the first point
    that reaches the target (``>=`` when higher is better, else ``<=``), the frames are interpolated
    between it and the point before, linearly in log frames (linearly when the earlier point is at 0
    frames).

    Returns:
        ``reached`` (bool), ``frames`` (float or None when not reached), ``at_first_point`` (the first point
        already reaches the target: ``frames`` is then an upper bound of the true crossing), ``best`` (the
        curve's best value).
    """
    pts = sorted((float(x), float(y)) for x, y in zip(frames, values) if math.isfinite(float(y)))
    if not pts:
        return {"reached": False, "frames": None, "at_first_point": False, "best": None}
    sign = 1.0 if higher_is_better else -1.0
    best = max(y * sign for _, y in pts) * sign
    for i, (x, y) in enumerate(pts):
        if sign * (y - target) < 0:
            continue
        if i == 0:
            return {"reached": True, "frames": x, "at_first_point": True, "best": best}
        x0, y0 = pts[i - 1]
        t = 1.0 if y == y0 else (target - y0) / (y - y0)
        t = min(max(t, 0.0), 1.0)
        if x0 > 0 and x > 0:
            xf = math.exp(math.log(x0) + t * (math.log(x) - math.log(x0)))
        else:
            xf = x0 + t * (x - x0)
        return {"reached": True, "frames": xf, "at_first_point": False, "best": best}
    return {"reached": False, "frames": None, "at_first_point": False, "best": best}


def times_fewer(per_prompt_frames_final: float, reach: dict[str, Any]) -> float | None:
    """``per-prompt frames / amortized frames`` at the crossing; None when not reached (or at 0 frames)."""
    if not reach["reached"] or not reach["frames"]:
        return None
    return per_prompt_frames_final / reach["frames"]


def quality(metric: str, value: float) -> float:
    """A score where higher is better: the metric itself, or ``1 - colour error``."""
    return value if HIGHER_IS_BETTER[metric] else 1.0 - value


def heldout_fraction(train: dict[str, float], heldout: dict[str, float]) -> dict[str, dict[str, float | None]]:
    """Held-out quality as a fraction of training-prompt quality, per metric (colour: of ``1 - colour error``)."""
    out: dict[str, dict[str, float | None]] = {}
    for m in METRICS:
        if m not in train or m not in heldout:
            continue
        qt, qh = quality(m, train[m]), quality(m, heldout[m])
        out[m] = {"train": train[m], "heldout": heldout[m], "fraction": qh / qt if qt > 0 else None}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------------------------------

def find_snapshots(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the model folders ``step-XXXXXXX`` (holding a ``model_config.json``), by step."""
    from att3d.model import CONFIG_NAME

    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = SNAPSHOT_RE.match(p.name)
        if m and (p / CONFIG_NAME).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _mean_rows(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    out = {m: float(np.mean([float(r[m]) for r in rows])) for m in METRICS if rows and m in rows[0]}
    if rows and "retrieved" in rows[0]:
        out["retrieval_accuracy"] = float(np.mean([float(r["retrieved"]) for r in rows]))
    return out


def amortized_curve(units: dict[str, dict[str, Any]], batch_size: int, num_train: int,
                    prompts: dict[str, Sequence[str]] | None = None) -> dict[str, dict[str, Any]]:
    """split -> ``steps``, ``frames``, ``prompts`` and one list per metric (mean over the split's prompts).

    Args:
        units: snapshot name -> ``{"step", "per_prompt": rows of model_eval.evaluate}``.
        prompts: split -> prompts to average over (default: every scored prompt of the split).
    """
    ordered = sorted(units.values(), key=lambda u: u["step"])
    out: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        curve: dict[str, Any] = {"steps": [], "frames": [], "prompts": 0, **{m: [] for m in METRICS}}
        for u in ordered:
            rows = [r for r in u["per_prompt"] if r["split"] == split
                    and (prompts is None or r["prompt"] in set(prompts.get(split, ())))]
            if not rows:
                continue
            mean = _mean_rows(rows)
            curve["steps"].append(u["step"])
            curve["frames"].append(amortized_frames_per_prompt(u["step"], batch_size, num_train))
            curve["prompts"] = len(rows)
            for m in METRICS:
                curve[m].append(mean[m])
        if curve["steps"]:
            out[split] = curve
    return out


def scratch_curve(units: dict[str, dict[str, Any]], views_per_step: int) -> dict[str, dict[str, Any]]:
    """split -> ``steps``, ``frames``, ``prompts``, one list per metric: the mean over the split's per-prompt runs at
    the evaluation steps common to all of them."""
    out: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        runs = [u for u in units.values() if u["split"] == split and u["evals"]]
        if not runs:
            continue
        steps = sorted(set.intersection(*[{e["step"] for e in u["evals"]} for u in runs]))
        curve: dict[str, Any] = {"steps": steps, "frames": [per_prompt_frames(s, views_per_step) for s in steps],
                                 "prompts": len(runs)}
        for m in METRICS:
            key = "retrieved" if m == "retrieval_accuracy" else m
            curve[m] = [float(np.mean([next(e[key] for e in u["evals"] if e["step"] == s) for u in runs]))
                        for s in steps]
        out[split] = curve
    return out


def answers(amortized: dict[str, dict[str, Any]], matched: dict[str, dict[str, Any]],
            scratch: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's two answers from the curves (see the module docstring)."""
    ratio: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        if split not in scratch or not scratch[split]["steps"]:
            continue
        curve = matched.get(split) or amortized.get(split)
        if not curve:
            continue
        ratio[split] = {}
        for m in PLOTTED:
            target = scratch[split][m][-1]
            final_frames = scratch[split]["frames"][-1]
            reach = frames_to_reach(curve["frames"], curve[m], target, HIGHER_IS_BETTER[m])
            ratio[split][m] = {"per_prompt_final": target, "per_prompt_frames": final_frames,
                               "per_prompt_prompts": scratch[split]["prompts"], "amortized_prompts": curve["prompts"],
                               **{f"amortized_{k}": v for k, v in reach.items()},
                               "times_fewer": times_fewer(final_frames, reach)}
    fraction: dict[str, Any] = {}
    for name, curves in (("amortized", amortized), ("per_prompt", scratch)):
        if all(s in curves for s in SPLITS):
            last = {s: {m: curves[s][m][-1] for m in METRICS} for s in SPLITS}
            fraction[name] = {"step": curves["train"]["steps"][-1], **heldout_fraction(last["train"], last["heldout"])}
    return {"frames_ratio": ratio, "heldout_fraction": fraction}


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------

def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def curve_table(curves: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per evaluated step (union over splits), the metrics of each split."""
    splits = [s for s in SPLITS if s in curves]
    if not splits:
        return "no results\n"
    steps = sorted({s for sp in splits for s in curves[sp]["steps"]})
    frames = {s: f for sp in splits for s, f in zip(curves[sp]["steps"], curves[sp]["frames"])}
    head = "| step | frames / prompt | " + " | ".join(f"{sp} {SHORT[m]}" for sp in splits for m in METRICS) + " |"
    lines = [head, "|---:|---:|" + "---:|" * (len(splits) * len(METRICS))]
    for s in steps:
        cells = []
        for sp in splits:
            c = curves[sp]
            i = c["steps"].index(s) if s in c["steps"] else None
            cells += [_fmt(c[m][i]) if i is not None else "" for m in METRICS]
        lines.append(f"| {s} | {frames[s]:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def answers_markdown(ans: dict[str, Any]) -> str:
    lines = ["### Frames per prompt to reach the per-prompt final quality", "",
             "| split | metric | per-prompt final (frames / prompt) | amortized reaches it at (frames / prompt) | "
             "times fewer frames |", "|---|---|---:|---:|---:|"]
    for split, per in ans["frames_ratio"].items():
        for m, r in per.items():
            if r["amortized_reached"]:
                bound = "<= " if r["amortized_at_first_point"] else ""
                at = f"{bound}{r['amortized_frames']:.1f}"
                tf = ("> " if r["amortized_at_first_point"] else "") + f"{r['times_fewer']:.1f}x"
            else:
                at = f"not reached (best {_fmt(r['amortized_best'])})"
                tf = "not reached"
            lines.append(f"| {split} | {SHORT[m]} | {_fmt(r['per_prompt_final'])} "
                         f"({r['per_prompt_frames']:.0f}) | {at} | {tf} |")
    if not ans["frames_ratio"]:
        lines.append("| - | - | no per-prompt runs yet | | |")
    lines += ["", "### Held-out quality as a fraction of training-prompt quality", "",
              "| method | step | metric | train | held-out | held-out / train |", "|---|---:|---|---:|---:|---:|"]
    for name, fr in ans["heldout_fraction"].items():
        for m in METRICS:
            if m not in fr:
                continue
            r = fr[m]
            q = " (of 1 - error)" if not HIGHER_IS_BETTER[m] else ""
            lines.append(f"| {name.replace('_', '-')} | {fr['step']} | {SHORT[m]} | {_fmt(r['train'])} | "
                         f"{_fmt(r['heldout'])} | {_fmt(r['fraction'], 2)}{q} |")
    return "\n".join(lines) + "\n"


def markdown_report(summary: dict[str, Any]) -> str:
    s = summary["settings"]
    amort, scratch = summary["curves"]["amortized"], summary["curves"]["per_prompt"]
    na = {sp: amort[sp]["prompts"] for sp in amort}
    ns = {sp: scratch[sp]["prompts"] for sp in scratch}
    parts = [
        "# Quality vs compute: amortized vs per-prompt (shapes64)", "",
        f"Frames per prompt: amortized `step x {s['batch_size']} / {s['num_train_prompts']}`; per-prompt "
        f"`step x {s['batch_views']}` ({s['resolution']} px renders). Scores: WORLD.md metrics, "
        f"{s['eval_resolution']} px evaluation views.", "",
        f"## Amortized ({', '.join(f'{n} {sp}' for sp, n in na.items()) or 'no'} prompts per snapshot)", "",
        curve_table(amort),
        f"## Per-prompt optimisation from scratch ({', '.join(f'{n} {sp}' for sp, n in ns.items()) or 'no'} "
        f"prompts, {s['mode']} mode)", "", curve_table(scratch),
        "## Answers", "",
        "The amortized curve for the ratios is the mean over the same prompts as the per-prompt runs.", "",
        answers_markdown(summary["answers"]),
    ]
    t = summary.get("timing", {})
    if t:
        parts += ["", "Measured: " + ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in t.items()) + "."]
    return "\n".join(parts) + "\n"


def plot(summary: dict[str, Any], path: str | Path) -> None:
    """Volume IoU and colour error vs frames per prompt (log x): both methods, training and held-out prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(5.2 * len(PLOTTED), 3.8))
    colours = {"amortized": "tab:blue", "per_prompt": "tab:orange"}
    names = {"amortized": "amortized (ATT3D)", "per_prompt": "per-prompt (from scratch)"}
    styles = {"train": "-", "heldout": "--"}
    for ax, m in zip(np.atleast_1d(axes), PLOTTED):
        for method, curves in summary["curves"].items():
            for split, c in curves.items():
                pts = [(x, y) for x, y in zip(c["frames"], c[m]) if x > 0 and math.isfinite(y)]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                ax.plot(xs, ys, styles[split], marker="o", ms=3, color=colours[method],
                        label=f"{names[method]}, {'held-out' if split == 'heldout' else 'training'} prompts")
        for split, c in summary.get("matched_amortized", {}).items():
            full = summary["curves"]["amortized"].get(split)
            if full is None or c["prompts"] == full["prompts"]:
                continue  # the same prompts: the curve is already drawn
            ax.plot(c["frames"], c[m], styles[split], lw=0.8, alpha=0.6, color=colours["amortized"],
                    label=f"amortized, {'held-out' if split == 'heldout' else 'training'}: the per-prompt runs' "
                          "prompts")
        for per in summary["answers"]["frames_ratio"].values():
            r = per.get(m)
            if r and r["amortized_reached"]:
                ax.plot([r["amortized_frames"]], [r["per_prompt_final"]], marker="x", ms=9, mew=2, color="black",
                        ls="none")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("rendered frames per prompt")
        ax.set_title(LABELS[m], fontsize=10)
        ax.grid(alpha=0.3, which="both")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle("shapes64: quality vs compute (x: where the amortized model reaches the per-prompt final score, "
                 "on the same prompts)", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Curves, answers and timing from the raw units of a results file."""
    s = results["settings"]
    amort_units, scratch_units = results.get("amortized", {}), results.get("scratch", {})
    amort = amortized_curve(amort_units, s["batch_size"], s["num_train_prompts"])
    matched_prompts = {sp: [u["prompt"] for u in scratch_units.values() if u["split"] == sp] for sp in SPLITS}
    matched = amortized_curve(amort_units, s["batch_size"], s["num_train_prompts"], matched_prompts)
    scratch = scratch_curve(scratch_units, s["batch_views"])
    timing: dict[str, float] = {}
    n_eval = sum(len(u["per_prompt"]) for u in amort_units.values())
    if n_eval:
        timing["amortized_eval_per_prompt"] = sum(u["seconds"] for u in amort_units.values()) / n_eval
    n_steps = sum(u["steps"] for u in scratch_units.values())
    if n_steps:
        timing["per_prompt_sds_step"] = sum(u["seconds"] for u in scratch_units.values()) / n_steps
        timing["per_prompt_run_with_evals"] = float(np.mean([u["wall_seconds"] for u in scratch_units.values()]))
    return {"settings": s, "curves": {"amortized": amort, "per_prompt": scratch}, "matched_amortized": matched,
            "answers": answers(amort, matched, scratch), "timing": timing}


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snapshots", default="runs/shapes64_snapshots",
                    help="folder of amortized model snapshots step-XXXXXXX/")
    ap.add_argument("--checkpoint", default=None,
                    help="model folder whose architecture the per-prompt runs use (default: the latest snapshot)")
    ap.add_argument("--prior", default="assets/shapes-prior", help="shapes prior folder of the per-prompt runs")
    ap.add_argument("--guidance", default="shapes", help="guidance config (configs/guidance/NAME.yaml)")
    ap.add_argument("--guidance-scale", type=float, default=None,
                    help="classifier-free guidance scale of the per-prompt runs (default: the guidance config's)")
    ap.add_argument("--train-prompts", default="shapes64_train", help="the amortized model's training prompts")
    ap.add_argument("--heldout-prompts", default="shapes64_heldout", help="its held-out prompts")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per amortized training step")
    ap.add_argument("--prompts-per-split", type=int, default=8,
                    help="prompts per split scored at every snapshot, evenly spaced (0: all)")
    ap.add_argument("--scratch-prompts-per-split", type=int, default=2,
                    help="prompts per split optimised from scratch (evenly spaced among the scored ones)")
    ap.add_argument("--steps", type=int, default=500, help="SDS steps of each per-prompt run")
    ap.add_argument("--every", type=int, default=50, help="score the per-prompt runs every k steps")
    ap.add_argument("--batch-views", type=int, default=4, help="views per per-prompt step")
    ap.add_argument("--resolution", type=int, default=32, help="render resolution of the per-prompt SDS steps")
    ap.add_argument("--mode", choices=("params", "model"), default="params", help="what the per-prompt runs optimise")
    ap.add_argument("--lr", type=float, default=None, help="learning rate of the per-prompt runs")
    ap.add_argument("--lr-final", type=float, default=1.0,
                    help="the per-prompt runs' learning rates decay (cosine) to this fraction at the last step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-resolution", type=int, default=64, help="render resolution of the evaluation views")
    ap.add_argument("--threshold", type=float, default=None, help="density threshold of occupancy")
    ap.add_argument("--parts", nargs="+", choices=("amortized", "scratch"), default=["amortized", "scratch"])
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ap.add_argument("--out", default="outputs/compute_quality")
    ap.add_argument("--resume", action="store_true", help="keep the finished units of an earlier results file")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _check_resume(old: dict[str, Any], new: dict[str, Any], part: str) -> None:
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise ComputeQualityError(f"--resume: the earlier {part} results used other settings ({', '.join(diff)}); "
                                  "use another --out or the same settings")


def scratch_eval_fn(prompt: str, resolution: int, threshold: float | None):
    """``fn(model) -> metrics`` of ``prompt``'s object, as the amortized evaluation (plus ``retrieved`` as 0/1)."""
    from att3d.eval.paraphrase import score_prompts
    from att3d.world.shapes import parse_caption

    obj = parse_caption(prompt)

    def fn(model) -> dict[str, float]:
        row = score_prompts(model, [prompt], [obj], resolution, threshold=threshold, progress=False)[0]
        return {m: float(row[m]) for m in ("volume_iou", "colour_error", "silhouette_iou", "retrieved")}

    return fn


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the missing units, write the results after each, and return the results dict."""
    from tqdm import tqdm

    from att3d.config import background_of, build_guidance, guidance_config
    from att3d.eval.model_eval import evaluate
    from att3d.model import AmortizedModel, load
    from att3d.text.prompts import resolve_prompts
    from att3d.train.refine import from_scratch
    from att3d.utils.checkpoint import load_json
    from att3d.utils.devices import pick_device
    from att3d.utils.paths import resolve_path

    for name in ("steps", "every", "batch_views", "resolution", "eval_resolution", "batch_size"):
        if getattr(args, name) < 1:
            raise ComputeQualityError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    train = resolve_prompts(args.train_prompts)
    heldout = resolve_prompts(args.heldout_prompts)
    scored = {"train": evenly_spaced(train, args.prompts_per_split),
              "heldout": evenly_spaced(heldout, args.prompts_per_split)}
    optimised = {sp: evenly_spaced(scored[sp], args.scratch_prompts_per_split) for sp in SPLITS}
    snapshots = find_snapshots(resolve_path(args.snapshots))
    device = pick_device(args.device)
    progress = not args.no_progress

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_NAME
    amort_settings = {"prompts": scored, "eval_resolution": args.eval_resolution, "threshold": args.threshold}
    scratch_settings = {"prompts": optimised, "steps": args.steps, "every": args.every,
                        "batch_views": args.batch_views, "resolution": args.resolution, "mode": args.mode,
                        "lr": args.lr, "lr_final": args.lr_final, "seed": args.seed, "prior": args.prior,
                        "guidance": args.guidance,
                        "guidance_scale": args.guidance_scale,
                        "eval_resolution": args.eval_resolution, "threshold": args.threshold}
    results: dict[str, Any] = {"amortized": {}, "scratch": {}}
    if args.resume and path.is_file():
        old = json.loads(path.read_text())
        if old.get("amortized"):
            _check_resume(old["settings"]["amortized"], amort_settings, "amortized")
            results["amortized"] = old["amortized"]
        if old.get("scratch"):
            _check_resume(old["settings"]["scratch"], scratch_settings, "per-prompt")
            results["scratch"] = old["scratch"]
    elif path.is_file():
        print(f"{path} exists: starting over (--resume keeps its finished units)", file=sys.stderr)
    results["settings"] = {"amortized": amort_settings, "scratch": scratch_settings, "batch_size": args.batch_size,
                           "num_train_prompts": len(train), "batch_views": args.batch_views,
                           "resolution": args.resolution, "eval_resolution": args.eval_resolution, "mode": args.mode,
                           "snapshots": str(args.snapshots)}
    _write_json(path, results)

    if "amortized" in args.parts:
        if not snapshots:
            raise ComputeQualityError(f"no snapshot folders step-XXXXXXX with a model in {args.snapshots}")
        todo = [(s, p) for s, p in snapshots if p.name not in results["amortized"]]
        prompts = scored["train"] + scored["heldout"]
        encoders: dict[str, Any] = {}
        for step, folder in tqdm(todo, desc="snapshots", disable=not progress, dynamic_ncols=True):
            key = json.dumps(load_json(folder / "model_config.json")["text_encoder"], sort_keys=True)
            model = AmortizedModel.from_pretrained(folder, device=device, text_encoder=encoders.get(key))
            encoders[key] = model.text_encoder
            t0 = time.time()
            res = evaluate(model, prompts, scored["heldout"], args.eval_resolution, threshold=args.threshold,
                           progress=progress)
            results["amortized"][folder.name] = {"step": step, "folder": str(folder), "per_prompt": res["per_prompt"],
                                                 "summary": res["summary"], "seconds": time.time() - t0}
            _write_json(path, results)
            tqdm.write(f"step {step}: " + ", ".join(f"{sp} IoU {res['summary'][sp]['volume_iou']:.3f} colour "
                                                     f"{res['summary'][sp]['colour_error']:.3f}"
                                                     for sp in SPLITS if sp in res["summary"]))

    if "scratch" in args.parts:
        todo = [(sp, p) for sp in SPLITS for p in optimised[sp] if p not in results["scratch"]]
        if todo:
            arch = resolve_path(args.checkpoint) if args.checkpoint else (snapshots[-1][1] if snapshots else None)
            if arch is None or not Path(arch).is_dir():
                raise ComputeQualityError("no model folder for the per-prompt runs' architecture: pass --checkpoint "
                                          "or --snapshots with a snapshot")
            model = load(arch, device=device)
            gcfg = guidance_config(args.guidance, args.prior)
            guidance, background = build_guidance(gcfg, device, guidance_scale=args.guidance_scale), background_of(gcfg)
            results["settings"]["scratch_architecture"] = str(arch)
            for i, (split, prompt) in enumerate(todo):
                if progress:
                    tqdm.write(f"[{i + 1}/{len(todo)}] per-prompt from scratch: {prompt!r} ({split})")
                t0 = time.time()
                _, hist = from_scratch(model, prompt, args.steps, guidance, mode=args.mode, lr=args.lr,
                                       lr_final=args.lr_final,
                                       resolution=args.resolution, batch_views=args.batch_views, seed=args.seed,
                                       eval_fn=scratch_eval_fn(prompt, args.eval_resolution, args.threshold),
                                       eval_every=args.every, background=background, progress=progress)
                results["scratch"][prompt] = {"prompt": prompt, "split": split, "steps": args.steps,
                                              "evals": hist.evals, "seconds": hist.seconds,
                                              "wall_seconds": time.time() - t0,
                                              "final_loss": hist.train[-1]["loss"] if hist.train else None}
                _write_json(path, results)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from att3d.utils.errors import Att3dError

    try:
        results = run(args)
    except (ComputeQualityError, Att3dError) as e:
        print(f"compute_quality: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    out = Path(args.out)
    summary = summarise(results)
    results.update(curves=summary["curves"], matched_amortized=summary["matched_amortized"],
                   answers=summary["answers"], timing=summary["timing"])
    _write_json(out / RESULTS_NAME, results)
    text = markdown_report(summary)
    (out / "compute_quality.md").write_text(text)
    plot(summary, out / "compute_quality.png")
    print(text, end="")
    print(f"wrote {out / RESULTS_NAME}, {out / 'compute_quality.md'}, {out / 'compute_quality.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
