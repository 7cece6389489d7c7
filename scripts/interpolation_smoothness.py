"""How smooth are interpolations between prompts? Compare model folders (e.g. trained with and without
ATT3D's interpolation training) on the same prompt pairs.

For every model and prompt pair it walks the linear (or slerp) path between the two prompts' text
embeddings in ``--frames`` frames and measures, between consecutive frames
(:func:`att3d.infer.interpolate.smoothness`): the volume IoU of their occupancies (64^3, density above
the extraction threshold) and the mean absolute colour change of renders from a fixed view. A model
whose in-between prompts are meaningful changes a little at every step (IoU near 1, small colour
change); one whose in-between prompts are off its training distribution jumps (a bad worst step) or
passes through empty or broken objects (see the ``occupancy`` column). Writes, in ``--out``:

- ``smoothness.json`` (every measure per model and pair, per step), ``smoothness.md`` (the table);
- ``strip.png``: for each pair, one row of evenly spaced frames per model, from the fixed view.

Budget (2-core CPU): about 0.2-0.4 s per frame (a 64^3 occupancy and a 64x64 render), so the
defaults (6 pairs x 16 frames) take about 30-60 s per model. The command for the issue's numbers,
with the two models trained with and without interpolation (``trainer.interpolation.prob``)::

    python scripts/interpolation_smoothness.py --models runs/shapes64-interp/<ts>/model \\
        runs/shapes64/<ts>/model --labels "interpolation" "no interpolation" --out outputs/smoothness
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

#: Default pairs: a shape change, a colour change, both, and pairs with held-out prompts.
DEFAULT_PAIRS = [
    ("a red cube", "a blue cube"),
    ("a green cube", "a green sphere"),
    ("a red cube", "a blue sphere"),
    ("a yellow torus", "a purple cone"),
    ("a red sphere", "a orange cube"),
    ("a pink capsule", "a gray octahedron"),
]
COLUMNS = ("iou_mean", "iou_min", "colour_change_mean", "colour_change_max")


def parse_pairs(items: list[str] | None) -> list[tuple[str, str]]:
    """``"a red cube|a blue sphere"`` items -> pairs (default :data:`DEFAULT_PAIRS`)."""
    if not items:
        return list(DEFAULT_PAIRS)
    pairs = []
    for item in items:
        parts = [p.strip() for p in item.split("|")]
        if len(parts) != 2 or not all(parts):
            raise SystemExit(f"--pairs items look like 'a red cube|a blue sphere', got {item!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def markdown(rows: list[dict[str, Any]], labels: list[str]) -> str:
    lines = ["| model | pair | IoU mean | IoU worst | colour change mean | colour change worst | min occupancy |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['prompts'][0]} -> {r['prompts'][1]} | {r['iou_mean']:.3f} | "
                     f"{r['iou_min']:.3f} | {r['colour_change_mean']:.4f} | {r['colour_change_max']:.4f} | "
                     f"{min(r['occupancy']):.4f} |")
    lines += ["", "| model | IoU mean | IoU worst | colour change mean | colour change worst |",
              "|---|---:|---:|---:|---:|"]
    for label in labels:
        sel = [r for r in rows if r["model"] == label]
        lines.append(f"| {label} | {np.mean([r['iou_mean'] for r in sel]):.3f} | "
                     f"{np.min([r['iou_min'] for r in sel]):.3f} | "
                     f"{np.mean([r['colour_change_mean'] for r in sel]):.4f} | "
                     f"{np.max([r['colour_change_max'] for r in sel]):.4f} |")
    return "\n".join(lines) + "\n"


def strip_image(strips: list[tuple[str, np.ndarray]], path: Path) -> None:
    """Stack labelled strips (each (H, n W, 3) uint8) into one PNG."""
    from PIL import Image, ImageDraw

    label_h = 14
    width = max(s.shape[1] for _, s in strips)
    height = sum(s.shape[0] + label_h for _, s in strips)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for label, s in strips:
        draw.text((2, y + 1), label, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(s), (0, y + label_h))
        y += s.shape[0] + label_h
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="model folders to compare")
    ap.add_argument("--labels", nargs="+", default=None, help="a name per model (default: folder names)")
    ap.add_argument("--pairs", nargs="+", default=None, help="prompt pairs 'a red cube|a blue sphere'")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--mode", choices=("linear", "slerp"), default="linear")
    ap.add_argument("--occupancy-resolution", type=int, default=64)
    ap.add_argument("--render-resolution", type=int, default=64)
    ap.add_argument("--strip-frames", type=int, default=8, help="frames per row of strip.png")
    ap.add_argument("--threshold", type=float, default=None, help="density threshold (default: the model's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="outputs/smoothness")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    from att3d.infer.interpolate import frame_strip, smoothness, to_uint8
    from att3d.model import load
    from att3d.utils.devices import pick_device
    from att3d.utils.paths import resolve_path

    labels = args.labels or [Path(m).resolve().name if Path(m).name != "model" else Path(m).resolve().parent.name
                             for m in args.models]
    if len(labels) != len(args.models):
        print("--labels needs one name per --models folder", file=sys.stderr)
        return 2
    pairs = parse_pairs(args.pairs)
    device = pick_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    strips: dict[tuple[int, int], np.ndarray] = {}
    t0 = time.time()
    for mi, (folder, label) in enumerate(zip(args.models, labels)):
        model = load(resolve_path(folder), device=device)
        for pi, pair in enumerate(tqdm(pairs, desc=label, dynamic_ncols=True)):
            res = smoothness(model, list(pair), args.frames, args.mode, args.occupancy_resolution,
                             args.render_resolution, threshold=args.threshold, return_renders=True)
            strips[(pi, mi)] = frame_strip(to_uint8(res.pop("renders")), args.strip_frames)
            rows.append({"model": label, "folder": str(folder), **res})
    (out / "smoothness.json").write_text(json.dumps({"frames": args.frames, "mode": args.mode, "rows": rows},
                                                    indent=1) + "\n")
    table = markdown(rows, labels)
    (out / "smoothness.md").write_text(table)
    ordered = [(f"{labels[mi]}: {pairs[pi][0]} -> {pairs[pi][1]}", strips[(pi, mi)])
               for pi in range(len(pairs)) for mi in range(len(labels))]
    strip_image(ordered, out / "strip.png")
    print(table, end="")
    print(f"wrote {out / 'smoothness.json'}, {out / 'smoothness.md'}, {out / 'strip.png'} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
