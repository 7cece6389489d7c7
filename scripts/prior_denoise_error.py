"""How well a prior knows each object at each noise level: the error of its clean-image estimate from a noised truth.

Given a caption and the exact camera, the shapes world's image is fully determined, so a perfect prior's clean-image
estimate ``x0_hat = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t)`` from a noised ground-truth render would be that
render at every noise level. At high noise the image says almost nothing, so the estimate rests on the caption and
the camera: its error there measures how precisely the prior maps (caption, camera) to the object's look, which
is what score distillation pulls a model's renders towards (``scripts/sds_pull.py``). At low noise it measures
the prior's detail.

For each prior, shape and timestep: the mean absolute error of ``x0_hat`` against the render, in [0, 1] sRGB units,
over ``--views`` random training views (the colours taken in turn), the same views and noise for every prior.
Conditional score only (guidance 1). Writes ``denoise.json`` and ``denoise.md``::

    python scripts/prior_denoise_error.py --prior assets/shapes-prior --prior runs/prior_v2/prior-step1500 \\
        --out docs/results/prior_denoise
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from att3d.world.shapes import COLOURS, SHAPE_NAMES


def denoise_error(prior, shape: str, timesteps: list[int], views: int, colours: list[str], seed: int = 0
                  ) -> list[float]:
    """Mean absolute error in [0, 1] units of the clean-image estimate of ``views`` noised renders of ``shape``,
    one value per timestep of ``timesteps`` (the views, colours and noise are a function of ``seed`` only)."""
    from att3d.render.cameras import OrbitCameras
    from att3d.world.render import render_objects
    from att3d.world.shapes import WorldObject

    objects = [WorldObject(shape, colours[i % len(colours)]) for i in range(views)]
    cams = OrbitCameras.sample_training(views, generator=torch.Generator().manual_seed(seed))
    gt = render_objects(objects, cams, prior.resolution)["rgb"].permute(0, 3, 1, 2)
    x0 = prior.encode_images(gt)
    cond = prior.encode_prompts([o.caption for o in objects])
    errors = []
    for t in timesteps:
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed * 7919 + t))
        tt = torch.full((views,), int(t), dtype=torch.long)
        x_t = prior.add_noise(x0, eps, tt)
        with torch.no_grad():
            eps_hat = prior.predict_noise(x_t, tt, cond, cams, guidance_scale=1.0)
        x0_hat = prior.clean_estimate(x_t, eps_hat, tt)
        errors.append(float((x0_hat - x0).abs().mean()) / 2)  # [-1, 1] -> [0, 1] units
    return errors


def _num_train_timesteps(folder: str) -> int:
    """T of a prior folder, from its scheduler's config (1000 when it records none)."""
    import json

    cfg = Path(folder) / "scheduler" / "scheduler_config.json"
    return int(json.loads(cfg.read_text()).get("num_train_timesteps", 1000)) if cfg.is_file() else 1000


def markdown(rows: list[dict], timesteps: list[int], header: str) -> str:
    lines = [header, "", "| prior | shape | " + " | ".join(f"t = {t}" for t in timesteps) + " |",
             "|---|---|" + "---:|" * len(timesteps)]
    for r in rows:
        lines.append(f"| `{r['prior']}` | {r['shape']} | " + " | ".join(f"{e:.4f}" for e in r["errors"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prior", action="append", required=True, help="a shapes prior folder (repeat to compare)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPE_NAMES))
    ap.add_argument("--timesteps", type=int, nargs="+", default=[300, 600, 800, 950])
    ap.add_argument("--views", type=int, default=16)
    ap.add_argument("--colours", nargs="+", default=["red", "blue", "green", "gray"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="output folder (denoise.json, denoise.md)")
    args = ap.parse_args(argv)
    from att3d.guidance.priors.shapes import ShapesPrior
    from att3d.utils.checkpoint import save_report

    bad = [s for s in args.shapes if s not in SHAPE_NAMES] + [c for c in args.colours if c not in COLOURS]
    if bad or args.views < 1 or not args.timesteps:
        print(f"error: shapes must be among {list(SHAPE_NAMES)}, colours among {list(COLOURS)} (got {bad}), "
              "views positive, at least one timestep", file=sys.stderr)
        return 2
    for path in args.prior:
        if not Path(path).is_dir():
            print(f"error: no prior folder at {path}", file=sys.stderr)
            return 2
        T = _num_train_timesteps(path)
        if not all(0 <= t < T for t in args.timesteps):
            print(f"error: timesteps must lie in [0, {T}) for {path}", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    rows = []
    for path in args.prior:
        prior = ShapesPrior.from_pretrained(path)
        for k, shape in enumerate(args.shapes):
            rows.append({"prior": path, "shape": shape,
                         "errors": denoise_error(prior, shape, args.timesteps, args.views, args.colours,
                                                 args.seed + k)})
    header = (f"# Clean-image error of the prior from a noised ground truth\n\n"
              f"`python scripts/prior_denoise_error.py {' '.join(argv or sys.argv[1:])}`: mean absolute error "
              f"(sRGB, [0, 1]) of x0_hat at guidance 1, {args.views} training views per shape, the same views and "
              "noise for every prior. A perfect prior scores 0 at every t.")
    text = markdown(rows, args.timesteps, header)
    save_report(args.out, "denoise", {"args": vars(args), "timesteps": args.timesteps, "rows": rows}, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
