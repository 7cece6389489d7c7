"""Evaluate the shapes-world diffusion prior (``att3d eval prior``, :mod:`att3d.cli.eval`).

Every caption of ``shapes64`` (or an evenly spaced subset of ``--prompts N``) is sampled
with classifier-free guidance at the 8 evaluation views (``OrbitCameras.evaluation(8)``),
by ancestral DDIM with guidance in a limited interval (see :data:`DEFAULT_GUIDANCE_INTERVAL`), and each sample
is scored against the ground-truth render of its caption at the same
camera (``shared/WORLD.md``):

- **silhouette IoU** of the sample's foreground (:func:`att3d.world.metrics.image_foreground`:
  samples have no opacity channel, so foreground = visibly darker than the white background)
  and the ground-truth mask;
- **colour error** over the pixels foreground in both;
- **retrieval**: the sample is retrieved when, among the ground-truth renders of all 64
  objects at that view, the best match by ``silhouette IoU - colour error`` is its own caption.

Outputs in ``--out``: ``metrics.json`` (settings, means, per-prompt values with per-view
lists), ``metrics.md`` (Markdown tables) and ``samples.png`` (up to 16 prompts x 8 views,
each prompt's sample row above its ground-truth row).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from att3d.render.cameras import OrbitCameras
from att3d.world import metrics
from att3d.world.shapes import all_objects

log = logging.getLogger(__name__)

#: Evaluation views per prompt.
N_VIEWS = 8
#: Prompts shown in the sample grid.
GRID_PROMPTS = 16
METRIC_NAMES = ("silhouette_iou", "colour_error", "retrieval_accuracy")
#: Default sampler: ancestral DDIM (``eta = 1``) over 25 steps of the ``trailing`` grid (the first step at
#: t = T - 1, where no signal is left), classifier-free guidance 3 applied only at t <= 0.6 T (guidance in a
#: limited interval, Kynkaenniemi et al., 2024), no restart rounds. Measured on the shipped v-prediction prior
#: (``assets/shapes-prior/README.md``): guidance at high noise pushes the clean-image estimate off the data
#: (over-saturated halos at t = T - 1) and trades shape fidelity for nothing; without it, every trajectory
#: starts from the conditional mean image of its caption and view. Restart rounds (Xu et al., 2023) stay
#: available (``--restarts``): they repaired the residual noise of the earlier epsilon prior, whose first
#: steps amplified the noise error by 1 / sqrt(alpha_bar).
DEFAULT_STEPS = 25
DEFAULT_ETA = 1.0
DEFAULT_SPACING = "trailing"
DEFAULT_GUIDANCE_SCALE = 3.0
DEFAULT_GUIDANCE_INTERVAL = (0.0, 0.6)
DEFAULT_RESTARTS = 0
DEFAULT_RESTART_T = 0.5


def select_prompts(n: int | None) -> list[int]:
    """Indices into :func:`all_objects` of ``n`` evenly spaced objects (all 64 when ``n`` is None)."""
    total = len(all_objects())
    if n is None or n >= total:
        return list(range(total))
    if n < 1:
        raise ValueError(f"--prompts must be at least 1, got {n}")
    if n == 1:
        return [0]
    return [int(round(i * (total - 1) / (n - 1))) for i in range(n)]  # spacing >= 1: distinct


def score_samples(samples: torch.Tensor, object_indices: list[int], gt: dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """Score prior samples against the ground truth at their views.

    Args:
        samples: (P, V, H, W, 3) samples in [0, 1]: prompt p (object ``object_indices[p]``) at
            evaluation view v.
        object_indices: P indices into the O ground-truth objects.
        gt: :func:`att3d.world.metrics.ground_truth_views` of all O objects at the same
            resolution and V views: ``rgb`` (O, V, H, W, 3), ``mask`` (O, V, H, W).

    Returns:
        dict of (P, V) tensors: ``silhouette_iou``, ``colour_error``, ``retrieved`` (bool) and
        ``best_match`` (long index of the best-matching ground-truth object).
    """
    P, V, H, W, _ = samples.shape
    obj_idx = torch.as_tensor(object_indices, dtype=torch.long)
    fg = metrics.image_foreground(samples.reshape(P * V, H, W, 3)).reshape(P, V, H, W)
    own_rgb, own_mask = gt["rgb"][obj_idx], gt["mask"][obj_idx]  # (P, V, H, W, 3), (P, V, H, W)
    sil = metrics.silhouette_iou(fg.reshape(P * V, H, W), own_mask.reshape(P * V, H, W)).reshape(P, V)
    col = metrics.colour_error(samples.reshape(P * V, H, W, 3), own_rgb.reshape(P * V, H, W, 3),
                               fg.reshape(P * V, H, W), own_mask.reshape(P * V, H, W)).reshape(P, V)
    best = torch.empty(P, V, dtype=torch.long)
    for p in range(P):
        for v in range(V):
            scores = metrics.image_retrieval_scores(samples[p, v], fg[p, v], gt["rgb"][:, v], gt["mask"][:, v])
            best[p, v] = scores.argmax()
    return {"silhouette_iou": sil, "colour_error": col, "retrieved": best == obj_idx[:, None], "best_match": best}


def sample_grid(samples: torch.Tensor, gt_rgb: torch.Tensor, captions: list[str], scale: int) -> np.ndarray:
    """An image of each prompt's sample row above its ground-truth row.

    Args:
        samples: (P, V, H, W, 3) in [0, 1]; gt_rgb: (P, V, H, W, 3) in [0, 1].
        captions: P captions written at the left of each pair of rows.
        scale: integer upscaling (nearest) of every tile.

    Returns:
        (rows, cols, 3) uint8 image.
    """
    from PIL import Image, ImageDraw

    P, V, H, W, _ = samples.shape
    h, w, gap, label_w = H * scale, W * scale, 2, 130
    height = P * (2 * h + gap) + gap
    width = label_w + V * (w + gap) + gap
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    canvas[:, label_w:] = 200  # light gray separators between tiles

    def tile(img: torch.Tensor) -> np.ndarray:
        a = (img.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        return a.repeat(scale, axis=0).repeat(scale, axis=1)

    for p in range(P):
        y0 = gap + p * (2 * h + gap)
        for v in range(V):
            x0 = label_w + gap + v * (w + gap)
            canvas[y0:y0 + h, x0:x0 + w] = tile(samples[p, v])
            canvas[y0 + h:y0 + 2 * h, x0:x0 + w] = tile(gt_rgb[p, v])
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for p, cap in enumerate(captions):
        y0 = gap + p * (2 * h + gap)
        draw.text((4, y0 + h // 2 - 5), cap.removeprefix("a "), fill=(0, 0, 0))
        draw.text((4, y0 + h + h // 2 - 5), "ground truth", fill=(110, 110, 110))
    return np.asarray(image)


def markdown_report(result: dict) -> str:
    """Markdown tables of the means and of the per-prompt metrics of :func:`evaluate`'s result."""
    s = result["settings"]
    lines = [
        "# Shapes prior evaluation",
        "",
        f"Prior `{s['prior']}`; {result['n_prompts']} prompts x {result['n_views']} evaluation views"
        + (" (each view prompted with another wording of the object)" if result.get("wordings") else "")
        + f" at "
        f"{result['resolution']} px; DDIM {s['steps']} steps (eta {s.get('eta', 0.0)}"
        + (f", {s['spacing']} spacing" if s.get("spacing") else "") + ")"
        + (f", {s['restarts']} restarts from t = {s['restart_t']} T" if s.get("restarts") else "")
        + f", guidance {s['guidance_scale']}"
        + (" at t in [{:g}, {:g}] T".format(*s["guidance_interval"])
           if list(s.get("guidance_interval", [0, 1])) != [0, 1] else "")
        + f", seed {s['seed']}.",
        "",
        "| metric | mean |",
        "| --- | --- |",
    ]
    for k in METRIC_NAMES:
        lines.append(f"| {k.replace('_', ' ')} | {result['mean'][k]:.4f} |")
    lines += ["", "| prompt | silhouette IoU | colour error | retrieval | most often matched as |",
              "| --- | --- | --- | --- | --- |"]
    for cap, m in result["per_prompt"].items():
        lines.append(f"| {cap} | {m['silhouette_iou']:.3f} | {m['colour_error']:.3f} | "
                     f"{m['retrieval_accuracy']:.3f} | {m['most_matched_as']} |")
    return "\n".join(lines) + "\n"


def evaluate(prior, object_indices: list[int], steps: int = DEFAULT_STEPS,
             guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
             batch_size: int = 64, seed: int = 0, progress: bool = True, eta: float = DEFAULT_ETA,
             restarts: int = DEFAULT_RESTARTS, restart_t: float = DEFAULT_RESTART_T,
             timestep_spacing: str | None = DEFAULT_SPACING,
             guidance_interval: tuple[float, float] = DEFAULT_GUIDANCE_INTERVAL, wordings: bool = False
             ) -> tuple[dict, torch.Tensor, dict[str, torch.Tensor]]:
    """Sample the prior for the chosen objects at the evaluation views and score the samples.

    Args:
        prior: a :class:`att3d.guidance.priors.ShapesPrior` (anything with ``resolution`` and ``sample``).
        object_indices: P indices into :func:`all_objects`.
        wordings: prompt each view with one of the object's wordings (:func:`view_wordings`) instead of its
            caption; the texts are recorded per prompt (``per_prompt[caption]["texts"]``).

    Returns:
        result (JSON-ready dict: ``mean``, ``per_prompt``, sizes), samples (P, V, H, W, 3) on the CPU,
        and the ground truth of all 64 objects (see :func:`att3d.world.metrics.ground_truth_views`).
    """
    objects = all_objects()
    captions = [objects[i].caption for i in object_indices]
    P, V, R = len(object_indices), N_VIEWS, int(prior.resolution)
    cams = OrbitCameras.evaluation(V)
    flat_cams = cams.index(torch.arange(V).repeat(P)).to(prior.device)
    texts = [view_wordings(objects[i], V, p) if wordings else [objects[i].caption] * V
             for p, i in enumerate(object_indices)]
    flat_prompts = [t for row in texts for t in row]
    gen = torch.Generator().manual_seed(seed)
    images = prior.sample(flat_prompts, flat_cams, guidance_scale=guidance_scale, num_inference_steps=steps,
                          generator=gen, batch_size=batch_size, progress=progress, eta=eta,
                          restarts=restarts, restart_t=restart_t,
                          timestep_spacing=timestep_spacing,
                          guidance_interval=guidance_interval)  # (P V, 3, R, R)
    samples = images.float().cpu().clamp(0, 1).permute(0, 2, 3, 1).reshape(P, V, R, R, 3)
    gt = metrics.ground_truth_views(objects, R, V)
    scores = score_samples(samples, object_indices, gt)
    per_prompt: dict[str, dict] = {}
    for p, cap in enumerate(captions):
        matched = scores["best_match"][p]
        most = int(torch.mode(matched).values)
        per_prompt[cap] = {
            "silhouette_iou": float(scores["silhouette_iou"][p].mean()),
            "colour_error": float(scores["colour_error"][p].mean()),
            "retrieval_accuracy": float(scores["retrieved"][p].float().mean()),
            "most_matched_as": objects[most].caption,
            **({"texts": texts[p]} if wordings else {}),
            "per_view": {
                "silhouette_iou": [round(float(x), 5) for x in scores["silhouette_iou"][p]],
                "colour_error": [round(float(x), 5) for x in scores["colour_error"][p]],
                "matched_as": [objects[int(i)].caption for i in matched],
            },
        }
    mean = {
        "silhouette_iou": float(scores["silhouette_iou"].mean()),
        "colour_error": float(scores["colour_error"].mean()),
        "retrieval_accuracy": float(scores["retrieved"].float().mean()),
    }
    result = {"n_prompts": P, "n_views": V, "resolution": R, "wordings": bool(wordings), "mean": mean,
              "per_prompt": per_prompt}
    return result, samples, gt


def view_wordings(obj, views: int, rotation: int = 0) -> list[str]:
    """``views`` wordings of ``obj`` other than its caption (WORLD.md's vocabulary), evenly spaced over
    :func:`att3d.world.wordings.object_wordings` (template-major) and shifted by ``rotation`` so that different
    objects get different templates at the same view."""
    from att3d.world.wordings import object_wordings

    pool = [w for w in object_wordings(obj) if w != obj.caption]
    n = len(pool)
    return [pool[(v * n // views + rotation) % n] for v in range(views)]

