"""Which shapes does the shapes prior favour under each caption? A denoising-error matrix.

Score distillation pulls a render towards the regions the prior finds likely under the prompt.
A proxy for that likelihood is the prior's noise-prediction error on a clean image noised to
level t (the terms of the diffusion ELBO): for every caption shape S (rows) and every rendered
shape S' (columns), in the caption's colour, at ``--views`` random training views and the
timesteps ``--t``, this measures

    err(S' | S) = mean || eps_hat(x_t(render of S'), t, caption "a {colour} S", camera) - eps ||^2

with the same noise and views for every cell (guidance 1, i.e. the conditional branch). Two readings:
the column view (which caption explains a render best: a diffusion classifier) and the row view (which
render fits a caption best). The row view mixes the prior's preference with how hard each image is to
denoise (edges cost more), so smooth shapes win most rows; compare rows with each other, not with zero.

Writes ``shape_bias.json`` and ``shape_bias.md`` (one matrix per timestep plus a summary: for each
caption shape, its own error, the best other shape and its margin). Budget: 8 x 8 x views x |t| UNet
evaluations, about 3 minutes on one CPU core for the defaults::

    python scripts/prior_shape_bias.py --prior assets/shapes-prior --out docs/results/prior_shape_bias
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def shape_bias(prior, colour: str, views: int, timesteps: list[int], seed: int = 0,
               device: str = "cpu") -> dict[int, list[list[float]]]:
    """Denoising-error matrices ``{t: [[err(image shape j | caption shape i)]]}`` in WORLD.md's shape order.

    Args:
        prior: a :class:`~att3d.guidance.priors.shapes.ShapesPrior`.
        colour: colour of every caption and render.
        views: random training views (shared by every cell).
        timesteps: noise levels t in [0, T).
    """
    from att3d.render.cameras import OrbitCameras
    from att3d.world.render import render_objects
    from att3d.world.shapes import SDFS, WorldObject, caption

    shapes = list(SDFS)
    gen = torch.Generator().manual_seed(seed)
    cams = OrbitCameras.sample_training(views, generator=gen).to(device)
    images = {}
    for s in shapes:
        rgb = render_objects([WorldObject(s, colour)] * views, cams, prior.resolution)["rgb"]
        images[s] = prior.encode_images(rgb.permute(0, 3, 1, 2))  # (V, 3, h, w) in [-1, 1]
    noise = torch.randn(views, 3, prior.resolution, prior.resolution, generator=gen).to(device)
    out: dict[int, list[list[float]]] = {}
    with torch.no_grad():
        for t in timesteps:
            tt = torch.full((views,), int(t), dtype=torch.long, device=device)
            rows = []
            for s_cap in shapes:
                cond = prior.encode_prompts([caption(colour, s_cap)] * views)
                row = []
                for s_img in shapes:
                    x_t = prior.add_noise(images[s_img], noise, tt)
                    # epsilon for every prior, v-prediction models included (predict_noise converts)
                    eps = prior.predict_noise(x_t, tt, cond, cameras=cams, guidance_scale=1.0)
                    row.append(float((eps.float() - noise).pow(2).mean()))
                rows.append(row)
            out[int(t)] = rows
    return out


def summary(matrices: dict[int, list[list[float]]], shapes: list[str]) -> list[dict]:
    """Per caption shape: own error, the most favoured other shape and the relative margin, averaged over t."""
    rows = []
    for i, s in enumerate(shapes):
        own = sum(m[i][i] for m in matrices.values()) / len(matrices)
        others = {s2: sum(m[i][j] for m in matrices.values()) / len(matrices)
                  for j, s2 in enumerate(shapes) if j != i}
        rival = min(others, key=others.get)
        rows.append({"caption_shape": s, "own": own, "rival": rival, "rival_error": others[rival],
                     "margin": (others[rival] - own) / own,
                     "own_best_at": [t for t, m in matrices.items() if min(m[i]) == m[i][i]]})
    return rows


def markdown(matrices: dict[int, list[list[float]]], shapes: list[str], colour: str, prior: str, views: int) -> str:
    lines = [f"# Shape bias of `{prior}`", "",
             f"Noise-prediction error (x 1000) of renders of each shape (columns) under the caption "
             f"`a {colour} <row>`, {views} random training views, guidance 1. Bold: the row's minimum "
             "(easy-to-denoise shapes win many rows; the column view at the end is the classifier reading).", ""]
    for t, m in matrices.items():
        lines += [f"## t = {t}", "", "| caption \\ image | " + " | ".join(shapes) + " |",
                  "| --- |" + " ---: |" * len(shapes)]
        for i, s in enumerate(shapes):
            best = min(range(len(shapes)), key=lambda j: m[i][j])
            cells = [(f"**{v * 1000:.2f}**" if j == best else f"{v * 1000:.2f}") for j, v in enumerate(m[i])]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Summary (mean over t)", "", "| caption shape | own error | most favoured other shape | its error | "
              "margin | t where own shape is best |", "| --- | ---: | --- | ---: | ---: | --- |"]
    for r in summary(matrices, shapes):
        lines.append(f"| {r['caption_shape']} | {r['own'] * 1000:.2f} | {r['rival']} | {r['rival_error'] * 1000:.2f} | "
                     f"{r['margin']:+.1%} | {', '.join(map(str, r['own_best_at'])) or 'none'} |")
    hits = [m[j][j] == min(m[i][j] for i in range(len(shapes))) for m in matrices.values() for j in range(len(shapes))]
    lines += ["", f"Caption as a classifier (the column view): the render's own caption gives the lowest error in "
              f"{sum(hits)} of {len(hits)} (shape, t) cells. The row view above mixes the prior's preference with "
              "how hard each image is to denoise (smooth shapes win rows); compare rows with each other."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prior", default=None, help="prior folder (default: the shipped shapes prior)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--colour", default="red")
    ap.add_argument("--views", type=int, default=32)
    ap.add_argument("--t", type=int, nargs="+", default=[100, 300, 500, 700])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    from att3d.guidance.priors.shapes import ShapesPrior
    from att3d.utils.errors import Att3dError
    from att3d.world.shapes import COLOURS, SDFS

    try:
        if args.colour not in COLOURS:
            raise Att3dError(f"--colour must be one of {', '.join(COLOURS)}, got {args.colour!r}")
        if args.views < 1:
            raise Att3dError("--views must be >= 1")
        prior = ShapesPrior.from_pretrained(args.prior, device=args.device, dtype=torch.float32)
        if not all(0 <= t < prior.num_train_timesteps for t in args.t):
            raise Att3dError(f"--t values must lie in [0, {prior.num_train_timesteps})")
        matrices = shape_bias(prior, args.colour, args.views, args.t, args.seed, args.device)
    except (Att3dError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shapes = list(SDFS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.prior or "assets/shapes-prior"
    (out / "shape_bias.json").write_text(json.dumps(
        {"prior": name, "colour": args.colour, "views": args.views, "shapes": shapes,
         "matrices": {str(t): m for t, m in matrices.items()}, "summary": summary(matrices, shapes)}, indent=1))
    text = markdown(matrices, shapes, args.colour, name, args.views)
    (out / "shape_bias.md").write_text(text)
    print(text.split("## Summary")[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
