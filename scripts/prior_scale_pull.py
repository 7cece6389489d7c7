"""At what size does the prior's score distillation leave a true object alone? A scale probe.

For each shape, the true object is rendered scaled by ``s`` about the origin (the camera moved to ``radius / s``:
the same image) at the prior's resolution, supersampled (``--supersample``) so that the image moves smoothly with
``s``. For each ``s`` of ``--scales`` the probe draws ``(t, eps)`` as score distillation does and measures how the
SDS descent direction ``-g``, ``g = w(t) (eps_hat - eps)`` at guidance ``--guidance``, moves the image along the
object's own scale::

    pull(s) = - sum_views <g, dI/ds> / sum_views <dI/ds, dI/ds>        (dI/ds by a central difference)

``pull > 0``: the prior asks for a larger object; ``< 0``: smaller. Its zero crossing ``s*`` is the size the prior
prefers *for the true shape*: 1 for an unbiased prior. A model that comes out too large although ``s*`` is 1 is
not too large because the prior wants the true shape larger: its *shape* differs (rounded corners, say), and the
prior's optimum for that shape is larger. Every scale and shape uses the same views, timesteps and noise (common
random numbers), so the curves are comparable.

Writes ``scale_pull.json`` and ``scale_pull.md``. Budget: shapes x colours x scales x views x draws UNet
evaluations; the defaults (6 x 2 x 5 x 16 x 16) take about 4 minutes per prior on one CPU core::

    python scripts/prior_scale_pull.py --prior assets/shapes-prior --out docs/results/prior_scale_pull
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

DEFAULT_SHAPES = ("sphere", "cube", "torus", "pyramid", "cone", "octahedron")


def zero_crossing(scales: list[float], pulls: list[float]) -> float | None:
    """The first ``s`` where ``pull`` falls from > 0 to <= 0, linearly interpolated; None without one."""
    for (s0, p0), (s1, p1) in zip(zip(scales, pulls), zip(scales[1:], pulls[1:])):
        if p0 > 0 >= p1:
            return s0 + (s1 - s0) * p0 / (p0 - p1)
    return None


def scale_pull(prior, shape: str, colours: list[str], scales: list[float], views: int = 16, draws: int = 16,
               guidance: float = 1.0, t_range: tuple[float, float] = (0.02, 0.98), supersample: int = 4,
               seed: int = 0, step: float = 0.01) -> list[float]:
    """``pull(s)`` for each of ``scales`` (mean over ``colours``), see the module docstring.

    Args:
        prior: a view-conditioned prior (``encode_prompts``, ``encode_images``, ``add_noise``, ``predict_noise``,
            ``alphas_cumprod``, ``resolution``, ``num_train_timesteps``).
        shape: a shape of the world; colours: its colours to average over.
        views: random training views; draws: ``(t, eps)`` draws per view.
        t_range: timesteps as fractions of T, drawn uniformly; weighting ``w(t) = 1 - alpha_bar`` (DreamFusion's).
        step: relative scale step of the central difference.
    """
    from att3d.guidance.sds import ScoreDistillation, timestep_bounds
    from att3d.render.cameras import OrbitCameras
    from att3d.world.prior_training import training_renders
    from att3d.world.shapes import WorldObject

    gen = torch.Generator().manual_seed(seed)
    cams = OrbitCameras.sample_training(views, gen)
    t_min, t_max = timestep_bounds(*t_range, prior.num_train_timesteps)
    n = views * draws
    t = torch.randint(t_min, t_max + 1, (n,), generator=gen)
    res = prior.resolution
    noise = torch.randn(n, 3, res, res, generator=gen)
    cams_n = dataclasses.replace(cams, phi=cams.phi.repeat(draws), theta=cams.theta.repeat(draws),
                                 radius=cams.radius.repeat(draws))
    w = ScoreDistillation(prior, guidance_scale=guidance).weight(t).cpu().view(-1, 1, 1, 1)  # training's w(t)
    pulls = []
    for s in scales:
        per_colour = []
        for colour in colours:
            obj = WorldObject(shape, colour)

            def render(sc: float, obj: WorldObject = obj) -> torch.Tensor:  # (V, 3, H, W) in [0, 1]
                c = dataclasses.replace(cams, radius=cams.radius / sc)
                return (training_renders([obj] * views, c, res, supersample) + 1) / 2

            image = render(s)
            dids = (render(s * (1 + step)) - render(s / (1 + step))) / (s * (1 + step) - s / (1 + step))
            cond = prior.encode_prompts([obj.caption] * n)
            with torch.no_grad():
                x0 = prior.encode_images(image).repeat(draws, 1, 1, 1)
                x_t = prior.add_noise(x0, noise, t)
                eps = prior.predict_noise(x_t, t, cond, cams_n, guidance).float()
                g = w * (eps - noise)  # d loss / d x0; x0 = 2 I - 1, so d loss / d I = 2 g
            j = dids.repeat(draws, 1, 1, 1)
            per_colour.append(float(-(2 * g * j).sum() / (j * j).sum()))
        pulls.append(sum(per_colour) / len(per_colour))
    return pulls


def report(results: dict[str, dict[str, dict]], scales: list[float], args: argparse.Namespace) -> str:
    lines = ["# How large the prior wants the true shapes", "",
             f"`python scripts/prior_scale_pull.py {' '.join(sys.argv[1:])}`: the SDS descent direction on renders of "
             f"the true object scaled by s, projected on the object's scale (pull > 0: larger), {args.views} views x "
             f"{args.draws} draws of (t, eps) per scale, t in [{args.t_range[0]}, {args.t_range[1]}] T, guidance "
             f"{args.guidance}, colours {', '.join(args.colours)}. s*: where the pull crosses zero (1: unbiased).", "",
             "| prior | shape | s* | " + " | ".join(f"pull at {s:g}" for s in scales) + " |",
             "|---|---|---:|" + "---:|" * len(scales)]
    for prior, shapes in results.items():
        for shape, r in shapes.items():
            star = "-" if r["s_star"] is None else f"{r['s_star']:.4f}"
            lines.append(f"| `{prior}` | {shape} | {star} | " + " | ".join(f"{p:+.4f}" for p in r["pull"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from att3d.world.shapes import COLOURS, SDFS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prior", action="append", required=True, help="prior folder (repeat to compare)")
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES))
    p.add_argument("--colours", nargs="+", default=["red", "blue"])
    p.add_argument("--scales", nargs="+", type=float, default=[0.94, 0.97, 1.0, 1.03, 1.06])
    p.add_argument("--views", type=int, default=16)
    p.add_argument("--draws", type=int, default=16)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--t-range", nargs=2, type=float, default=[0.02, 0.98])
    p.add_argument("--supersample", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    try:
        bad = [s for s in args.shapes if s not in SDFS] + [c for c in args.colours if c not in COLOURS]
        if bad:
            raise ValueError(f"unknown shape or colour: {', '.join(bad)}")
        if sorted(args.scales) != args.scales or len(args.scales) < 2 or min(args.scales) <= 0:
            raise ValueError("--scales: at least two positive scales, in increasing order")
        if args.views < 1 or args.draws < 1 or args.supersample < 1:
            raise ValueError("--views, --draws and --supersample must be >= 1")
        if not 0 <= args.t_range[0] <= args.t_range[1] <= 1:
            raise ValueError("--t-range: 0 <= LO <= HI <= 1")
        from att3d.guidance.priors.shapes import ShapesPrior

        torch.set_num_threads(args.threads)
        results: dict[str, dict[str, dict]] = {}
        for folder in args.prior:
            if not (Path(folder) / "prior_config.json").is_file():
                raise ValueError(f"--prior {folder}: not a prior folder (no prior_config.json)")
            prior = ShapesPrior.from_pretrained(folder)
            results[folder] = {}
            for shape in args.shapes:
                pulls = scale_pull(prior, shape, args.colours, args.scales, args.views, args.draws, args.guidance,
                                   tuple(args.t_range), args.supersample)
                results[folder][shape] = {"pull": pulls, "s_star": zero_crossing(args.scales, pulls)}
                print(f"{folder} {shape}: s* = {results[folder][shape]['s_star']}", flush=True)
    except ValueError as e:
        print(f"prior_scale_pull: error: {e}", file=sys.stderr)
        return 2
    from att3d.utils.checkpoint import save_report

    out = save_report(args.out, "scale_pull", {"scales": args.scales, "settings": vars(args), "results": results},
                      report(results, args.scales, args))
    print(f"wrote {out / 'scale_pull.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
