"""One timed round of ``att3d bench`` in a fresh process, for the current tree or a baseline worktree.

    python att3d/eval/bench_worker.py generate --tree TREE --model FOLDER --prompts PROMPTS.json [...]
    python att3d/eval/bench_worker.py scale --tree TREE --prompts PROMPTS.txt --embedding-cache DIR [...]

:mod:`att3d.eval.bench` runs this file as a *script* (never ``-m``, never imported from att3d) with
``--tree`` naming the source tree whose ``att3d`` package is timed: the tree being run, or a ``git worktree`` of
an earlier release (``att3d bench generate --baseline REV``). The tree goes first on ``sys.path`` before
anything imports att3d, so one script times either version, with the same prompts, threads and steps. It uses
only API that every version since the release before the speed work has (1c8c525):

- generate: :func:`att3d.load`, ``att3d.model.generate_meshes(model, prompts, batch_size=B, timer=StageTimer())``
  (:class:`att3d.utils.timing.StageTimer`), ``att3d.mesh.export_mesh`` (else ``mesh.export``) for the GLB,
  ``att3d.infer.turntable.mesh_turntable`` + ``att3d.infer.video.write_video`` for the turntable;
- scale: ``att3d.eval.bench.train_config``, ``att3d.config.build_trainer``, ``Trainer.train_step``.

The result is one line ``ATT3D_BENCH_RESULT {json}`` on stdout (anything else a library prints is ignored).
Nothing but the standard library is imported before the tree is on ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: Prefix of the result line on stdout.
MARKER = "ATT3D_BENCH_RESULT "
STARTED = time.time()  # wall clock at the start of this script (the parent adds the interpreter's start-up)


def use_tree(tree: str) -> str:
    """Put ``tree`` first on ``sys.path`` (and this script's folder off it); import att3d from there."""
    tree = os.path.abspath(tree)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    sys.path.insert(0, tree)
    import att3d

    where = os.path.abspath(att3d.__file__)
    if not where.startswith(os.path.join(tree, "")):
        raise SystemExit(f"att3d was imported from {where}, not from the tree {tree}")
    return where


def memory_status() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process in MB (``/proc/self/status``; empty elsewhere)."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = float(value.split()[0]) / 1024.0  # kB
    except OSError:
        pass
    return out


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_empty(mesh: Any) -> bool:
    return len(mesh.faces) == 0 or bool(mesh.metadata.get("att3d", {}).get("empty", False))


def run_generate(a: argparse.Namespace) -> dict[str, Any]:
    """Warm-up, then one timed text -> GLB run per batch size (``--prompts-per-round`` prompts or more, in whole
    batches), then the turntables of the smallest batch size's first batch."""
    import torch

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    import att3d
    from att3d.model import generate_meshes
    from att3d.utils.timing import StageTimer

    try:
        from att3d.mesh import export_mesh
    except ImportError:  # pragma: no cover - older trees
        export_mesh = None

    def write(mesh: Any, path: Path) -> None:
        if export_mesh is not None:
            export_mesh(mesh, path, "glb")
        else:  # pragma: no cover
            mesh.export(path)

    device = torch.device(a.device)
    model = att3d.load(a.model, device=device)
    load_seconds = time.perf_counter() - t0
    prompts = json.loads(Path(a.prompts).read_text())
    kw = json.loads(a.options)
    sizes = sorted(set(a.batch_sizes))
    cuda = device.type == "cuda"

    def turntable(mesh: Any, path: Path) -> dict[str, float]:
        from att3d.infer.turntable import mesh_turntable
        from att3d.infer.video import write_video

        _sync(device)
        s = time.perf_counter()
        frames = mesh_turntable(mesh, frames=a.frames, resolution=a.turntable_resolution, device=device)
        _sync(device)
        r = time.perf_counter()
        written = write_video(frames, path)
        v = time.perf_counter()
        return {"render": r - s, "video": v - r, "seconds": v - s, "file": Path(written).suffix}

    runs: list[dict[str, Any]] = []
    turntables: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="att3d-bench-worker-") as tmp:
        out = Path(tmp)
        w0 = time.perf_counter()
        for w in range(a.warmup):  # untimed: first calls compile kernels, fill allocators, start ffmpeg
            meshes = generate_meshes(model, prompts[:1], batch_size=1, progress=False, **kw)
            for i, m in enumerate(meshes):
                if not _is_empty(m):
                    write(m, out / f"warmup{w}-{i}.glb")
                    if a.turntable:
                        turntable(m, out / f"warmup{w}-{i}.mp4")
        warmup_seconds = time.perf_counter() - w0
        for b in sizes:
            n = b * max(1, -(-max(1, a.prompts_per_round) // b))  # whole batches (att3d.eval.bench.round_prompts)
            if n > len(prompts):
                raise SystemExit(f"{n} prompts per round at batch {b}, but the prompt file has {len(prompts)}")
            timer = StageTimer(sync=cuda)
            _sync(device)
            s = time.perf_counter()
            meshes = generate_meshes(model, prompts[:n], batch_size=b, timer=timer, progress=False, **kw)
            for i, m in enumerate(meshes):
                if not _is_empty(m):
                    with timer("export"):
                        write(m, out / f"b{b}-{i}.glb")
            _sync(device)
            runs.append({"batch_size": b, "prompts": n, "seconds": time.perf_counter() - s, "stages": timer.as_dict(),
                         "faces": sum(len(m.faces) for m in meshes) / n,
                         "empty": sum(_is_empty(m) for m in meshes)})
            if a.turntable and b == sizes[0]:  # the first batch's meshes
                turntables += [turntable(m, out / f"b{b}-{i}.mp4") for i, m in enumerate(meshes[:b])
                               if not _is_empty(m)]
    return {"model": str(Path(a.model).resolve()), "load_seconds": load_seconds, "warmup_seconds": warmup_seconds,
            "runs": runs, "turntables": turntables, "memory": memory_status()}


def run_scale(a: argparse.Namespace) -> dict[str, Any]:
    """Build the trainer on a prompt file, time step 1 (start-up) and ``--steps`` more steps; memory after them."""
    import torch

    torch.set_num_threads(a.threads)
    t_import = time.time()
    from att3d.config import build_trainer
    from att3d.eval.bench import train_config

    cache = Path(a.embedding_cache)

    def shards() -> set[str]:
        return {str(p.relative_to(cache)) for p in cache.glob("*/shard-*")} if cache.is_dir() else set()

    before = shards()
    overrides = [*a.set, f"prompts.train={a.prompts}", "prompts.heldout=null", "prompts.eval=null",
                 f"embedding_cache={cache}", f"trainer.device={a.device}", "progress=false"]
    if a.prior_path:
        overrides.append(f"guidance.prior.path={a.prior_path}")
    cfg = train_config(a.experiment or None, overrides)
    device = torch.device(a.device)
    with tempfile.TemporaryDirectory(prefix="att3d-bench-scale-") as tmp:
        t_build = time.time()
        trainer = build_trainer(cfg, Path(tmp) / "run")
        t_built = time.time()
        memory_built = memory_status()
        trainer.train_step()
        _sync(device)
        t_step1 = time.time()
        memory_step1 = memory_status()
        steps = []
        for _ in range(a.steps):
            s = time.perf_counter()
            trainer.train_step()
            _sync(device)
            steps.append(time.perf_counter() - s)
        prompts = len(trainer.prompts)
    written = sorted(shards() - before)
    return {"prompts": prompts, "cold": bool(written), "new_shards": written,
            "script_started": STARTED, "imported": t_build, "import_seconds": t_build - t_import,
            "build_seconds": t_built - t_build, "step1_seconds": t_step1 - t_built, "step1_done": t_step1,
            "step_seconds": steps, "median_step_seconds": statistics.median(steps) if steps else None,
            "memory_built": memory_built, "memory_step1": memory_step1, "memory": memory_status()}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_worker.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="kind", required=True)
    for name in ("generate", "scale"):
        s = sub.add_parser(name)
        s.add_argument("--tree", required=True, help="source tree whose att3d package is timed")
        s.add_argument("--threads", type=int, required=True, help="torch threads")
        s.add_argument("--device", default="cpu")
        s.add_argument("--prompts", required=True, help="generate: a JSON list; scale: a prompt file")
    g = sub.choices["generate"]
    g.add_argument("--model", required=True, help="model folder")
    g.add_argument("--batch-sizes", type=int, nargs="+", required=True)
    g.add_argument("--warmup", type=int, default=1)
    g.add_argument("--prompts-per-round", type=int, default=1,
                   help="prompts timed per batch size: this many or more, in whole batches")
    g.add_argument("--options", default="{}", help="JSON: keyword arguments of generate_meshes")
    g.add_argument("--turntable", action="store_true")
    g.add_argument("--frames", type=int, default=48)
    g.add_argument("--turntable-resolution", type=int, default=256)
    s = sub.choices["scale"]
    s.add_argument("--experiment", default="")
    s.add_argument("--embedding-cache", required=True)
    s.add_argument("--prior-path", default="")
    s.add_argument("--steps", type=int, default=5)
    s.add_argument("--set", nargs="*", default=[])
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    where = use_tree(a.tree)
    result = run_generate(a) if a.kind == "generate" else run_scale(a)
    import torch

    result.update({"att3d_file": where, "torch_threads": torch.get_num_threads(), "pid": os.getpid()})
    sys.stdout.write(MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
