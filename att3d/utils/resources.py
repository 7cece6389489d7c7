"""Memory estimates of a request, checked before any work starts.

``att3d generate --resolution 1024`` needs a 1024^3 grid of points and densities (tens of GB), ``--texture-size
8192`` a bake of 67 million texels; without a check such a request runs for minutes and then fails (or swaps the
machine to a halt). The commands estimate what a request needs from its options with the functions below and
refuse one that does not fit with one line quoting the estimate (:func:`check_memory`, a :class:`ResourceError`)::

    att3d: error: this request needs about 34.4 GB of memory (--resolution 1024: 34.4 GB), more than the
    12.1 GB available on this machine; lower those options, or set --max-memory to change the budget

The estimates are the peak memory of the work on top of the loaded model, measured on the CPU (peak resident set
size of ``att3d generate`` / ``interpolate`` / ``refine`` with the shipped model) and rounded up; on a GPU the same
tensors live in device memory. They are estimates, not bounds: they aim to be somewhat above the measured peaks.

Per request (bytes):

- density grid (:func:`grid_bytes`): ``R^3 * (12 + 20 B)`` for R samples per axis and B prompts per batch (the
  points, the densities of the batch, the occupancy and marching-cubes bookkeeping);
- texture (:func:`texture_bytes`): ``T^2 * (300 + 3 B)`` for a T x T texture (rasterized atlas, bake points and
  colours, dilation, PNG encoding) plus the finished textures of the batch;
- turntable (:func:`turntable_bytes`): ``r^2 * (3 F + 200)`` for F frames of r x r pixels;
- interpolation frames (:func:`frames_bytes`): ``H W (18 F + 80 B)`` for F frames of H x W rendered B at a time;
- training renders (:func:`render_training_bytes`): ``640`` bytes per ray sample with gradients (views x H x W x
  samples per ray), the SDS steps of ``att3d refine``.

The memory available (:func:`available_memory`) is ``MemAvailable`` of ``/proc/meminfo`` capped by the cgroup's
limit (containers), or psutil's figure where there is no ``/proc``; on a CUDA device it is the device's free
memory. A budget given by the user (``--max-memory 4GB``, :func:`parse_size`) replaces it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from att3d.utils.errors import Att3dError

#: Bytes per grid point shared by a batch (float32 xyz) and per grid point and prompt (densities, occupancy).
GRID_BYTES_PER_POINT = 12
GRID_BYTES_PER_PROMPT_POINT = 20
#: Bytes per texel of one texture bake, and per texel of each finished texture of a batch (RGB).
TEXTURE_BYTES_PER_TEXEL = 300
TEXTURE_BYTES_PER_FINISHED_TEXEL = 3
#: Bytes per pixel of one turntable frame's rasterization, and per pixel of each kept frame (RGB uint8).
TURNTABLE_BYTES_PER_PIXEL = 200
TURNTABLE_BYTES_PER_FRAME_PIXEL = 3
#: Bytes per pixel of each kept interpolation frame (float RGB + uint8 copies for the video), and per pixel of a
#: frame being rendered (rays, render outputs).
FRAME_BYTES_PER_PIXEL = 18
RENDER_BYTES_PER_PIXEL = 80
#: Bytes per ray sample of a training render with gradients (field activations kept for the backward pass).
TRAIN_BYTES_PER_RAY_SAMPLE = 640

_UNITS = {"": None, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
#: Words of :func:`parse_size` that turn the check off.
NO_LIMIT = ("none", "off", "unlimited")


class ResourceError(Att3dError):
    """A request needs more memory than is available (or than the budget allows), or a size is malformed."""


# ---------------------------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------------------------

def parse_size(text: str) -> float:
    """Bytes of a size such as ``4GB``, ``512MB``, ``1.5GiB`` or ``8G``; ``math.inf`` for ``none`` / ``off`` /
    ``unlimited`` (no limit).

    ``KB``, ``MB``, ``GB``, ``TB`` are powers of 1000; ``KiB`` ... ``TiB`` and the single letters ``K``, ``M``,
    ``G``, ``T`` are powers of 1024; ``B`` is bytes. A unit is required (``4`` alone is refused: 4 bytes or 4 GB?).

    Raises:
        ResourceError: not a size, no unit, or not positive.
    """
    raw = str(text).strip()
    if raw.lower() in NO_LIMIT:
        return math.inf
    match = _SIZE.match(raw)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ResourceError(f"not a memory size: {raw[:40]!r} (e.g. 4GB, 512MB, 16GiB, or 'none')")
    if _UNITS[unit] is None:
        raise ResourceError(f"memory size {raw!r} needs a unit (e.g. {raw}GB or {raw}MB)")
    value = float(match.group(1)) * _UNITS[unit]
    if not value >= 1:
        raise ResourceError(f"memory size must be positive, got {raw!r}")
    return float(int(value))


def format_bytes(n: float) -> str:
    """``12.9 GB``, ``640 MB``, ``12.0 KB``: powers of 1000, one decimal below 100 of the unit."""
    n = float(n)
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.1f} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------------------------------------
# Estimates
# ---------------------------------------------------------------------------------------------------------------

def grid_bytes(resolution: int, batch: int = 1) -> int:
    """Peak bytes of a density grid of ``resolution``^3 points for ``batch`` prompts and its marching cubes."""
    points = int(resolution) ** 3
    return points * (GRID_BYTES_PER_POINT + GRID_BYTES_PER_PROMPT_POINT * max(int(batch), 1))


def texture_bytes(texture_size: int, batch: int = 1) -> int:
    """Peak bytes of baking one ``texture_size``^2 texture, plus the finished textures of a batch; 0 for no texture."""
    texels = int(texture_size) ** 2
    if texels == 0:
        return 0
    return texels * (TEXTURE_BYTES_PER_TEXEL + TEXTURE_BYTES_PER_FINISHED_TEXEL * max(int(batch), 1))


def turntable_bytes(frames: int, resolution: int) -> int:
    """Peak bytes of a turntable video of ``frames`` frames of ``resolution``^2 pixels (0 frames: none)."""
    if frames <= 0:
        return 0
    pixels = int(resolution) ** 2
    return pixels * (TURNTABLE_BYTES_PER_FRAME_PIXEL * int(frames) + TURNTABLE_BYTES_PER_PIXEL)


def frames_bytes(frames: int, resolution: int, batch: int = 1) -> int:
    """Peak bytes of rendering ``frames`` frames of ``resolution``^2 pixels, ``batch`` at a time, kept for a video."""
    pixels = int(resolution) ** 2
    return pixels * (FRAME_BYTES_PER_PIXEL * int(frames) + RENDER_BYTES_PER_PIXEL * max(int(batch), 1))


def render_training_bytes(resolution: int, views: int, samples_per_ray: int) -> int:
    """Peak bytes of one training render with gradients: ``views`` images of ``resolution``^2 rays."""
    return int(resolution) ** 2 * max(int(views), 1) * max(int(samples_per_ray), 1) * TRAIN_BYTES_PER_RAY_SAMPLE


@dataclass(frozen=True)
class Estimate:
    """The memory a request needs, by the option that causes it.

    Attributes:
        parts: ``(label, bytes)`` pairs, e.g. ``("--resolution 1024", 34_400_000_000)``; labels name the options
            so that a refusal says what to lower.
    """

    parts: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        """Bytes of all parts together."""
        return int(sum(b for _, b in self.parts))

    def describe(self, share: float = 0.1) -> str:
        """``--resolution 1024: 34.4 GB, --texture-size 8192: 20.3 GB``: the parts above ``share`` of the total
        (the largest part at least), largest first."""
        ordered = sorted(self.parts, key=lambda p: -p[1])
        shown = [p for p in ordered if p[1] >= share * self.total] or ordered[:1]
        return ", ".join(f"{label}: {format_bytes(b)}" for label, b in shown)


def mesh_estimate(grid_resolution: int, texture_size: int, batch: int = 1, turntable_frames: int = 0,
                  turntable_resolution: int = 0, grid_option: str = "--resolution",
                  texture_option: str = "--texture-size", turntable_option: str = "--turntable-resolution"
                  ) -> Estimate:
    """What generating meshes needs (:func:`grid_bytes` + :func:`texture_bytes` + :func:`turntable_bytes`), each
    part labelled with its option and value (``--resolution 1024``)."""
    parts = [(f"{grid_option} {grid_resolution}" + (f" x {batch} prompts per batch" if batch > 1 else ""),
              grid_bytes(grid_resolution, batch))]
    if texture_size > 0:
        parts.append((f"{texture_option} {texture_size}", texture_bytes(texture_size, batch)))
    if turntable_frames > 0:
        parts.append((f"{turntable_option} {turntable_resolution} x {turntable_frames} frames",
                      turntable_bytes(turntable_frames, turntable_resolution)))
    return Estimate(tuple(parts))


# ---------------------------------------------------------------------------------------------------------------
# Available memory and the check
# ---------------------------------------------------------------------------------------------------------------

def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _read_int(path: Path) -> int | None:
    try:
        raw = path.read_text().strip()
    except OSError:
        return None
    return int(raw) if raw.isdigit() else None  # "max": no limit


def _cgroup_available(root: str = "/sys/fs/cgroup") -> int | None:
    """Room left under the cgroup's memory limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``), if any."""
    base = Path(root)
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit, usage = _read_int(base / limit_file), _read_int(base / usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 writes a huge number for "none"
            return max(limit - usage, 0)
    return None


def host_available_memory() -> int | None:
    """Bytes of host memory available now (see the module docstring); None when it cannot be told."""
    found = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    if not found:
        try:
            import psutil  # optional

            found = [int(psutil.virtual_memory().available)]
        except Exception:
            return None
    return min(found)


def available_memory(device: Any = None) -> int | None:
    """Bytes available to a request on ``device``: the free memory of a CUDA device, else the host's
    (:func:`host_available_memory`); None when it cannot be told."""
    kind = getattr(device, "type", None) or str(device or "cpu").split(":")[0]
    if kind == "cuda":
        try:
            import torch

            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:
            return None
    return host_available_memory()


def check_memory(estimate: Estimate, budget: float | None = None, device: Any = None,
                 available: int | None = None) -> None:
    """Refuse a request whose estimate does not fit.

    Args:
        estimate: what the request needs.
        budget: the user's budget in bytes (``--max-memory``, :func:`parse_size`; ``math.inf``: no check); None:
            the memory available on ``device`` (:func:`available_memory`).
        device: where the work runs (a CUDA device: its free memory).
        available: the available memory to check against instead of measuring it (tests).

    Raises:
        ResourceError: one line with the estimate, its main parts and the limit, e.g. ``this request needs about
            34.4 GB of memory (--resolution 1024: 34.4 GB), more than the 12.1 GB available on this machine; ...``
    """
    if budget is not None:
        if math.isinf(budget):
            return
        limit, where = int(budget), f"--max-memory budget of {format_bytes(budget)}"
    else:
        measured = available if available is not None else available_memory(device)
        if measured is None:
            return  # cannot tell: do not guess
        kind = getattr(device, "type", None) or str(device or "cpu").split(":")[0]
        limit = measured
        where = f"{format_bytes(limit)} " + ("free on the GPU" if kind == "cuda" else "available on this machine")
    need = estimate.total
    if need <= limit:
        return
    hint = "lower those options" + ("" if budget is not None else ", or set --max-memory to change the budget")
    raise ResourceError(f"this request needs about {format_bytes(need)} of memory ({estimate.describe()}), more "
                        f"than the {where}; {hint}")


__all__ = ["Estimate", "NO_LIMIT", "ResourceError", "available_memory", "check_memory", "format_bytes",
           "frames_bytes", "grid_bytes", "host_available_memory", "mesh_estimate", "parse_size",
           "render_training_bytes", "texture_bytes", "turntable_bytes"]
