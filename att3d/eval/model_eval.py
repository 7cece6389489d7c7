"""Score an amortized model on the shapes world with WORLD.md's metrics.

``att3d eval model --checkpoint PATH [--prompts shapes64] [--out DIR]`` (:mod:`att3d.cli.eval`) generates every
prompt in one forward pass, extracts its occupancy (density above the extraction
threshold on the 64^3 voxel centres), renders the 8 evaluation views, and reports
volume IoU, silhouette IoU, colour error and retrieval accuracy, separately for the
training and the held-out prompts. Writes ``metrics.json``, ``metrics.md`` and
``renders.png`` (renders beside ground truth).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from att3d.utils.checkpoint import atomic_write
from att3d.world import metrics
from att3d.world.metrics import field_occupancy, render_views
from att3d.world.shapes import SHAPE_NAMES, all_objects, parse_caption

__all__ = ["evaluate", "exported_mesh_scores", "field_occupancy", "figure", "markdown_report", "markdown_table",
           "render_views", "summarise", "write_report"]


#: Per-prompt keys of the field's scores that the summaries average.
SUMMARY_KEYS = ["volume_iou", "silhouette_iou", "colour_error", "retrieved"]
#: Per-prompt keys of :func:`exported_mesh_scores` that the summaries average.
MESH_KEYS = ["mesh_volume_iou", "mesh_silhouette_iou", "mesh_colour_error", "mesh_retrieved", "mesh_faces",
             "mesh_bytes"]


@torch.no_grad()
def exported_mesh_scores(model, cond: dict[str, torch.Tensor], prompts: Sequence[str], out_dir: str | Path,
                         threshold: float | None = None, resolution: int = 64,
                         **mesh_kw: Any) -> list[dict[str, Any]]:
    """Score each prompt's exported GLB (written, then re-read with trimesh) against the ground truth.

    The meshes come from :func:`att3d.mesh.extract.meshes_from_conditioning` (its defaults, as ``att3d generate``
    makes them, unless ``mesh_kw`` says otherwise: ``head``, ``max_faces``, ``solid``, ...). Occupancy of the
    re-read mesh by ray parity on the 64^3 voxel centres; renders of its texture at the 8 evaluation views,
    drawn as it is when it holds radiance, lit by the world's light (with the file's normals) when it holds an
    albedo (a mesh stage trained with ``stage.shading=lambert``).

    Returns:
        One dict per prompt: ``mesh_volume_iou``, ``mesh_silhouette_iou``, ``mesh_colour_error``,
        ``mesh_retrieved`` (scored among the 64 objects like the field), ``mesh_faces``, ``mesh_bytes``.
    """
    import trimesh

    from att3d.infer.generate import slugify
    from att3d.infer.turntable import mesh_arrays
    from att3d.mesh import render_mesh
    from att3d.mesh.export import export_mesh
    from att3d.mesh.extract import colour_shading, meshes_from_conditioning
    from att3d.render.cameras import OrbitCameras

    meshes = meshes_from_conditioning(model, cond, threshold=threshold, **mesh_kw)
    lit = colour_shading(model) == "lambert"  # an albedo texture is viewed under the world's light
    candidates = all_objects()
    cams = OrbitCameras.evaluation(8)
    out: list[dict[str, Any]] = []
    for mesh, prompt in zip(meshes, prompts):
        obj = parse_caption(prompt)
        if len(mesh.faces) == 0:
            out.append({"mesh_volume_iou": 0.0, "mesh_silhouette_iou": 0.0, "mesh_colour_error": 1.0,
                        "mesh_retrieved": False, "mesh_faces": 0, "mesh_bytes": 0})
            continue
        path = Path(out_dir) / f"{slugify(prompt)}.glb"
        export_mesh(mesh, path)
        back = trimesh.load(path, force="mesh")
        occ = metrics.mesh_occupancy(torch.as_tensor(back.vertices, dtype=torch.float32),
                                     torch.as_tensor(back.faces, dtype=torch.long), metrics.VOXEL_RESOLUTION)
        arrays = mesh_arrays(back)
        rgb, mask = render_mesh(arrays["verts"], arrays["faces"], cams, resolution, colours=arrays.get("colours"),
                                uvs=arrays.get("uvs"), texture=arrays.get("texture"), lambert=lit)
        scored = metrics.score_object(occ, rgb, mask, obj)
        best = int(metrics.retrieval_scores(occ, rgb, mask, candidates).argmax())
        out.append({"mesh_volume_iou": scored["volume_iou"], "mesh_silhouette_iou": scored["silhouette_iou"],
                    "mesh_colour_error": scored["colour_error"], "mesh_retrieved": candidates[best] == obj,
                    "mesh_faces": int(len(back.faces)), "mesh_bytes": int(path.stat().st_size)})
    return out


@torch.no_grad()
def evaluate(model, prompts: Sequence[str], heldout: Sequence[str] = (), resolution: int = 64,
             batch_size: int = 8, threshold: float | None = None, progress: bool = True,
             mesh_dir: str | Path | None = None, mesh_kw: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score each prompt (a shapes-world caption) and summarise per split.

    With ``mesh_dir``, each prompt's GLB is also exported there and scored (:func:`exported_mesh_scores`, with
    ``mesh_kw`` as its mesh options).

    Returns:
        dict with ``per_prompt`` (list of dicts, each with its ``split`` and ``shape``), ``summary`` (split ->
        mean metrics and retrieval), ``per_shape`` (shape -> the same over all prompts of that shape: where the
        corners of a cube, a pyramid or an octahedron are lost, the split means hide it), and ``renders``
        (P, V, H, W, 3) / ``opacity`` tensors for figures.
    """
    from tqdm import tqdm

    model.eval()
    objects = [parse_caption(p) for p in prompts]
    candidates = all_objects()
    cand_index = {o: i for i, o in enumerate(candidates)}
    held = set(heldout)
    rows, renders, opac = [], [], []
    for s in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="eval"):
        chunk = list(prompts[s:s + batch_size])
        cond = model.conditioning(chunk)
        occ = field_occupancy(model, cond, metrics.VOXEL_RESOLUTION, threshold)
        rgb, op = render_views(model, cond, resolution)
        mesh_scores = (exported_mesh_scores(model, cond, chunk, mesh_dir, threshold, resolution, **(mesh_kw or {}))
                       if mesh_dir else None)
        for i, p in enumerate(chunk):
            obj = objects[s + i]
            m = metrics.score_object(occ[i], rgb[i], op[i], obj)
            scores = metrics.retrieval_scores(occ[i], rgb[i], op[i], candidates)
            m["retrieved"] = bool(int(scores.argmax()) == cand_index[obj])
            m["best_match"] = candidates[int(scores.argmax())].caption
            if mesh_scores is not None:
                m.update(mesh_scores[i])
            rows.append({"prompt": p, "split": "heldout" if p in held else "train", "shape": obj.shape, **m})
        renders.append(rgb)
        opac.append(op)
    keys = SUMMARY_KEYS + (MESH_KEYS if mesh_dir else [])
    summary = {split: summarise([r for r in rows if split == "all" or r["split"] == split], keys)
               for split in ("train", "heldout", "all")}
    summary = {split: m for split, m in summary.items() if m}
    per_shape = {shape: summarise([r for r in rows if r["shape"] == shape], keys) for shape in SHAPE_NAMES}
    per_shape = {shape: m for shape, m in per_shape.items() if m}
    return {"per_prompt": rows, "summary": summary, "per_shape": per_shape, "renders": torch.cat(renders),
            "opacity": torch.cat(opac)}


def summarise(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, float]:
    """The mean of each of ``keys`` over ``rows`` (per-prompt scores), with ``count``; the retrieved flags, where
    ``keys`` has them, become ``retrieval_accuracy`` / ``mesh_retrieval_accuracy``. No rows: an empty dict."""
    if not rows:
        return {}
    out = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    out["count"] = len(rows)
    for flag, rate in (("retrieved", "retrieval_accuracy"), ("mesh_retrieved", "mesh_retrieval_accuracy")):
        if flag in out:
            out[rate] = out.pop(flag)
    return out


def markdown_table(summary: dict[str, dict[str, float]], label: str = "split") -> str:
    """A summary (split -> means, or shape -> means) as a Markdown table: the field's metrics, and the exported
    GLB's when they were measured."""
    meshes = all("mesh_volume_iou" in m for m in summary.values())
    lines = [f"| {label} | prompts | volume IoU | silhouette IoU | colour error | retrieval |"
             + (" GLB volume IoU | GLB silhouette IoU | GLB colour error | GLB retrieval | GLB faces |"
                if meshes else ""),
             "|---|---:|---:|---:|---:|---:|" + ("---:|" * 5 if meshes else "")]
    for split, m in summary.items():
        lines.append(f"| {split} | {m['count']} | {m['volume_iou']:.3f} | {m['silhouette_iou']:.3f} | "
                     f"{m['colour_error']:.3f} | {100 * m['retrieval_accuracy']:.1f}% |"
                     + (f" {m['mesh_volume_iou']:.3f} | {m['mesh_silhouette_iou']:.3f} | "
                        f"{m['mesh_colour_error']:.3f} | {100 * m['mesh_retrieval_accuracy']:.1f}% | "
                        f"{m['mesh_faces']:.0f} |" if meshes else ""))
    return "\n".join(lines) + "\n"


def markdown_report(result: dict[str, Any]) -> str:
    """``metrics.md``: the table per split, then the table per shape."""
    return (markdown_table(result["summary"]) + "\nPer shape (all prompts):\n\n"
            + markdown_table(result["per_shape"], label="shape"))


def figure(prompts: Sequence[str], renders: torch.Tensor, path: str | Path, view: int = 1, columns: int = 8) -> None:
    """PNG grid: for each prompt, its render (left) beside the ground truth (right) at one evaluation view."""
    from PIL import Image, ImageDraw

    objects = [parse_caption(p) for p in prompts]
    H = renders.shape[2]
    gt = metrics.ground_truth_views(objects, H, renders.shape[1])["rgb"][:, view]
    pairs = torch.cat([renders[:, view], gt], dim=2)  # (P, H, 2W, 3)
    n = len(prompts)
    rows = (n + columns - 1) // columns
    label_h = 12
    canvas = Image.new("RGB", (columns * 2 * H, rows * (H + label_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, columns)
        img = Image.fromarray((pairs[i].clamp(0, 1).numpy() * 255).astype(np.uint8))
        canvas.paste(img, (c * 2 * H, r * (H + label_h) + label_h))
        draw.text((c * 2 * H + 2, r * (H + label_h)), prompts[i][2:][:22], fill=(0, 0, 0))
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def write_report(result: dict[str, Any], prompts: Sequence[str], out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"summary": result["summary"], "per_shape": result["per_shape"], "per_prompt": result["per_prompt"]}
    for name, text in (("metrics.json", json.dumps(report, indent=2) + "\n"), ("metrics.md", markdown_report(result))):
        atomic_write(out / name, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"))
    figure(prompts, result["renders"], out / "renders.png")

