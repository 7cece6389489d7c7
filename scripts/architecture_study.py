"""Hypernetwork vs triplane generator, side by side (issue #16): quality, size, speed, 64 vs ~5,000 prompts.

Each model is named ``ARCH/SET=FOLDER`` (e.g. ``triplane/shapes64=runs/triplane64/model``); every model of the
study was trained on the same budget (steps x prompts per step), so the rows of one prompt set compare the
architectures at equal frames, and the two prompt sets show how each architecture scales from 56 training captions
to the 5,040 training wordings. What is read, per model folder:

- ``eval/metrics.json`` (``att3d eval model --meshes``): volume IoU, colour error, silhouette IoU and retrieval of
  the 64 canonical captions, training and held-out objects apart, for the field and for the exported GLB;
- ``eval/wordings/paraphrase.json`` (``att3d eval paraphrase --set wordings``, when present): retrieval of the
  held-out objects in WORLD.md's wordings;
- ``eval/unseen/paraphrase.json`` (``att3d eval paraphrase --set unseen --split dev``, when present): retrieval on
  the dev split of the unseen-word set;
- the parameters of the mapping and the field (loaded with ``att3d.load``).

What is measured here, side by side in one process (``--repeats`` alternating rounds, medians):

- generation latency: ``model.generate`` of ``--prompts`` prompts at batch 1 to GLB bytes (no turntable), per
  prompt;
- the training step: ``--train-steps`` SDS steps of each model's own training config (batch 8, 32 px renders,
  the shipped prior), one fresh trainer per architecture, steps alternated between the architectures; an
  architecture's config is ``experiment=shapes64`` (plus ``mapping=triplane field=triplane`` for ``triplane``)
  unless ``--train-overrides ARCH=OVERRIDES`` gives it (e.g. ``triplane5=experiment=shapes64_triplane``).

Writes ``results.json``, ``README.md`` (tables, the command) and ``study.png`` (bars per metric) to ``--out``::

    python scripts/architecture_study.py --out docs/results/architecture \\
        --model hypernetwork/shapes64=assets/att3d-shapes64 --model triplane/shapes64=runs/triplane64/model \\
        --model hypernetwork/wordings=runs/hyper_wordings/model --model triplane/wordings=runs/tri_wordings/model
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch


def parse_model(spec: str) -> tuple[str, str, Path]:
    """``ARCH/SET=FOLDER`` -> (arch, set, folder)."""
    name, sep, folder = spec.partition("=")
    arch, sep2, pset = name.partition("/")
    if not sep or not sep2 or not arch or not pset or not folder:
        raise SystemExit(f"architecture_study: error: --model wants ARCH/SET=FOLDER, got {spec!r}")
    return arch, pset, Path(folder)


def parse_train_overrides(spec: str) -> tuple[str, list[str]]:
    """``ARCH=OVERRIDES`` (one string, overrides split on spaces) -> (arch, overrides)."""
    arch, sep, overrides = spec.partition("=")
    if not sep or not arch or not overrides.strip():
        raise SystemExit(f"architecture_study: error: --train-overrides wants ARCH=OVERRIDES, got {spec!r}")
    return arch, shlex.split(overrides)


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def eval_summary(folder: Path) -> dict[str, Any]:
    """Canonical-caption scores per split (train, heldout, all) from ``eval/metrics.json``."""
    data = read_json(folder / "eval" / "metrics.json")
    if data is None:
        raise SystemExit(f"architecture_study: error: {folder}/eval/metrics.json is missing: run "
                         f"att3d eval model --checkpoint {folder} --prompts shapes64 --meshes")
    return data["summary"]


def paraphrase_retrieval(folder: Path, name: str) -> dict[str, Any] | None:
    """Retrieval (and count) of ``eval/<name>/paraphrase.json``, per subset when it has splits."""
    data = read_json(folder / "eval" / name / "paraphrase.json")
    if data is None:
        return None
    out: dict[str, Any] = {"all": data["summary"]["all"]}
    for subset, part in (data.get("by_subset") or {}).items():
        out[subset] = part["summary"]["all"]
    return out


def parameters(model: Any) -> dict[str, int]:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"mapping": count(model.mapping), "field": count(model.field)}


def time_generation(models: dict[str, Any], prompts: list[str], repeats: int) -> dict[str, dict[str, float]]:
    """Seconds per prompt, text -> GLB bytes at batch 1, alternating models every round (after one warm-up)."""
    def once(model: Any) -> float:
        t = time.perf_counter()
        for p in prompts:
            mesh = model.generate([p], batch_size=1, progress=False)[0]
            mesh.export(file_type="glb")  # the bytes att3d generate writes
        return (time.perf_counter() - t) / len(prompts)

    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        once(m)
    for _ in range(repeats):
        for k, m in models.items():
            times[k].append(once(m))
    return {k: {"median_s": statistics.median(v), "runs_s": v} for k, v in times.items()}


def time_training(configs: dict[str, list[str]], steps: int) -> dict[str, dict[str, float]]:
    """Seconds per training step of each config (Hydra overrides), steps alternated between the configs."""
    import tempfile

    from att3d.config import build_trainer
    from att3d.eval.bench import train_config

    tmp = tempfile.TemporaryDirectory(prefix="att3d-arch-study-")
    trainers = {k: build_trainer(train_config(None, [*ov, "progress=false"]), Path(tmp.name) / k)
                for k, ov in configs.items()}
    for t in trainers.values():
        t.train_step()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for _ in range(steps):
        for k, t in trainers.items():
            s = time.perf_counter()
            t.train_step()
            times[k].append(time.perf_counter() - s)
    tmp.cleanup()
    return {k: {"median_s": statistics.median(v), "steps": len(v)} for k, v in times.items()}


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(results: dict[str, Any], command: str) -> str:
    rows = results["models"]
    lines = ["# Hypernetwork vs triplane generator (issue #16)", "",
             f"Machine: {results['machine']}; {results['threads']} torch thread(s). Command:", "", "```bash",
             command, "```", "",
             "Canonical captions (64: the training objects and the 8 held-out ones apart), field and exported GLB; "
             "retrieval of the held-out objects in every wording (`eval paraphrase --set wordings`) and of the "
             "unseen-word dev split; parameters; latency and training step measured side by side here.", "",
             "| model | split | volume IoU | colour error | silhouette IoU | retrieval | GLB volume IoU | "
             "GLB colour error | GLB retrieval |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in rows.items():
        for split in ("train", "heldout"):
            s = r["canonical"][split]
            lines.append(f"| {key} | {split} | {num(s['volume_iou'])} | {num(s['colour_error'])} | "
                         f"{num(s['silhouette_iou'])} | {pct(s['retrieval_accuracy'])} | "
                         f"{num(s.get('mesh_volume_iou'))} | "
                         f"{num(s.get('mesh_colour_error'))} | {pct(s.get('mesh_retrieval_accuracy'))} |")
    lines += ["", "| model | parameters (mapping / field) | held-out objects, every wording: retrieval | "
              "unseen words (dev): retrieval | s / prompt, text -> GLB (batch 1) | s / training step |",
              "|---|---:|---:|---:|---:|---:|"]
    for key, r in rows.items():
        w, u = r.get("wordings"), r.get("unseen")
        gen, step = r.get("generate"), r.get("train_step")
        lines.append(f"| {key} | {r['parameters']['mapping']:,} / {r['parameters']['field']:,} | "
                     f"{pct(w['all']['retrieved']) if w else '-'} | "
                     f"{pct((u.get('dev') or u['all'])['retrieved']) if u else '-'} | "
                     f"{num(gen['median_s']) if gen else '-'} | {num(step['median_s']) if step else '-'} |")
    lines += ["", "![study](study.png)", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["models"]
    keys = list(rows)
    panels = [("GLB volume IoU", lambda r: r["canonical"]["all"].get("mesh_volume_iou")),
              ("GLB colour error", lambda r: r["canonical"]["all"].get("mesh_colour_error")),
              ("held-out retrieval, every wording",
               lambda r: (r.get("wordings") or {}).get("all", {}).get("retrieved")),
              ("s / prompt (generate)", lambda r: (r.get("generate") or {}).get("median_s"))]
    panels = [(t, get) for t, get in panels if any(get(rows[k]) is not None for k in keys)]  # no empty panel
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4), squeeze=False)
    axes = axes[0]
    colours = ["#4c72b0" if k.startswith("hypernetwork") else "#dd8452" for k in keys]
    for ax, (title, get) in zip(axes, panels):
        vals = [get(rows[k]) for k in keys]
        ax.bar(range(len(keys)), [v if v is not None else 0 for v in vals], color=colours)
        ax.set_xticks(range(len(keys)), [k.replace("hypernetwork", "hyper").replace(" (shipped)", "*")
                                         for k in keys], fontsize=7, rotation=35, ha="right")
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(vals):
            if v is not None:
                ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True, help="ARCH/SET=FOLDER (repeatable)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", nargs="+", default=["a red cube", "a blue torus", "a green cone", "a pink capsule"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=10, help="timed training steps per architecture (0: skip)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-overrides", action="append", default=[], metavar="ARCH=OVERRIDES",
                    help="the training config of an architecture, as att3d train overrides in one string (e.g. "
                         "'triplane5=experiment=shapes64_triplane'; repeatable); default: experiment=shapes64, plus "
                         "mapping=triplane field=triplane for the architecture named triplane")
    ap.add_argument("--notes", default=None, help="a Markdown file added to the README after the tables")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import att3d
    from att3d.eval.bench import machine_info, machine_line

    specs = [parse_model(s) for s in args.model]
    results: dict[str, Any] = {"machine": machine_line(machine_info(torch.device("cpu"))), "threads": args.threads,
                               "models": {}}
    models = {}
    for arch, pset, folder in specs:
        key = f"{arch}/{pset}"
        model = att3d.load(folder)
        models[key] = model
        results["models"][key] = {"arch": arch, "set": pset, "folder": str(folder),
                                  "canonical": eval_summary(folder), "parameters": parameters(model),
                                  "wordings": paraphrase_retrieval(folder, "wordings"),
                                  "unseen": paraphrase_retrieval(folder, "unseen"),
                                  "training": (model.config.get("extra") or {})}
    for key, t in time_generation(models, args.prompts, args.repeats).items():
        results["models"][key]["generate"] = t
    if args.train_steps > 0:
        given = dict(parse_train_overrides(spec) for spec in args.train_overrides)
        archs = {}
        for arch, _, _ in specs:
            default = ["experiment=shapes64", *(["mapping=triplane", "field=triplane"] if arch == "triplane" else [])]
            archs.setdefault(arch, [*given.get(arch, default), f"trainer.threads={args.threads}"])
        steps = time_training(archs, args.train_steps)
        for r in results["models"].values():
            r["train_step"] = steps[r["arch"]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    command = "python scripts/architecture_study.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    notes = Path(args.notes).read_text() if args.notes else ""
    (out / "README.md").write_text(markdown(results, command) + ("\n" + notes if notes else ""))
    plot(results, out / "study.png")
    print((out / "README.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
