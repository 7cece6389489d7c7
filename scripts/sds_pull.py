"""Where does score distillation pull a render: towards the ground truth, or away? One table per guidance scale.

The SDS gradient on a render ``x0`` is ``g = w(t) (eps_hat(x_t; caption, camera) - eps)``; gradient descent moves the
render by ``-E[g]`` (the expectation over timesteps and noise). This script estimates ``E[g]`` for two images of the
same caption and camera, by Monte Carlo over ``--reps`` draws of ``(t, eps)`` per view:

- the **model's render** (``--model``, the trained amortized model): ``cos(-E[g], gt - render)`` says whether the
  prior, at that guidance scale, still pulls the model towards the true object (> 0) or whether the render is
  already where the prior wants it (about 0) or beyond (< 0);
- the **ground-truth render**: ``cos(-E[g], render - gt)`` > 0 says the prior pulls the true object towards the
  model's (the prior's fixed point is not the true object).

Both in the prior's image space (32 px for the shapes prior), at the world's training views, timesteps uniform in
``[0.02, 0.98] T`` (the shipped recipe's; ``--t-range LO HI`` probes one band) and the SDS weighting
``1 - alpha_bar``. It is a probe of the 2D
gradient only: the 3D model integrates it over views and prompts. Writes ``pull.json`` and ``pull.md``::

    python scripts/sds_pull.py --model assets/att3d-shapes64 --prior assets/shapes-prior \
        --guidance 1 2 3 5 --out docs/results/sds_pull
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from att3d.world.shapes import SHAPE_NAMES


def expected_gradient(prior, images: torch.Tensor, cond, cameras, guidance: float, reps: int,
                      seed: int = 0, t_range: tuple[float, float] = (0.02, 0.98)) -> torch.Tensor:
    """``E[w(t) (eps_hat - eps)]`` over ``reps`` draws of ``(t, eps)`` per image.

    Args:
        prior: a :class:`att3d.guidance.priors.DiffusionPrior`.
        images: (B, 3, H, W) renders in [0, 1].
        cond: the prior's conditioning of batch B; cameras: the B cameras.
        guidance: the classifier-free guidance scale.
        reps: Monte Carlo draws per image (the same draws for every call with the same ``seed`` and shapes).
        t_range: timesteps are drawn uniformly in ``[t_range[0], t_range[1]] T`` (fractions of T).

    Returns:
        (B, C, h, w) the mean SDS gradient on ``prior.encode_images(images)``.
    """
    from att3d.guidance.sds import ScoreDistillation

    # the training loop's own timestep draw and weighting (the default "sds": 1 - alpha_bar)
    sds = ScoreDistillation(prior, guidance_scale=guidance, t_range=t_range)
    x0 = prior.encode_images(images)
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros_like(x0)
    with torch.no_grad():
        for _ in range(reps):
            t = sds.sample_t(x0.shape[0], generator=gen)
            eps = torch.randn(x0.shape, generator=gen)
            x_t = prior.add_noise(x0, eps, t)
            eps_hat = prior.predict_noise(x_t, t, cond, cameras, sds.scales(t))
            total += sds.weight(t).view(-1, 1, 1, 1) * (eps_hat - eps)
    return total / reps


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the batch of the cosine between (B, ...) tensors ``a`` and ``b``."""
    return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean())


def pull_table(model, prior, shapes: tuple[str, ...], colour: str, guidances: list[float], views: int, reps: int,
               seed: int = 0, t_range: tuple[float, float] = (0.02, 0.98)) -> list[dict]:
    """One row per (shape, guidance): the cosines of the module docstring and the mean distance render - gt;
    timesteps uniform in ``t_range`` (fractions of T)."""
    from att3d.render.cameras import OrbitCameras
    from att3d.world.render import render_objects
    from att3d.world.shapes import WorldObject, caption

    rows = []
    for k, shape in enumerate(shapes):
        text = caption(colour, shape)
        cams = OrbitCameras.sample_training(views, generator=torch.Generator().manual_seed(seed + k))
        gt = render_objects([WorldObject(shape, colour)] * views, cams, prior.resolution)["rgb"].permute(0, 3, 1, 2)
        with torch.no_grad():
            out = model.render(model.conditioning([text] * views), cams, prior.resolution)
        render = out["rgb"].permute(0, 3, 1, 2)
        towards_gt = prior.encode_images(gt) - prior.encode_images(render)
        cond = prior.encode_prompts([text] * views)
        for s in guidances:
            g_model = expected_gradient(prior, render, cond, cams, s, reps, seed, t_range)
            g_gt = expected_gradient(prior, gt, cond, cams, s, reps, seed, t_range)
            rows.append({"shape": shape, "caption": text, "guidance": s,
                         "model_towards_gt": cosine(-g_model, towards_gt),
                         "gt_towards_model": cosine(-g_gt, -towards_gt),
                         "distance": float(towards_gt.flatten(1).norm(dim=1).mean())})
    return rows


def markdown(rows: list[dict], guidances: list[float], header: str) -> str:
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    at = {(r["shape"], r["guidance"]): r for r in rows}
    lines = [header, "",
             "cos(-E[g], gt - render) at the model's render (> 0: SDS still pulls it towards the truth):", "",
             "| shape | " + " | ".join(f"guidance {s:g}" for s in guidances) + " |",
             "|---|" + "---:|" * len(guidances)]
    for sh in shapes:
        lines.append(f"| {sh} | " + " | ".join(f"{at[sh, s]['model_towards_gt']:+.3f}" for s in guidances) + " |")
    lines += ["", "cos(-E[g], render - gt) at the ground truth (> 0: SDS pulls the true object towards the model's):",
              "", "| shape | " + " | ".join(f"guidance {s:g}" for s in guidances) + " |",
              "|---|" + "---:|" * len(guidances)]
    for sh in shapes:
        lines.append(f"| {sh} | " + " | ".join(f"{at[sh, s]['gt_towards_model']:+.3f}" for s in guidances) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="amortized model folder")
    ap.add_argument("--prior", default="assets/shapes-prior", help="shapes prior folder")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 5.0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPE_NAMES))
    ap.add_argument("--colour", default="red")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--t-range", type=float, nargs=2, default=[0.02, 0.98], metavar=("LO", "HI"),
                    help="timesteps drawn uniformly in [LO, HI] T (the shipped recipe's phase 3: 0.02 0.98)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="output folder (pull.json, pull.md)")
    args = ap.parse_args(argv)
    from att3d.guidance.priors.shapes import ShapesPrior
    from att3d.model import AmortizedModel
    from att3d.utils.checkpoint import save_report
    from att3d.world.shapes import COLOURS

    bad = [s for s in args.shapes if s not in SHAPE_NAMES]
    lo, hi = args.t_range
    if (bad or args.colour not in COLOURS or args.views < 1 or args.reps < 1 or any(g <= 0 for g in args.guidance)
            or not 0 < lo < hi < 1):
        print(f"error: shapes must be among {list(SHAPE_NAMES)}, colour among {list(COLOURS)}, views, reps and "
              "guidance scales positive, and 0 < LO < HI < 1 for --t-range", file=sys.stderr)
        return 2
    for path, what in ((args.model, "model"), (args.prior, "prior")):
        if not Path(path).is_dir():
            print(f"error: no {what} folder at {path}", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    prior = ShapesPrior.from_pretrained(args.prior)
    model = AmortizedModel.from_pretrained(args.model)
    rows = pull_table(model, prior, tuple(args.shapes), args.colour, args.guidance, args.views, args.reps, args.seed,
                      (lo, hi))
    header = (f"# Where SDS pulls a render\n\n`python scripts/sds_pull.py {' '.join(argv or sys.argv[1:])}`: "
              f"{args.views} training views per shape ({args.colour}), {args.reps} draws of (t, eps) per view, "
              f"t uniform in [{lo:g}, {hi:g}] T, weighting 1 - alpha_bar.")
    text = markdown(rows, args.guidance, header)
    save_report(args.out, "pull", {"args": vars(args), "rows": rows}, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
