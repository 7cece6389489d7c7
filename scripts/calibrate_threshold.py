"""Choose a model's extraction threshold without the ground truth: the mesh should cover what the field renders.

The exported mesh is the iso-surface ``density = threshold`` of the field; the field's volume renders, which score
distillation trained, show the object where the accumulated opacity passes 0.5. A threshold that is too low wraps
the object in the soft density outside its visible surface (the mesh is fatter than the renders), one that is too
high eats into it. This script measures, for each candidate threshold, the silhouette IoU between the exported
mesh (``att3d generate``'s defaults) and the field's own volume renders at the 8 evaluation views, on the
model's **training** prompts (never the ground truth, never the held-out prompts), and reports the best::

    python scripts/calibrate_threshold.py --checkpoint assets/att3d-shapes64 --thresholds 2.5 5 7.5 10 15 \
        --out docs/results/threshold

``--surface`` is the extraction's (default ``opacity``, :mod:`att3d.mesh.visibility`; ``density``: the iso-surface
alone). Writes ``threshold_SURFACE.json`` and ``threshold_SURFACE.md``. Setting the chosen value is a separate,
explicit step (``extraction.threshold`` in the model folder's ``model_config.json``, or ``--threshold`` of
``att3d generate``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def self_consistency(model: Any, prompts: Sequence[str], thresholds: Sequence[float], resolution: int = 64,
                     views: int = 8, batch_size: int = 8, surface: str = "opacity") -> dict[float, float]:
    """``{threshold: mean silhouette IoU between the exported mesh and the field's own renders}`` over ``prompts``
    and the ``views`` evaluation views (an empty mesh scores 0 where the field shows an object); ``surface`` is
    the extraction's (:data:`att3d.mesh.extract.SURFACES`)."""
    import torch

    from att3d.infer.turntable import mesh_arrays
    from att3d.mesh import render_mesh
    from att3d.mesh.extract import meshes_from_conditioning
    from att3d.render.cameras import OrbitCameras
    from att3d.world import metrics

    cams = OrbitCameras.evaluation(views)
    sums = {float(t): 0.0 for t in thresholds}
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            cond = model.conditioning(list(prompts[i:i + batch_size]))
            _, opacity = metrics.render_views(model, cond, resolution, views)  # (B, V, H, W)
            for t in sums:
                for b, mesh in enumerate(meshes_from_conditioning(model, cond, threshold=t, texture_size=32,
                                                                       surface=surface)):
                    if len(mesh.faces) == 0:
                        mask = torch.zeros_like(opacity[b])
                    else:
                        arrays = mesh_arrays(mesh)
                        _, mask = render_mesh(arrays["verts"], arrays["faces"], cams, resolution)
                    sums[t] += float(metrics.silhouette_iou(opacity[b], mask).mean())
    return {t: s / len(prompts) for t, s in sums.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="assets/att3d-shapes64", help="model folder")
    p.add_argument("--prompts", default="shapes64_train", help="prompt set (default: the training prompts)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[2.5, 5.0, 7.5, 10.0, 15.0])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--surface", default="opacity", help="the extraction's surface: opacity (default) or density")
    p.add_argument("--out", type=Path, default=None, help="folder for threshold.json / threshold.md")
    args = p.parse_args(argv)

    import att3d
    from att3d.mesh.extract import SURFACES, extraction_threshold
    from att3d.text.prompts import resolve_prompts
    from att3d.utils.errors import Att3dError

    try:
        if any(not t > 0 for t in args.thresholds):
            raise Att3dError("--thresholds must be positive")
        if args.surface not in SURFACES:
            raise Att3dError(f"--surface must be one of {', '.join(SURFACES)}, got {args.surface!r}")
        model = att3d.load(args.checkpoint)
        prompts = resolve_prompts(args.prompts)
        scores = self_consistency(model, prompts, args.thresholds, args.resolution, surface=args.surface)
    except (Att3dError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    best = max(scores, key=scores.get)
    current = extraction_threshold(model)
    lines = ["| threshold | silhouette IoU, mesh vs the field's own renders |", "|---:|---:|"]
    lines += [f"| {t:g}{' (model)' if t == current else ''}{' **best**' if t == best else ''} | {s:.4f} |"
              for t, s in scores.items()]
    text = (f"Model `{args.checkpoint}`, prompts `{args.prompts}` ({len(prompts)}), surface `{args.surface}`, "
            f"{args.resolution} px, 8 views; no ground truth used.\n\n" + "\n".join(lines) + "\n")
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"threshold_{args.surface}.json").write_text(json.dumps(
            {"checkpoint": args.checkpoint, "prompts": args.prompts, "surface": args.surface,
             "scores": {str(t): s for t, s in scores.items()},
             "best": best, "model_threshold": current}, indent=2))
        (args.out / f"threshold_{args.surface}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
