"""How far off can each shape's surface sit before its volume IoU falls below a target?

Moves every true shape's surface outward (and inward) by a uniform offset (:func:`att3d.eval.shape_errors.
offset_occupancy`), scores the result against the truth on the metric's 64^3 voxel centres, and expresses the
offset in pixels of the prior's images (at the origin's depth: 0.050 world units per pixel at 32 px). With a
``shape_errors.json`` of a model (``scripts/shape_errors.py``), it also gives each shape's *equivalent offset*: the
uniform offset at which the true shape holds the model's volume, and the IoU that offset alone would score.
Writes ``offset_sensitivity.json``, ``offset_sensitivity.md`` and ``offset_sensitivity.png``::

    python scripts/offset_sensitivity.py --shape-errors docs/results/shape_errors/shape_errors_session20.json \\
        --out docs/results/shape_errors
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def curves(shapes: list[str], offsets_px: list[float], px: float) -> dict[str, list[float]]:
    """Shape -> the volume IoU of its truth moved by each offset (in pixels of size ``px``)."""
    from att3d.eval.shape_errors import offset_occupancy
    from att3d.world import metrics
    from att3d.world.shapes import WorldObject

    out = {}
    for shape in shapes:
        obj = WorldObject(shape=shape, colour="red")
        truth = metrics.ground_truth_occupancy(obj)
        out[shape] = [metrics.volume_iou(offset_occupancy(obj, d * px), truth) for d in offsets_px]
    return out


def tolerance(offsets_px: list[float], ious: list[float], target: float) -> float:
    """The largest outward offset (px) up to which the IoU stays >= ``target`` (offsets from 0 outward)."""
    best = 0.0
    for d, iou in zip(offsets_px, ious):
        if d < 0:
            continue
        if iou < target:
            break
        best = d
    return best


def main(argv: list[str] | None = None) -> int:
    from att3d.world.shapes import SHAPE_NAMES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape-errors", help="a model's shape_errors.json (scripts/shape_errors.py): adds its "
                                           "equivalent offsets")
    ap.add_argument("--prior-resolution", type=int, default=32, help="the prior's image size (pixels)")
    ap.add_argument("--max-pixels", type=float, default=0.6, help="offsets from -M to +M prior pixels")
    ap.add_argument("--step", type=float, default=0.01, help="offset step (prior pixels)")
    ap.add_argument("--target", type=float, default=0.85, help="the IoU whose tolerance is reported")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPE_NAMES), choices=SHAPE_NAMES)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.step <= 0 or args.max_pixels <= 0 or args.prior_resolution < 1:
        print("offset_sensitivity: error: need --step > 0, --max-pixels > 0 and --prior-resolution >= 1",
              file=sys.stderr)
        return 2
    model = None
    if args.shape_errors:
        path = Path(args.shape_errors)
        try:
            model = json.loads(path.read_text(encoding="utf-8"))["per_shape"]
        except (OSError, ValueError, KeyError) as e:
            print(f"offset_sensitivity: error: cannot read a shape_errors.json from {path}: {e}", file=sys.stderr)
            return 2

    import torch

    from att3d.eval.shape_errors import equivalent_offset, offset_occupancy, pixel_size
    from att3d.utils.checkpoint import atomic_write
    from att3d.world import metrics
    from att3d.world.shapes import WorldObject

    torch.set_num_threads(args.threads)
    px = pixel_size(args.prior_resolution)
    voxel = 2.0 / metrics.VOXEL_RESOLUTION
    n = int(round(args.max_pixels / args.step))
    offsets = [round(k * args.step, 6) for k in range(-n, n + 1)]
    iou = curves(list(args.shapes), offsets, px)
    rows = {}
    for shape in args.shapes:
        row = {"tolerance_px": tolerance(offsets, iou[shape], args.target)}
        row["tolerance_voxels"] = row["tolerance_px"] * px / voxel
        if model and shape in model:
            obj = WorldObject(shape=shape, colour="red")
            d = equivalent_offset(obj, float(model[shape]["volume_ratio"]))
            row.update(model_volume_iou=float(model[shape]["volume_iou"]),
                       model_volume_ratio=float(model[shape]["volume_ratio"]), equivalent_offset=d,
                       equivalent_offset_px=d / px, equivalent_offset_voxels=d / voxel,
                       offset_volume_iou=metrics.volume_iou(offset_occupancy(obj, d),
                                                            metrics.ground_truth_occupancy(obj)))
        rows[shape] = row

    lines = [f"Prior pixel: {px:.4f} world units at the origin ({args.prior_resolution} px); metric voxel: "
             f"{voxel:.4f}. Tolerance: the largest uniform outward offset at which the true shape still scores "
             f"volume IoU >= {args.target:g}.", "",
             "| shape | tolerance (prior px) | (voxels) | IoU at +0.1 px | +0.2 px | +0.3 px |"
             + (" model IoU | model volume ratio | equivalent offset (prior px) | (voxels) | IoU of that offset |"
                if model else ""),
             "|---|---:|---:|---:|---:|---:|" + ("---:|---:|---:|---:|---:|" if model else "")]
    for shape, row in rows.items():
        at = {d: iou[shape][offsets.index(d)] for d in (0.1, 0.2, 0.3) if d in offsets}
        line = (f"| {shape} | {row['tolerance_px']:.2f} | {row['tolerance_voxels']:.2f} | "
                + " | ".join(f"{at[d]:.3f}" if d in at else "-" for d in (0.1, 0.2, 0.3)) + " |")
        if "equivalent_offset" in row:
            line += (f" {row['model_volume_iou']:.3f} | {row['model_volume_ratio']:.3f} | "
                     f"{row['equivalent_offset_px']:+.2f} | {row['equivalent_offset_voxels']:+.2f} | "
                     f"{row['offset_volume_iou']:.3f} |")
        elif model:
            line += " - | - | - | - | - |"
        lines.append(line)
    table = "\n".join(lines) + "\n"
    out = Path(args.out)
    report = json.dumps({"prior_resolution": args.prior_resolution, "pixel_size": px, "voxel_size": voxel,
                         "target": args.target, "offsets_px": offsets, "volume_iou": iou, "per_shape": rows,
                         "shape_errors": args.shape_errors}, indent=2) + "\n"
    atomic_write(out / "offset_sensitivity.json", lambda tmp: Path(tmp).write_text(report, encoding="utf-8"))
    atomic_write(out / "offset_sensitivity.md", lambda tmp: Path(tmp).write_text(table, encoding="utf-8"))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for i, shape in enumerate(args.shapes):
        colour = f"C{i}"
        ax.plot(offsets, iou[shape], color=colour, label=shape, lw=1.4)
        row = rows[shape]
        if "equivalent_offset_px" in row:
            ax.plot([row["equivalent_offset_px"]], [row["model_volume_iou"]], "o", color=colour, ms=6)
    ax.axhline(args.target, color="gray", ls="--", lw=1)
    ax.axvline(0, color="gray", lw=0.6)
    ax.set_xlabel(f"uniform surface offset (pixels of the {args.prior_resolution}-px prior; + is outward)")
    ax.set_ylabel("volume IoU against the truth")
    ax.set_title("true shapes with their surface moved" + (" (dots: the model at its equivalent offset)"
                                                           if model else ""), fontsize=10)
    ax.set_ylim(0.5, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(ncol=4, fontsize=8, loc="lower center")
    fig.tight_layout()
    atomic_write(out / "offset_sensitivity.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    print(table, end="")
    print(f"wrote {out}/offset_sensitivity.json, offset_sensitivity.md, offset_sensitivity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
