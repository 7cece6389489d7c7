"""Per shape, where the exported GLBs' volume IoU goes: excess, shortfall, or a turn about the vertical.

Reads the GLBs that ``att3d eval model --meshes`` wrote (``EVAL/meshes/a-red-cube.glb``, ...), voxelises each as
the evaluation does, and writes ``shape_errors.json``, ``shape_errors.md`` (one row per shape: volume IoU as
exported, at the best turn about +y and that turn's median, volume ratio, excess, shortfall) and
``slices.png`` (the middle horizontal cut of the first prompt of each shape: grey both, red excess, blue
shortfall)::

    python scripts/shape_errors.py --meshes assets/att3d-shapes64/eval/meshes --out docs/results/shape_errors
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def diagnose(meshes: Path, shapes: list[str], angles: list[float]) -> tuple[list[dict], dict]:
    """Score every ``*-<shape>.glb`` of ``meshes``. Returns (per-prompt rows, {shape: slice image})."""
    import trimesh

    from att3d.eval.shape_errors import best_azimuth, slice_image, volume_error_split
    from att3d.world import metrics
    from att3d.world.shapes import parse_caption

    rows, slices = [], {}
    for shape in shapes:
        files = sorted(meshes.glob(f"*-{shape}.glb"))
        for path in files:
            caption = path.stem.replace("-", " ")
            target = metrics.ground_truth_occupancy(parse_caption(caption))
            mesh = trimesh.load(path, force="mesh")
            verts = torch.as_tensor(mesh.vertices, dtype=torch.float32)
            faces = torch.as_tensor(mesh.faces, dtype=torch.long)
            occ = metrics.mesh_occupancy(verts, faces, target.shape[0])
            turn = best_azimuth(verts, faces, target, angles)
            rows.append({"prompt": caption, "shape": shape, **volume_error_split(occ, target),
                         "best_angle": turn["angle"], "volume_iou_turned": turn["volume_iou"]})
            if shape not in slices:
                slices[shape] = slice_image(occ, target)
    return rows, slices


def per_shape(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Shape -> the means of the per-prompt scores (:func:`att3d.eval.model_eval.summarise`) and the median turn."""
    from att3d.eval.model_eval import summarise

    out = {}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        sel = [r for r in rows if r["shape"] == shape]
        out[shape] = summarise(sel, ("volume_iou", "volume_iou_turned", "volume_ratio", "excess", "shortfall"))
        out[shape]["best_angle_median"] = float(np.median([r["best_angle"] for r in sel]))
    return out


def markdown(summary: dict[str, dict[str, float]]) -> str:
    lines = ["| shape | prompts | GLB volume IoU | at the best turn about +y | turn (median, deg) | volume ratio | "
             "excess | shortfall |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for shape, m in summary.items():
        lines.append(f"| {shape} | {m['count']} | {m['volume_iou']:.3f} | {m['volume_iou_turned']:.3f} | "
                     f"{m['best_angle_median']:+.0f} | {m['volume_ratio']:.3f} | {m['excess']:.3f} | "
                     f"{m['shortfall']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from att3d.world.shapes import SHAPE_NAMES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--meshes", required=True, help="folder of GLBs written by `att3d eval model --meshes`")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPE_NAMES), choices=SHAPE_NAMES)
    ap.add_argument("--max-angle", type=float, default=45.0, help="turns tried: -A..A degrees")
    ap.add_argument("--angle-step", type=float, default=3.0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    meshes = Path(args.meshes)
    if not meshes.is_dir():
        print(f"shape_errors: error: no such folder: {meshes}", file=sys.stderr)
        return 2
    if args.angle_step <= 0 or args.max_angle < 0:
        print("shape_errors: error: need --angle-step > 0 and --max-angle >= 0", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    n = int(round(args.max_angle / args.angle_step))
    angles = [round(k * args.angle_step, 6) for k in range(-n, n + 1)]
    rows, slices = diagnose(meshes, list(args.shapes), angles)
    if not rows:
        print(f"shape_errors: error: no GLB of those shapes in {meshes}", file=sys.stderr)
        return 2

    from PIL import Image, ImageDraw

    from att3d.utils.checkpoint import atomic_write

    summary = per_shape(rows)
    out = Path(args.out)
    report = json.dumps({"meshes": str(meshes), "angles": angles, "per_shape": summary, "per_prompt": rows},
                        indent=2) + "\n"
    atomic_write(out / "shape_errors.json", lambda tmp: Path(tmp).write_text(report, encoding="utf-8"))
    table = markdown(summary)
    atomic_write(out / "shape_errors.md", lambda tmp: Path(tmp).write_text(table, encoding="utf-8"))
    tiles = list(slices.items())
    size = tiles[0][1].shape[0]
    canvas = Image.new("RGB", (size * len(tiles), size + 14), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (shape, img) in enumerate(tiles):
        canvas.paste(Image.fromarray(img), (i * size, 14))
        draw.text((i * size + 2, 1), shape, fill=(0, 0, 0))
    atomic_write(out / "slices.png", lambda tmp: canvas.save(tmp, format="PNG"))
    print(table, end="")
    print(f"wrote {out}/shape_errors.json, shape_errors.md, slices.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
