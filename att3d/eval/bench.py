"""Speed benchmarks (``att3d bench``): generation latency and training throughput on this machine, side by side
with an earlier release when asked.

    att3d bench generate [--checkpoint PATH] [--batch-sizes 1 16] [--repeats 3] [--prompts-per-round 8]
                         [--baseline REV] [--threads N] [--turntable/--no-turntable] [--device auto] [--out results.md]
    att3d bench train [--experiment quickstart] [--steps 5] [--backends torch cuda] [--prior auto|tiny|PATH]
    att3d bench scale [--prompt-counts 64 1000 10000 100000] [--steps 5] [--prior tiny|auto|PATH]
                      [--embedding-cache DIR] [--fresh-cache] [--baseline REV]
    att3d bench all ...                     (generate and train; scale only when asked by name)

Each benchmark is a function ``(args, device) -> dict`` in :data:`BENCHMARKS` returning its
settings, result rows and a Markdown table; :func:`report` adds a description of the machine
(CPU model, GPU name, cores, torch threads, load average: a busy machine makes every number slower), and the
command (:mod:`att3d.cli.bench`) writes ``results.md`` and ``results.json`` (every raw time).

- **generate**: text -> GLB on disk, the whole path of ``att3d generate`` (text encoder, mapping, field on the
  grid, extraction, texture, mesh file), per prompt, for each batch size; per-stage seconds from
  :class:`att3d.utils.timing.StageTimer`; the median over ``--repeats`` runs after ``--warmup`` untimed ones.
  A run times ``--prompts-per-round`` prompts (default 8) or more, in whole batches (:func:`round_prompts`):
  at batch 1 the eight shapes (:func:`bench_prompts`), so that the figure is not one shape's (a single prompt
  per run spread a median by +-20% between runs on this project's shared CPU). A last row times the turntable
  (``--turntable``, default on: 48 frames at 256 px, render + MP4) that
  ``att3d generate`` adds per prompt, on the smallest batch size's first batch.

  With ``--baseline REV`` (any git revision: the previous release, ``HEAD``, ...) the same is measured for
  both versions in one run: REV is checked out, detached, in a git worktree under
  ``<repository>/.cache/bench-baseline/<sha>`` (:func:`baseline_worktree`; created once, reused; the main
  worktree is not touched), and both are timed by the same script (:mod:`att3d.eval.bench_worker`, using only
  API that both have) in fresh processes, in alternating rounds (current, baseline, current, ...; each round
  warms up itself), with the same threads (``--threads``, default all cores), prompts and batch sizes. The
  table gives the median seconds per prompt of each version and the speed-up ``baseline / current``
  (:func:`summarize_generate`, :func:`side_by_side_markdown`).
- **train**: amortized SDS training steps of the trainer itself (:class:`att3d.train.trainer.Trainer`)
  built from the Hydra configs, with the shapes prior (or a tiny random one when it is not
  available: the numbers then time everything but a realistic UNet); steps/s and rendered rays/s
  for each renderer backend, and peak memory (CUDA: ``max_memory_allocated``; CPU: the process's
  peak resident set, which includes everything loaded so far).
- **scale**: training at the scale of the prompt set. For each N of ``--prompt-counts``, a prompt file of N
  distinct prompts (:func:`scale_prompts`: the captions, their wordings, numbered variants) is trained on by
  the trainer of the Hydra configs (``prompts.train=FILE``) in its own process (a clean resident set, run by
  :mod:`att3d.eval.bench_worker`): start-up to the end of training step 1 (interpreter, imports, config,
  model, prompt embeddings through the embedding cache, step 1), with a cold cache when the cache had to
  embed prompts and then again warm; the median step time of ``--steps`` steps after it; the resident set
  (``VmRSS``) and its growth per 1k prompts over the smallest N (:func:`summarize_scale`). The cache lives in
  ``--embedding-cache`` (default ``~/.cache/att3d/bench-scale``), one folder per N so that "warm" means all N
  prompts cached and "cold" all N embedded (``--fresh-cache`` empties them first). The prior is the tiny
  random one by default (``--prior tiny``): what grows with N is what counts here, not the UNet's time.
  With ``--baseline REV`` each N is also run by the baseline tree (warm: the current filled the cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from att3d.infer.generate import write_outputs
from att3d.mesh.extract import is_empty
from att3d.model import generate_meshes as generate
from att3d.utils.errors import Att3dError
from att3d.utils.paths import resolve_model_folder, resolve_path
from att3d.utils.timing import STAGES, StageTimer


class BenchError(Att3dError):
    """A benchmark cannot run as asked."""


#: The turntable that ``att3d generate`` renders per prompt by default (frames, pixels).
TURNTABLE_FRAMES, TURNTABLE_RESOLUTION = 48, 256
#: Where baseline worktrees live, relative to the repository root (one folder per full commit sha).
BASELINE_DIR = Path(".cache") / "bench-baseline"
#: The benchmarks that ``att3d bench all`` runs (scale, long at its default counts, runs when named).
ALL = ("generate", "train")


# ---------------------------------------------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------------------------------------------

def available_cores() -> int:
    """CPU cores this process may run on (its affinity on Linux, else :func:`os.cpu_count`)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    from att3d import __version__

    cores = available_cores()
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": cores,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "att3d": __version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    return info


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    load = info.get("load_average_1min")
    busy = f", load average {load} on {info['cpu_cores']} cores" if load is not None else ""
    return (f"{info['cpu']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads){gpu}; "
            f"device {info['device']}{busy}; torch {info['torch']}, att3d {info['att3d']}, {info['date']}")


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset; CPU: the process's peak resident set (MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A Markdown table; ``align`` has one ``l``/``r`` per column (default: first left, others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Baseline worktree and worker processes
# ---------------------------------------------------------------------------------------------------------------

def _git(repo: str | os.PathLike, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BenchError("--baseline needs git, which is not installed") from None


def package_tree() -> Path:
    """The source tree whose ``att3d`` package is running (the folder holding ``att3d/``)."""
    import att3d

    return Path(att3d.__file__).resolve().parent.parent


def repo_root(path: str | os.PathLike | None = None) -> Path:
    """The root of the git checkout holding ``path`` (default: the running att3d package).

    Raises:
        BenchError: ``path`` is not in a git checkout (e.g. att3d installed from a wheel).
    """
    path = Path(path) if path is not None else package_tree()
    res = _git(path, "rev-parse", "--show-toplevel")
    if res.returncode != 0:
        raise BenchError(f"--baseline needs att3d run from a git checkout; {path} is not in one")
    return Path(res.stdout.strip()).resolve()


def resolve_revision(repo: str | os.PathLike, rev: str) -> str:
    """The full sha of the commit ``rev`` names in ``repo``; a one-line :class:`BenchError` if none."""
    res = _git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
    if res.returncode != 0 or not res.stdout.strip() or rev.startswith("-"):
        raise BenchError(f"unknown git revision {rev!r} in {repo}")
    return res.stdout.strip()


def describe_tree(tree: str | os.PathLike) -> dict[str, Any]:
    """``tree``'s commit and whether it has uncommitted changes to tracked files (None outside git)."""
    head = _git(tree, "rev-parse", "HEAD")
    if head.returncode != 0:
        return {"path": str(tree), "commit": None, "dirty": None}
    status = _git(tree, "status", "--porcelain", "--untracked-files=no")
    return {"path": str(tree), "commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def baseline_worktree(repo: str | os.PathLike, rev: str) -> Path:
    """A detached git worktree of ``rev`` under ``<repo>/.cache/bench-baseline/<full sha>`` (created or reused).

    Only ``.git``'s worktree list and the new folder change: the main worktree, its index and its branch are
    untouched. A folder there that is not a clean worktree of that commit (an interrupted checkout, local
    edits) is a one-line :class:`BenchError` naming it, rather than a silently different baseline.

    Raises:
        BenchError: ``repo`` is not a git checkout, ``rev`` names no commit, or ``git worktree add`` failed.
    """
    root = repo_root(repo)
    sha = resolve_revision(root, rev)
    path = root / BASELINE_DIR / sha
    if path.exists():
        head = _git(path, "rev-parse", "HEAD")
        top = _git(path, "rev-parse", "--show-toplevel")
        if head.returncode != 0 or head.stdout.strip() != sha or Path(top.stdout.strip()).resolve() != path.resolve():
            raise BenchError(f"{path} is not a worktree of {sha[:12]} (an interrupted checkout?): remove it with "
                             f"'git worktree remove --force {path}' (or delete it) and run again")
        if describe_tree(path)["dirty"]:
            raise BenchError(f"the baseline worktree {path} has local changes: remove it with "
                             f"'git worktree remove --force {path}' and run again")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # --force: a worktree of this path that was deleted without 'git worktree remove' is still registered
    res = _git(root, "worktree", "add", "--force", "--detach", str(path), sha)
    if res.returncode != 0:
        msg = " ".join((res.stderr or res.stdout).split())[:300]
        raise BenchError(f"git worktree add {path} {sha[:12]} failed: {msg}")
    return path


def worker_script() -> Path:
    """The worker script of this tree (:mod:`att3d.eval.bench_worker`), run for every version timed."""
    return Path(__file__).resolve().with_name("bench_worker.py")


def thread_env(threads: int) -> dict[str, str]:
    """The environment of a worker: this one, with every thread pool set to ``threads``."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[key] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_worker(kind: str, tree: str | os.PathLike, argv: Sequence[str], threads: int, device: torch.device,
               label: str) -> dict[str, Any]:
    """Run :mod:`att3d.eval.bench_worker` ``kind`` on ``tree`` in a fresh process; its result dict, with
    ``spawned`` (this process's wall clock just before the start) and ``wall_seconds`` added.

    Raises:
        BenchError: the worker failed (its last line of error output) or printed no result.
    """
    from att3d.eval.bench_worker import MARKER

    cmd = [sys.executable, str(worker_script()), kind, "--tree", str(tree), "--threads", str(threads),
           "--device", str(device), *argv]
    spawned = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads), check=False)
    wall = time.time() - spawned
    lines = [ln[len(MARKER):] for ln in res.stdout.splitlines() if ln.startswith(MARKER)]
    if res.returncode != 0 or not lines:
        if os.environ.get("ATT3D_DEBUG"):
            sys.stderr.write(res.stderr)
        tail = [ln.strip() for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
        why = tail[-1][:300] if tail else "no output"
        raise BenchError(f"the {label} {kind} worker ({tree}) failed with exit code {res.returncode}: {why}")
    out = json.loads(lines[-1])
    out.update({"spawned": spawned, "wall_seconds": wall})
    return out


def versions(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``{"current": {...}, "baseline": {...}}``: each version's tree and commit (baseline only with
    ``--baseline``; its worktree is created here)."""
    current = package_tree()
    out = {"current": describe_tree(current)}
    if getattr(args, "baseline", None):
        path = baseline_worktree(current, args.baseline)
        if not (path / "att3d" / "__init__.py").is_file():
            raise BenchError(f"revision {args.baseline!r} has no att3d package at its root ({path})")
        out["baseline"] = {**describe_tree(path), "revision": args.baseline}
    return out


def version_line(v: dict[str, dict[str, Any]]) -> str:
    def one(d: dict[str, Any]) -> str:
        if d.get("commit") is None:
            return d["path"]
        rev = f"{d['revision']} = " if d.get("revision") and d["revision"] != d["commit"] else ""
        return f"{rev}{d['commit'][:12]}{' + uncommitted changes' if d.get('dirty') else ''} ({d['path']})"

    line = f"current: {one(v['current'])}"
    if "baseline" in v:
        line += f"; baseline: {one(v['baseline'])}"
    return line


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _ratio(a: float, b: float) -> float | None:
    return a / b if b and b > 0 and a == a and b == b else None


def _fmt_ratio(r: float | None) -> str:
    return f"{r:.2f}x" if r is not None else "-"


# ---------------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------------

def bench_prompts(n: int) -> list[str]:
    """``n`` distinct prompts: the shapes world's captions one shape after another (the eight shapes in red, then
    in orange, ...), so that any eight in a row cover every shape, then numbered variants."""
    from att3d.world.shapes import COLOUR_NAMES, SHAPE_NAMES, WorldObject

    caps = [WorldObject(shape, colour).caption for colour in COLOUR_NAMES for shape in SHAPE_NAMES]
    return [caps[i] if i < len(caps) else f"{caps[i % len(caps)]} number {i // len(caps)}" for i in range(n)]


#: Prompts timed per round at each batch size (at least the batch; a multiple of it): the eight shapes at batch 1,
#: so that a round's time is not one shape's.
PROMPTS_PER_ROUND = 8


def round_prompts(batch_size: int, per_round: int = PROMPTS_PER_ROUND) -> int:
    """How many prompts a round times at ``batch_size``: ``per_round`` rounded up to whole batches.

    >>> round_prompts(1), round_prompts(3), round_prompts(16), round_prompts(1, 1)
    (8, 9, 16, 1)
    """
    b = max(1, int(batch_size))
    return b * max(1, -(-max(1, int(per_round)) // b))


def generate_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`att3d.model.generate_meshes` from the command line."""
    return {"grid_resolution": args.resolution, "texture_size": args.texture_size, "threshold": args.threshold,
            "smooth_iterations": args.smooth, "uv_method": args.uv}


def turntable_label(args: argparse.Namespace) -> str:
    frames = getattr(args, "frames", TURNTABLE_FRAMES)
    res = getattr(args, "turntable_resolution", TURNTABLE_RESOLUTION)
    return f"+ turntable ({frames} frames, {res} px)"


def time_turntable(mesh: Any, path: Path, frames: int, resolution: int, device: torch.device) -> dict[str, float]:
    """Seconds of one mesh's turntable: ``render`` (:func:`~att3d.infer.turntable.mesh_turntable`), ``video``
    (:func:`~att3d.infer.video.write_video`) and their sum ``seconds``."""
    from att3d.infer.turntable import mesh_turntable
    from att3d.infer.video import write_video

    _sync(device)
    t0 = time.perf_counter()
    video = mesh_turntable(mesh, frames=frames, resolution=resolution, device=device)
    _sync(device)
    t1 = time.perf_counter()
    write_video(video, path)
    t2 = time.perf_counter()
    return {"render": t1 - t0, "video": t2 - t1, "seconds": t2 - t0}


def summarize_turntables(records: Sequence[dict[str, float]]) -> dict[str, Any] | None:
    """Median seconds per prompt of turntable records (``render``, ``video``, ``seconds``); None without any."""
    if not records:
        return None
    return {"seconds_per_prompt": _median([r["seconds"] for r in records]),
            "render_seconds_per_prompt": _median([r["render"] for r in records]),
            "video_seconds_per_prompt": _median([r["video"] for r in records]),
            "min_seconds_per_prompt": min(r["seconds"] for r in records), "count": len(records)}


def summarize_runs(res: Sequence[dict[str, Any]], b: int, stages: Sequence[str] = STAGES) -> dict[str, Any]:
    """One batch size's runs (``seconds``, ``stages``, ``faces``, ``empty`` each, and ``prompts``: how many it
    timed, default ``b``) -> medians per prompt."""
    per_run = [x["seconds"] / x.get("prompts", b) for x in res]
    per_prompt = _median(per_run)
    return {"batch_size": b, "repeats": len(res), "seconds_per_prompt": per_prompt,
            "prompts_per_second": 1.0 / per_prompt if per_prompt > 0 else float("inf"),
            "prompts_per_round": max(x.get("prompts", b) for x in res),
            "min_seconds_per_prompt": min(per_run), "max_seconds_per_prompt": max(per_run),
            "stage_seconds_per_prompt": {k: _median([x["stages"].get(k, 0.0) / x.get("prompts", b) for x in res])
                                         for k in stages},
            "faces_per_mesh": statistics.mean(x["faces"] for x in res),
            "empty_meshes": max(x["empty"] for x in res)}


def bench_generate(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Text -> mesh file latency per prompt and per stage, for each batch size (and the turntable's)."""
    if getattr(args, "baseline", None):
        return bench_generate_baseline(args, device)
    from tqdm import tqdm

    from att3d.model import load

    folder = resolve_model_folder(args.checkpoint)
    model = load(folder, device=device)
    kw = generate_options(args)
    stages = [*STAGES]
    sizes = sorted(set(args.batch_sizes))
    per_round = getattr(args, "prompts_per_round", PROMPTS_PER_ROUND)
    prompts = bench_prompts(max(round_prompts(b, per_round) for b in sizes))
    turntable = getattr(args, "turntable", True)
    frames = getattr(args, "frames", TURNTABLE_FRAMES)
    tt_res = getattr(args, "turntable_resolution", TURNTABLE_RESOLUTION)
    turntables: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="att3d-bench-") as tmp:
        for w in range(args.warmup):
            meshes = generate(model, prompts[:1], batch_size=1, progress=False, **kw)
            write_outputs(meshes, prompts[:1], tmp, format=args.format, turntable=False, progress=False)
            if turntable and not is_empty(meshes[0]):
                time_turntable(meshes[0], Path(tmp) / f"warmup{w}.mp4", frames, tt_res, device)
        runs = [(b, r) for b in sizes for r in range(args.repeats)]
        results: dict[int, list[dict[str, Any]]] = {b: [] for b in sizes}
        for b, r in tqdm(runs, desc="bench generate", disable=args.quiet):
            out = Path(tmp) / f"b{b}-r{r}"
            timer = StageTimer(sync=device.type == "cuda")
            _sync(device)
            t0 = time.perf_counter()
            n = round_prompts(b, per_round)
            meshes = generate(model, prompts[:n], batch_size=b, timer=timer, progress=False, **kw)
            write_outputs(meshes, prompts[:n], out, format=args.format, turntable=False, timer=timer,
                          progress=False)
            _sync(device)
            total = time.perf_counter() - t0
            results[b].append({"seconds": total, "prompts": n, "stages": timer.as_dict(stages),
                               "faces": sum(len(m.faces) for m in meshes) / n,
                               "empty": sum(is_empty(m) for m in meshes)})
            if turntable and b == sizes[0]:  # the first batch's meshes
                turntables += [time_turntable(m, out / f"turntable-{i}.mp4", frames, tt_res, device)
                               for i, m in enumerate(meshes[:b]) if not is_empty(m)]
    rows = [summarize_runs(results[b], b, stages) for b in sizes]
    tt = summarize_turntables(turntables)
    header = ["batch", "s / prompt", "prompts / s", *stages, "faces", "empty"]
    table = [[str(r["batch_size"]), f"{r['seconds_per_prompt']:.3f}", f"{r['prompts_per_second']:.2f}",
              *(f"{r['stage_seconds_per_prompt'][k]:.3f}" for k in stages), f"{r['faces_per_mesh']:.0f}",
              str(r["empty_meshes"])] for r in rows]
    if tt is not None:
        table.append([turntable_label(args), f"{tt['seconds_per_prompt']:.3f}",
                      f"{1.0 / tt['seconds_per_prompt']:.2f}", *("-" for _ in stages), "", ""])
    settings = {"checkpoint": str(folder), "grid_resolution": args.resolution, "texture_size": args.texture_size,
                "threshold": args.threshold, "smooth_iterations": args.smooth, "uv": args.uv, "format": args.format,
                "repeats": args.repeats, "warmup": args.warmup, "threads": torch.get_num_threads(),
                "prompts_per_round": per_round,
                "turntable": turntable, "turntable_frames": frames, "turntable_resolution": tt_res}
    notes = [f"Text -> {args.format.upper()} on disk per prompt (median of {args.repeats} runs, seconds; a run "
             f"times {_n(per_round, 'prompt')} or more, in whole batches: {', '.join(bench_prompts(2))}, ...); "
             f"stages per prompt. Grid {args.resolution}^3, texture {args.texture_size}^2, uv {args.uv}, "
             f"model {folder}."]
    if tt is not None:
        notes.append(f"The turntable row is what a turntable adds per prompt (median of {tt['count']}, the "
                     f"batch-{sizes[0]} meshes): render {tt['render_seconds_per_prompt']:.3f} s + video "
                     f"{tt['video_seconds_per_prompt']:.3f} s.")
    if any(sum(r["stage_seconds_per_prompt"].values()) > 1.01 * r["seconds_per_prompt"] for r in rows):
        notes.append("The meshes of a batch are made in overlapping threads: their stages add up to more than "
                     "the total.")
    if any(r["empty_meshes"] for r in rows):
        notes.append("Some prompts gave no surface (empty meshes skip texturing and export): times are not "
                     "representative; lower --threshold or use a trained model.")
    return {"settings": settings, "rows": rows, "turntable": tt,
            "markdown": " ".join(notes) + "\n\n" + markdown(header, table)}


def summarize_generate(rounds: dict[str, list[dict[str, Any]]], sizes: Sequence[int],
                       stages: Sequence[str] = STAGES) -> dict[str, Any]:
    """Side-by-side summary of worker rounds: ``rounds[version]`` is a list of worker results (``runs``:
    ``batch_size``, ``seconds``, ``stages``, ``faces``, ``empty``; ``turntables``: ``render``, ``video``,
    ``seconds``) of ``version`` ``current`` or ``baseline``.

    Returns:
        ``rows``: per batch size, ``{"batch_size", "current": summary, "baseline": summary, "speedup",
        "paired_speedups"}`` (a summary as :func:`summarize_runs`; ``speedup`` = baseline median / current
        median; ``paired_speedups``: the ratio of each round pair, to show the spread), and ``turntable``: the
        same of the turntable's seconds per prompt (None when neither version timed one).
    """
    rows = []
    for b in sizes:
        row: dict[str, Any] = {"batch_size": b}
        per_round: dict[str, list[float]] = {}
        for version, results in rounds.items():
            runs = [r for res in results for r in res["runs"] if r["batch_size"] == b]
            if not runs:
                raise BenchError(f"no {version} run of batch size {b}")
            row[version] = summarize_runs(runs, b, stages)
            per_round[version] = [r["seconds"] / r.get("prompts", b) for r in runs]
        cur = row["current"]["seconds_per_prompt"]
        if "baseline" in row:
            row["speedup"] = _ratio(row["baseline"]["seconds_per_prompt"], cur)
            row["paired_speedups"] = [x / y for x, y in zip(per_round["baseline"], per_round["current"]) if y > 0]
        rows.append(row)
    tt: dict[str, Any] = {}
    for version, results in rounds.items():
        records = [t for res in results for t in res.get("turntables", [])]
        tt[version] = summarize_turntables(records)
    if all(v is None for v in tt.values()):
        turntable = None
    else:
        turntable = dict(tt)
        if tt.get("current") and tt.get("baseline"):
            turntable["speedup"] = _ratio(tt["baseline"]["seconds_per_prompt"], tt["current"]["seconds_per_prompt"])
    return {"rows": rows, "turntable": turntable}


def side_by_side_markdown(summary: dict[str, Any], stages: Sequence[str] = STAGES,
                          turntable_row: str = turntable_label(argparse.Namespace())) -> str:
    """The table of :func:`summarize_generate`: per batch size (and the turntable), each version's median
    seconds per prompt, the speed-up ``baseline / current``, the current's stage split and both face counts."""
    def secs(d: dict[str, Any] | None) -> str:
        return f"{d['seconds_per_prompt']:.3f}" if d else "-"

    header = ["batch", "current s / prompt", "baseline s / prompt", "speed-up", *stages,
              "faces (current / baseline)"]
    table = []
    for r in summary["rows"]:
        cur, base = r["current"], r.get("baseline")
        faces = f"{cur['faces_per_mesh']:.0f}" + (f" / {base['faces_per_mesh']:.0f}" if base else "")
        table.append([str(r["batch_size"]), secs(cur), secs(base), _fmt_ratio(r.get("speedup")),
                      *(f"{cur['stage_seconds_per_prompt'][k]:.3f}" for k in stages), faces])
    tt = summary.get("turntable")
    if tt:
        table.append([turntable_row, secs(tt.get("current")), secs(tt.get("baseline")),
                      _fmt_ratio(tt.get("speedup")), *("-" for _ in stages), ""])
    return markdown(header, table)


def bench_generate_baseline(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """``bench generate --baseline REV``: both versions timed by the same worker in alternating fresh processes."""
    from tqdm import tqdm

    folder = resolve_model_folder(args.checkpoint).resolve()
    v = versions(args)
    models = {"current": folder, "baseline": folder}
    if getattr(args, "baseline_checkpoint", None) is not None:  # relative: inside the baseline's worktree
        given = Path(args.baseline_checkpoint)
        models["baseline"] = resolve_model_folder(given if given.is_absolute()
                                                  else Path(v["baseline"]["path"]) / given).resolve()
    threads = args.threads or available_cores()
    sizes = sorted(set(args.batch_sizes))
    per_round = getattr(args, "prompts_per_round", PROMPTS_PER_ROUND)
    kw = generate_options(args)
    turntable = getattr(args, "turntable", True)
    frames = getattr(args, "frames", TURNTABLE_FRAMES)
    tt_res = getattr(args, "turntable_resolution", TURNTABLE_RESOLUTION)
    if args.format != "glb":
        raise BenchError("--baseline times GLB files (the worker's format); drop --format")
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rounds: dict[str, list[dict[str, Any]]] = {"current": [], "baseline": []}
    with tempfile.TemporaryDirectory(prefix="att3d-bench-") as tmp:
        prompt_file = Path(tmp) / "prompts.json"
        prompt_file.write_text(json.dumps(bench_prompts(max(round_prompts(b, per_round) for b in sizes))))
        argv = ["--prompts", str(prompt_file), "--batch-sizes", *map(str, sizes),
                "--prompts-per-round", str(per_round),
                "--warmup", str(args.warmup), "--options", json.dumps(kw), "--frames", str(frames),
                "--turntable-resolution", str(tt_res), *(["--turntable"] if turntable else [])]
        order = [(r, version) for r in range(args.repeats) for version in ("current", "baseline")]
        for r, version in tqdm(order, desc="bench generate (current | baseline rounds)", disable=args.quiet):
            res = run_worker("generate", v[version]["path"], ["--model", str(models[version]), *argv], threads,
                             device, version)
            res["round"] = r
            rounds[version].append(res)
    stages = [*STAGES]
    summary = summarize_generate(rounds, sizes, stages)
    settings = {"checkpoint": str(folder), "baseline_checkpoint": str(models["baseline"]), **kw, "format": "glb",
                "repeats": args.repeats, "warmup": args.warmup, "prompts_per_round": per_round,
                "threads": threads, "turntable": turntable, "turntable_frames": frames,
                "turntable_resolution": tt_res, "versions": v, "load_average_1min_start": load_start,
                "load_average_1min_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                "worker_threads": sorted({res["torch_threads"] for rs in rounds.values() for res in rs})}
    notes = [f"Text -> GLB on disk per prompt, seconds: median of {_n(args.repeats, 'round')} per version, "
             f"alternating current and baseline, each a fresh process ({_n(args.warmup, 'warm-up run')} first, "
             f"{_n(threads, 'thread')}; a round times {_n(per_round, 'prompt')} or more per batch size, in whole "
             f"batches: {', '.join(bench_prompts(2))}, ...); "
             f"speed-up = baseline / current; stages: the current's, per prompt. Grid {args.resolution}^3, "
             f"texture {args.texture_size}^2, uv {args.uv}, model {folder}"
             + (f" (baseline: {models['baseline']})" if models["baseline"] != folder else "") + ".",
             version_line(v) + "."]
    tt = summary["turntable"]
    if tt:
        parts = [f"{k} render {d['render_seconds_per_prompt']:.3f} s + video {d['video_seconds_per_prompt']:.3f} s"
                 for k, d in tt.items() if k in ("current", "baseline") and d]
        notes.append(f"The turntable row is what a turntable adds per prompt (the batch-{sizes[0]} meshes): "
                     + "; ".join(parts) + ".")
    for r in summary["rows"]:
        fc, fb = r["current"]["faces_per_mesh"], r["baseline"]["faces_per_mesh"]
        if abs(fc - fb) > 0.05 * max(fc, fb, 1):
            notes.append(f"The versions' meshes differ in size at batch {r['batch_size']} ({fc:.0f} vs {fb:.0f} "
                         "faces): the speed-up compares different outputs.")
            break
    if any(sum(r["current"]["stage_seconds_per_prompt"].values()) > 1.01 * r["current"]["seconds_per_prompt"]
           for r in summary["rows"]):
        notes.append("The meshes of a batch are made in overlapping threads: their stages add up to more than "
                     "the total.")
    if any(r[k]["empty_meshes"] for r in summary["rows"] for k in ("current", "baseline")):
        notes.append("Some prompts gave no surface: times are not representative.")
    return {"settings": settings, "rows": summary["rows"], "turntable": tt, "rounds": rounds,
            "markdown": notes[0] + "\n\n" + " ".join(notes[1:]) + "\n\n"
            + side_by_side_markdown(summary, stages, turntable_label(args))}


# ---------------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------------

def tiny_prior(folder: str | os.PathLike) -> Path:
    """Save a small random shapes prior (the shipped architecture's interface, fewer channels) into ``folder``."""
    import diffusers

    from att3d.world.prior_training import PriorArchitecture, build_scheduler, build_unet, save_prior

    arch = PriorArchitecture(block_out_channels=(16, 32), attention_head_dim=8, norm_num_groups=8)
    torch.manual_seed(0)
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # fp16 casting notices of a throw-away prior
    try:
        save_prior(folder, build_unet(arch), build_scheduler(arch), arch,
                   card_extra={"note": "random, for benchmarks"})
    finally:
        diffusers.utils.logging.set_verbosity(level)
    return Path(folder)


def train_config(experiment: str | None, overrides: Sequence[str]) -> dict[str, Any]:
    """The resolved ``att3d train`` config (:func:`att3d.config.compose`) without the run-folder keys."""
    from att3d.config import compose

    ov = ([f"experiment={experiment}"] if experiment else []) + list(overrides)
    cfg = compose("train", ov)
    for key in ("run_dir", "name", "hydra", "resume"):
        cfg.pop(key, None)
    return cfg


def train_overrides(args: argparse.Namespace, *extra: str) -> list[str]:
    """The train-config overrides of ``--set``, then ``extra``, then ``--train-batch-size`` / ``--train-resolution``."""
    out = [*args.set, *extra]
    if args.train_batch_size:
        out.append(f"trainer.batch_size={args.train_batch_size}")
    if args.train_resolution:
        out.append(f"trainer.resolution={args.train_resolution}")
    return out


def bench_train(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Training steps per second and rendered rays per second per renderer backend."""
    from tqdm import tqdm

    from att3d.config import build_trainer
    from att3d.render import nerfacc_backend

    overrides = train_overrides(args, f"trainer.device={device}", "progress=false")
    cfg = train_config(args.experiment, overrides)
    # Both paths by default: without CUDA the nerfacc row says it was skipped rather than vanishing.
    backends = list(dict.fromkeys(args.backends or ["torch", "cuda"]))
    for b in backends:
        if b not in ("torch", "cuda"):
            raise BenchError(f"unknown renderer backend {b!r}; choose torch or cuda")
    with tempfile.TemporaryDirectory(prefix="att3d-bench-train-") as tmp:
        prior_path, prior_kind = choose_prior(cfg, args.prior or "auto", tmp)
        if prior_path is not None:
            cfg["guidance"]["prior"]["path"] = prior_path
        trainer = build_trainer(cfg, Path(tmp) / "run")
        tcfg = trainer.cfg
        rays_per_step = tcfg.batch_size * tcfg.resolution**2
        rows = []
        for backend in backends:
            if backend == "cuda" and (device.type != "cuda" or not nerfacc_backend.nerfacc_available()):
                rows.append({"backend": backend, "skipped": "needs CUDA and nerfacc"})
                continue
            trainer.model.renderer.backend = backend
            for _ in range(args.warmup):
                trainer.train_step()
            _reset_peak(device)
            _sync(device)
            t0 = time.perf_counter()
            for _ in tqdm(range(args.steps), desc=f"train ({backend})", disable=args.quiet):
                trainer.train_step()
            _sync(device)
            dt = time.perf_counter() - t0
            rows.append({"backend": backend, "steps": args.steps, "seconds_per_step": dt / args.steps,
                         "steps_per_second": args.steps / dt, "rays_per_second": rays_per_step * args.steps / dt,
                         "peak_memory_mb": peak_memory_mb(device)})
    mem = "peak CUDA memory (MB)" if device.type == "cuda" else "peak RSS (MB)"
    header = ["backend", "steps/s", "s/step", "rays/s", mem]
    table = [[r["backend"], "-", "-", "-", f"skipped: {r['skipped']}"] if "skipped" in r else
             [r["backend"], f"{r['steps_per_second']:.2f}", f"{r['seconds_per_step']:.3f}",
              f"{r['rays_per_second']:.0f}", f"{r['peak_memory_mb']:.0f}"] for r in rows]
    settings = {"experiment": args.experiment, "overrides": overrides, "batch_size": tcfg.batch_size,
                "resolution": tcfg.resolution, "steps": args.steps, "warmup": args.warmup, "prior": prior_kind,
                "num_samples": trainer.model.renderer.num_samples}
    note = (f"Amortized SDS training steps ({args.steps} timed after {args.warmup} warm-up): batch "
            f"{tcfg.batch_size} prompts at {tcfg.resolution}^2 ({rays_per_step} rays per step), "
            f"prior: {prior_kind}.")
    if getattr(args, "baseline", None):
        note += (f" Current tree only: `--baseline {args.baseline}` times the baseline for generate and scale, not "
                 "for this benchmark (`bench scale --baseline` compares training steps side by side).")
    return {"settings": settings, "rows": rows, "markdown": note + "\n\n" + markdown(header, table)}


def scale_prompts(n: int) -> tuple[list[str], str]:
    """``n`` distinct prompts for ``bench scale`` and where they come from: the shapes-world captions, then
    their other wordings (the ``shapes_wordings`` prompt set, where this tree has it), then numbered variants of
    those (``<prompt> number <k>``), like :func:`bench_prompts` (which it is without the wordings)."""
    from att3d.world import prompt_sets
    from att3d.world.shapes import all_captions

    wordings = getattr(prompt_sets, "shapes_wordings", None)
    if wordings is None:
        return bench_prompts(n), "shapes-world captions, then numbered variants"
    # the captions in bench_prompts' order (a caption is also one of its wordings)
    pool = list(dict.fromkeys([*bench_prompts(len(all_captions())), *wordings()]))
    out = pool[:n] + [f"{pool[i % len(pool)]} number {i // len(pool)}" for i in range(len(pool), n)]
    return out, f"shapes-world captions, their wordings ({len(pool)} in all), then numbered variants"


def choose_prior(cfg: dict[str, Any], choice: str, folder: str | os.PathLike) -> tuple[str | None, str]:
    """The prior of a train benchmark: ``(path or None for the config's own, description)``.

    ``choice``: ``auto`` (the config's prior; a tiny random one in ``folder`` when it is the shapes prior and not
    there), ``tiny`` (the tiny random shapes prior, for a shapes-prior config) or a prior folder.
    """
    prior_cfg = cfg["guidance"]["prior"]
    prior_path = resolve_path(prior_cfg.get("path") or "")
    if prior_cfg.get("name") == "shapes" and (
            choice == "tiny" or (choice == "auto" and not (prior_path / "prior_config.json").is_file())):
        return str(tiny_prior(Path(folder) / "prior")), "tiny random shapes prior (16/32 channels)"
    if choice not in ("auto", "tiny"):
        return str(choice), str(choice)
    return None, str(prior_path)


def default_scale_cache() -> Path:
    """The embedding cache of ``bench scale``: ``<XDG cache>/att3d/bench-scale`` (persistent: later runs are warm)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "att3d" / "bench-scale"


def summarize_scale(runs: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of ``bench scale`` from worker results per prompt count (in the order run: a cold one first when the
    cache had to embed prompts, then a warm one; each with ``startup_seconds``, ``step_seconds``, ``memory``).

    Each row: ``prompts``, ``startup_cold_seconds`` (None when the first run was warm already),
    ``startup_warm_seconds``, ``seconds_per_step`` (median, warm run), ``step_ratio`` (over the smallest count),
    ``rss_mb`` (VmRSS after the steps, warm run), ``rss_growth_per_1k_mb`` (over the smallest count; None for it),
    ``peak_rss_mb``, ``anon_rss_mb`` and the phases of the warm start-up (``import``, ``build``, ``step1``).
    """
    rows = []
    for n in sorted(runs):
        rs = runs[n]
        cold = next((r for r in rs if r.get("cold")), None)
        warm = next((r for r in reversed(rs) if not r.get("cold")), rs[-1])
        mem = warm.get("memory", {})
        rows.append({"prompts": n, "startup_cold_seconds": cold["startup_seconds"] if cold else None,
                     "startup_warm_seconds": warm["startup_seconds"] if not warm.get("cold") else None,
                     "seconds_per_step": _median(warm["step_seconds"]),
                     "rss_mb": mem.get("VmRSS"), "peak_rss_mb": mem.get("VmHWM"), "anon_rss_mb": mem.get("RssAnon"),
                     "startup_phases": {"interpreter_and_imports": warm["imported"] - warm["spawned"],
                                        "build_trainer": warm["build_seconds"], "step1": warm["step1_seconds"]}})
    if rows:
        first = rows[0]
        for r in rows:
            r["step_ratio"] = _ratio(r["seconds_per_step"], first["seconds_per_step"])
            dn = r["prompts"] - first["prompts"]
            r["rss_growth_per_1k_mb"] = ((r["rss_mb"] - first["rss_mb"]) / dn * 1000
                                         if dn > 0 and r["rss_mb"] is not None and first["rss_mb"] is not None
                                         else None)
    return rows


def scale_markdown(rows: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]] | None = None) -> str:
    """The table of ``bench scale`` (with the baseline's warm start-up, step time, speed-up and RSS if given)."""
    def f(x: float | None, fmt: str) -> str:
        return format(x, fmt) if x is not None else "-"

    header = ["prompts", "start-up cold (s)", "start-up warm (s)", "s / step", "step time vs smallest",
              "RSS (MB)", "RSS growth per 1k prompts (MB)"]
    if baseline is not None:
        header += ["baseline start-up warm (s)", "baseline s / step", "step speed-up", "baseline RSS (MB)"]
    by_n = {b["prompts"]: b for b in baseline or []}
    table = []
    for r in rows:
        line = [str(r["prompts"]), f(r["startup_cold_seconds"], ".1f"), f(r["startup_warm_seconds"], ".1f"),
                f(r["seconds_per_step"], ".3f"), _fmt_ratio(r["step_ratio"]), f(r["rss_mb"], ".0f"),
                f(r["rss_growth_per_1k_mb"], ".1f")]
        if baseline is not None:
            b = by_n.get(r["prompts"], {})
            line += [f(b.get("startup_warm_seconds"), ".1f"), f(b.get("seconds_per_step"), ".3f"),
                     _fmt_ratio(_ratio(b.get("seconds_per_step") or float("nan"), r["seconds_per_step"])),
                     f(b.get("rss_mb"), ".0f")]
        table.append(line)
    return markdown(header, table)


def bench_scale(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Start-up, step time and resident memory of training on N prompts, each N in its own process."""
    from tqdm import tqdm

    counts = sorted(set(args.prompt_counts))
    threads = args.threads or available_cores()
    v = versions(args)
    cache_root = Path(args.embedding_cache).expanduser() if args.embedding_cache else default_scale_cache()
    overrides = train_overrides(args)
    cfg = train_config(args.experiment, overrides)  # a bad experiment or override fails here, in one line
    if args.fresh_cache:
        for n in counts:
            shutil.rmtree(cache_root / f"n{n}", ignore_errors=True)
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {k: {} for k in v}
    with tempfile.TemporaryDirectory(prefix="att3d-bench-scale-") as tmp:
        prior_path, prior_kind = choose_prior(cfg, args.prior or "tiny", tmp)
        bar = tqdm(total=len(counts) * len(v), desc="bench scale", disable=args.quiet)
        for n in counts:
            prompts, _ = scale_prompts(n)
            prompt_file = Path(tmp) / f"prompts-{n}.txt"
            prompt_file.write_text("\n".join(prompts) + "\n")
            argv = ["--prompts", str(prompt_file), "--experiment", args.experiment or "",
                    "--embedding-cache", str(cache_root / f"n{n}"), "--prior-path", prior_path or "",
                    "--steps", str(args.steps), "--set", *overrides]
            for version in v:
                bar.set_postfix_str(f"{n} prompts, {version}")
                done: list[dict[str, Any]] = []
                for _ in range(2):  # a cold start (the cache embedded prompts) is followed by a warm one
                    res = run_worker("scale", v[version]["path"], argv, threads, device, version)
                    res["startup_seconds"] = res["step1_done"] - res["spawned"]
                    if res["prompts"] != n:
                        raise BenchError(f"{n} prompts were written, the trainer has {res['prompts']}")
                    done.append(res)
                    if not res["cold"]:
                        break
                runs[version][n] = done
                bar.update()
        bar.close()
    rows = summarize_scale(runs["current"])
    base_rows = summarize_scale(runs["baseline"]) if "baseline" in runs else None
    settings = {"experiment": args.experiment, "overrides": overrides, "steps": args.steps, "threads": threads,
                "prior": prior_kind, "prompts": scale_prompts(1)[1], "embedding_cache": str(cache_root),
                "fresh_cache": bool(args.fresh_cache),
                "batch_size": cfg["trainer"].get("batch_size"), "resolution": cfg["trainer"].get("resolution"),
                "versions": v}
    notes = [f"Training on N distinct prompts ({settings['prompts']}; {args.experiment or 'train.yaml'} config, batch "
             f"{settings['batch_size']} at {settings['resolution']}^2, prior: {prior_kind}, {_n(threads, 'thread')}), "
             "each N "
             "in a fresh process. Start-up: from the process start to the end of training step 1 (imports, model, "
             "prompt embeddings, step 1); cold when the embedding cache had to embed the prompts "
             f"(cache {cache_root}/n<N>), then warm. s / step: median of {args.steps} steps after step 1. RSS: "
             "VmRSS after them; growth per 1k prompts over the smallest N."]
    if base_rows is not None:
        notes.append(version_line(v) + "; step speed-up = baseline / current.")
    out = {"settings": settings, "rows": rows, "runs": runs,
           "markdown": "\n\n".join(notes) + "\n\n" + scale_markdown(rows, base_rows)}
    if base_rows is not None:
        out["baseline_rows"] = base_rows
    return out


#: The benchmarks of ``att3d bench TARGET``.
BENCHMARKS: dict[str, Callable[[argparse.Namespace, torch.device], dict[str, Any]]] = {
    "generate": bench_generate,
    "train": bench_train,
    "scale": bench_scale,
}


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

def report(info: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    """The Markdown report: machine line, then one section per benchmark."""
    parts = ["# att3d bench", "", f"Machine: {machine_line(info)}", ""]
    for name, res in results.items():
        parts += [f"## {name}", "", res["markdown"]]
    return "\n".join(parts)

