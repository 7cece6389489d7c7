"""Plot training curves of att3d runs (PNG).

    python scripts/plot_curves.py runs/prior --out assets/shapes-prior/loss.png            # prior training
    python scripts/plot_curves.py runs/shapes64/<stamp> --out assets/att3d-shapes64/curves.png   # amortized run

A prior run folder holds ``checkpoint/meta.json`` (its history); an amortized run folder holds
``metrics.jsonl`` (one JSON record per logged step).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_history(run: Path) -> list[dict]:
    if (run / "metrics.jsonl").is_file():
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    meta = run / "checkpoint" / "meta.json"
    if meta.is_file():
        return json.loads(meta.read_text())["history"]
    raise SystemExit(f"plot_curves: no metrics.jsonl or checkpoint/meta.json in {run}")


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--keys", nargs="*", default=None, help="metrics to plot (default: loss and what is logged)")
    args = ap.parse_args(argv)
    hist = load_history(args.run)
    keys = args.keys or [k for k in ("loss", "opacity", "grad_norm", "steps_per_s") if k in hist[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    steps = [h["step"] for h in hist]
    for ax, k in zip(axes[0], keys):
        ax.plot(steps, [h.get(k, float("nan")) for h in hist], lw=1)
        ax.set_title(k)
        ax.set_xlabel("step")
        if k == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
