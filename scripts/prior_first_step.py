"""What a prior's first sampling step sees: the clean-image estimate from pure noise at t = T - 1.

    python scripts/prior_first_step.py --prior assets/shapes-prior runs/prior/prior-step4500 \\
        --out docs/results/prior_first_step.png

For each prior (one block of rows) and guidance scale (one row per scale), the estimate
``x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)`` of one caption per shape at the first evaluation
view, from the same pure noise. An epsilon-predicting prior divides its noise error by
sqrt(alpha_bar) (about 5e-5 at t = 999), a v-predicting one returns the conditional mean image directly;
guidance extrapolates that mean away from the data (dark halos).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def first_step_estimates(prior, captions: list[str], scales: list[float], seed: int = 0) -> torch.Tensor:
    """(S, N, 3, H, W) clean-image estimates in [0, 1] at t = T - 1, one row per guidance scale."""
    from att3d.render.cameras import OrbitCameras

    n = len(captions)
    cams = OrbitCameras.evaluation(8).index(torch.zeros(n, dtype=torch.long))
    cond = prior.encode_prompts(captions)
    t = prior.num_train_timesteps - 1
    x = torch.randn((n, 3, prior.resolution, prior.resolution), generator=torch.Generator().manual_seed(seed))
    tt = torch.full((n,), t)
    rows = []
    for s in scales:
        eps = prior.predict_noise(x, tt, cond, cams, s).float().cpu()
        rows.append(prior.clean_estimate(x, eps, tt).clamp(-1, 1) * 0.5 + 0.5)
    return torch.stack(rows)


def main(argv: list[str] | None = None) -> int:
    from PIL import Image, ImageDraw

    from att3d.guidance.priors.shapes import ShapesPrior
    from att3d.world.shapes import heldout_objects

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prior", nargs="+", required=True, help="prior folders (one block of rows each)")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--zoom", type=int, default=2)
    args = ap.parse_args(argv)
    captions = [o.caption for o in heldout_objects()]  # one caption per shape and per colour
    label_w, tiles = 230, []
    for folder in args.prior:
        prior = ShapesPrior.from_pretrained(folder)
        est = first_step_estimates(prior, captions, args.scales)
        for s, row in zip(args.scales, est):
            strip = np.concatenate([(img.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for img in row], axis=1)
            strip = np.kron(strip, np.ones((args.zoom, args.zoom, 1), dtype=np.uint8))
            canvas = Image.new("RGB", (label_w + strip.shape[1], strip.shape[0]), "white")
            canvas.paste(Image.fromarray(strip), (label_w, 0))
            kind = prior.prediction_type.replace("_prediction", "")
            ImageDraw.Draw(canvas).text((4, strip.shape[0] // 2 - 6), f"{Path(folder).name} ({kind}), g={s:g}",
                                        fill="black")
            tiles.append(np.asarray(canvas))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles, axis=0)).save(args.out)
    print(f"wrote {args.out} ({', '.join(captions)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
