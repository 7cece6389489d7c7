"""Speed benchmarks (``att3d bench``): generation latency and training throughput on this machine.

    att3d bench generate [--checkpoint PATH] [--batch-sizes 1 16] [--repeats 3] [--device auto] [--out results.md]
    att3d bench train [--experiment quickstart] [--steps 5] [--backends torch cuda] [--prior auto|tiny|PATH]
    att3d bench all ...

Each benchmark is a function ``(args, device) -> dict`` in :data:`BENCHMARKS` returning its
settings, result rows and a Markdown table; :func:`report` adds a description of the machine
(CPU model, GPU name, threads, load average: a busy machine makes every number slower), and the
command (:mod:`att3d.cli.bench`) writes ``results.md`` and ``results.json``.

- **generate**: text -> GLB on disk, the whole path of ``att3d generate`` without turntables
  (text encoder, mapping, field on the grid, extraction, texture, mesh file), per prompt, for
  each batch size; per-stage seconds from :class:`att3d.utils.timing.StageTimer`. The median
  over ``--repeats`` runs after ``--warmup`` untimed ones.
- **train**: amortized SDS training steps of the trainer itself (:class:`att3d.train.trainer.Trainer`)
  built from the Hydra configs, with the shapes prior (or a tiny random one when it is not
  available: the numbers then time everything but a realistic UNet); steps/s and rendered rays/s
  for each renderer backend, and peak memory (CUDA: ``max_memory_allocated``; CPU: the process's
  peak resident set, which includes everything loaded so far).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
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


# ---------------------------------------------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------------------------------------------

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

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 0
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
# generate
# ---------------------------------------------------------------------------------------------------------------

def bench_prompts(n: int) -> list[str]:
    """``n`` distinct prompts (shapes-world captions, then numbered variants)."""
    from att3d.world.shapes import all_captions

    caps = all_captions()
    return [caps[i] if i < len(caps) else f"{caps[i % len(caps)]} number {i // len(caps)}" for i in range(n)]


def bench_generate(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Text -> mesh file latency per prompt and per stage, for each batch size."""
    from tqdm import tqdm

    from att3d.model import load

    folder = resolve_model_folder(args.checkpoint)
    model = load(folder, device=device)
    kw = {"grid_resolution": args.resolution, "texture_size": args.texture_size, "threshold": args.threshold,
          "smooth_iterations": args.smooth, "uv_method": args.uv}
    stages = [*STAGES]
    sizes = sorted(set(args.batch_sizes))
    prompts = bench_prompts(max(sizes))
    rows = []
    with tempfile.TemporaryDirectory(prefix="att3d-bench-") as tmp:
        for _ in range(args.warmup):
            meshes = generate(model, prompts[:1], batch_size=1, progress=False, **kw)
            write_outputs(meshes, prompts[:1], tmp, format=args.format, turntable=False, progress=False)
        runs = [(b, r) for b in sizes for r in range(args.repeats)]
        results: dict[int, list[dict[str, Any]]] = {b: [] for b in sizes}
        for b, r in tqdm(runs, desc="bench generate", disable=args.quiet):
            out = Path(tmp) / f"b{b}-r{r}"
            timer = StageTimer(sync=device.type == "cuda")
            _sync(device)
            t0 = time.perf_counter()
            meshes = generate(model, prompts[:b], batch_size=b, timer=timer, progress=False, **kw)
            write_outputs(meshes, prompts[:b], out, format=args.format, turntable=False, timer=timer,
                          progress=False)
            _sync(device)
            total = time.perf_counter() - t0
            results[b].append({"seconds": total, "stages": timer.as_dict(stages),
                               "faces": sum(len(m.faces) for m in meshes) / b,
                               "empty": sum(is_empty(m) for m in meshes)})
    for b in sizes:
        res = results[b]
        per_prompt = statistics.median(x["seconds"] for x in res) / b
        stage_med = {k: statistics.median(x["stages"][k] for x in res) / b for k in stages}
        rows.append({"batch_size": b, "repeats": len(res), "seconds_per_prompt": per_prompt,
                     "prompts_per_second": 1.0 / per_prompt if per_prompt > 0 else float("inf"),
                     "min_seconds_per_prompt": min(x["seconds"] for x in res) / b,
                     "stage_seconds_per_prompt": stage_med,
                     "faces_per_mesh": statistics.mean(x["faces"] for x in res),
                     "empty_meshes": max(x["empty"] for x in res)})
    header = ["batch", "s / prompt", "prompts / s", *stages, "faces", "empty"]
    table = [[str(r["batch_size"]), f"{r['seconds_per_prompt']:.3f}", f"{r['prompts_per_second']:.2f}",
              *(f"{r['stage_seconds_per_prompt'][k]:.3f}" for k in stages), f"{r['faces_per_mesh']:.0f}",
              str(r["empty_meshes"])] for r in rows]
    settings = {"checkpoint": str(folder), "grid_resolution": args.resolution, "texture_size": args.texture_size,
                "threshold": args.threshold, "smooth_iterations": args.smooth, "uv": args.uv, "format": args.format,
                "repeats": args.repeats, "warmup": args.warmup}
    notes = [f"Text -> {args.format.upper()} on disk per prompt (median of {args.repeats} runs, seconds); stages "
             f"per prompt. Grid {args.resolution}^3, texture {args.texture_size}^2, uv {args.uv}, "
             f"model {folder}."]
    if any(r["empty_meshes"] for r in rows):
        notes.append("Some prompts gave no surface (empty meshes skip texturing and export): times are not "
                     "representative; lower --threshold or use a trained model.")
    return {"settings": settings, "rows": rows, "markdown": "\n".join(notes) + "\n\n" + markdown(header, table)}


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


def bench_train(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Training steps per second and rendered rays per second per renderer backend."""
    from tqdm import tqdm

    from att3d.config import build_trainer
    from att3d.render import nerfacc_backend

    overrides = [*args.set, f"trainer.device={device}", "progress=false"]
    if args.train_batch_size:
        overrides.append(f"trainer.batch_size={args.train_batch_size}")
    if args.train_resolution:
        overrides.append(f"trainer.resolution={args.train_resolution}")
    cfg = train_config(args.experiment, overrides)
    # Both paths by default: without CUDA the nerfacc row says it was skipped rather than vanishing.
    backends = list(dict.fromkeys(args.backends or ["torch", "cuda"]))
    for b in backends:
        if b not in ("torch", "cuda"):
            raise BenchError(f"unknown renderer backend {b!r}; choose torch or cuda")
    with tempfile.TemporaryDirectory(prefix="att3d-bench-train-") as tmp:
        prior_path = resolve_path(cfg["guidance"]["prior"].get("path") or "")
        prior_kind = str(prior_path)
        if cfg["guidance"]["prior"].get("name") == "shapes" and (
                args.prior == "tiny" or (args.prior == "auto" and not (prior_path / "prior_config.json").is_file())):
            cfg["guidance"]["prior"]["path"] = str(tiny_prior(Path(tmp) / "prior"))
            prior_kind = "tiny random shapes prior (16/32 channels)"
        elif args.prior not in ("auto", "tiny"):
            cfg["guidance"]["prior"]["path"] = str(args.prior)
            prior_kind = str(args.prior)
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
    return {"settings": settings, "rows": rows, "markdown": note + "\n\n" + markdown(header, table)}


#: The benchmarks of ``att3d bench TARGET``.
BENCHMARKS: dict[str, Callable[[argparse.Namespace, torch.device], dict[str, Any]]] = {
    "generate": bench_generate,
    "train": bench_train,
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

