"""The mesh renderer's antialiasing (``att3d.mesh.rasterize``) against a git revision's, side by side.

    python scripts/bench_antialias.py --baseline 4d6e9ff [--resolution 64] [--views 8] [--repeats 5]
                                      [--shapes sphere torus ...] [--threads 1] [--out results.md]

Each shape of the shapes world is meshed by marching cubes of its exact signed distance on the mesh stage's 64^3
grid, then rendered with :func:`att3d.mesh.rasterize.render_mesh` (vertex colours, Lambert shading,
``antialias=True``) from the evaluation views, and a loss on the image is back-propagated to the vertices: the
mesh stage's render, forward and backward. The baseline's ``att3d/mesh/rasterize.py`` is read from git
(``git show REV:...``) and loaded beside the current one in this process; both run on the same meshes, in
alternating rounds (current, baseline, current, ...), and the table gives the median seconds of each, the
speed-up ``baseline / current``, and the largest differences of the images and of the vertex gradients (both
should be at rounding level when the change is a pure speed-up).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from att3d.eval.bench import machine_info, machine_line, markdown
from att3d.mesh import grid_points, marching_cubes
from att3d.render.cameras import OrbitCameras
from att3d.world.shapes import SDFS


def load_baseline(rev: str, repo: Path) -> object:
    """The revision's ``att3d.mesh.rasterize`` as a module of its own (its imports resolve to today's package)."""
    try:
        source = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:att3d/mesh/rasterize.py"], check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"error: cannot read att3d/mesh/rasterize.py at {rev!r}: {getattr(e, 'stderr', e)}".strip())
    with tempfile.TemporaryDirectory() as tmp:  # the module keeps nothing of its file once executed
        path = Path(tmp) / "rasterize_baseline.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("rasterize_baseline", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def render_and_backward(module: object, verts: torch.Tensor, faces: torch.Tensor, cams: OrbitCameras,
                        resolution: int, colours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(image, vertex gradient, seconds) of one antialiased render and its backward pass."""
    v = verts.clone().requires_grad_()
    weight = torch.linspace(0.0, 1.0, resolution)[:, None, None]  # any loss that is not symmetric
    t0 = time.perf_counter()
    rgb, _ = module.render_mesh(v, faces, cams, resolution, colours=colours, lambert=True, antialias=True)
    (rgb * weight).sum().backward()
    return rgb.detach(), v.grad, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", required=True, metavar="REV", help="git revision to compare with")
    p.add_argument("--shapes", nargs="+", default=list(SDFS), choices=list(SDFS))
    p.add_argument("--resolution", type=int, default=64, help="pixels (default: 64, the mesh stage's)")
    p.add_argument("--views", type=int, default=8, help="evaluation views per render (default: 8)")
    p.add_argument("--grid", type=int, default=64, help="marching cubes grid (default: 64, the stage's)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per version (default: 5)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the Markdown here and the JSON beside it")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    repo = Path(__file__).resolve().parents[1]
    current = importlib.import_module("att3d.mesh.rasterize")
    baseline = load_baseline(args.baseline, repo)
    cams = OrbitCameras.evaluation(args.views)
    gen = torch.Generator().manual_seed(0)
    rows, raw = [], {}
    for name in args.shapes:
        verts, faces = marching_cubes(SDFS[name](grid_points(args.grid)), 0.0)
        colours = torch.rand(verts.shape[0], 3, generator=gen)
        times: dict[str, list[float]] = {"current": [], "baseline": []}
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for module in (current, baseline):  # warm-up
            render_and_backward(module, verts, faces, cams, args.resolution, colours)
        for _ in range(args.repeats):
            for label, module in (("current", current), ("baseline", baseline)):
                img, grad, s = render_and_backward(module, verts, faces, cams, args.resolution, colours)
                times[label].append(s)
                out[label] = (img, grad)
        cur, base = statistics.median(times["current"]), statistics.median(times["baseline"])
        d_img = float((out["current"][0] - out["baseline"][0]).abs().max())
        d_grad = float((out["current"][1] - out["baseline"][1]).abs().max() / out["baseline"][1].abs().max())
        raw[name] = {"faces": int(faces.shape[0]), "seconds": times, "image_max_abs_diff": d_img,
                     "grad_max_rel_diff": d_grad}
        rows.append([name, f"{faces.shape[0]:,}", f"{cur:.3f}", f"{base:.3f}", f"{base / cur:.2f}x",
                     f"{d_img:.1e}", f"{d_grad:.1e}"])
        print(" | ".join(rows[-1]), flush=True)
    info = machine_info(torch.device("cpu"))
    text = (f"# Antialiased mesh render, forward + backward: current against {args.baseline}\n\n"
            f"{machine_line(info)}\n\n"
            f"`python scripts/bench_antialias.py --baseline {args.baseline} --resolution {args.resolution} "
            f"--views {args.views} --repeats {args.repeats} --threads {args.threads}`: each shape's exact SDF meshed "
            f"on a {args.grid}^3 grid, {args.views} evaluation views at {args.resolution} px; median seconds of "
            f"{args.repeats} alternating rounds after one warm-up.\n\n"
            + markdown(["shape", "faces", "current (s)", "baseline (s)", "speed-up", "image max diff",
                        "gradient max rel. diff"], rows, align="lrrrrrr") + "\n")
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"machine": info, "baseline": args.baseline,
                                                             "args": {k: str(v) for k, v in vars(args).items()},
                                                             "shapes": raw}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
