"""Data-parallel training with ``torch.distributed`` (``torchrun``): gloo on the CPU, NCCL on CUDA.

The scheme keeps a run *independent of the number of processes*:

* Every rank holds the same seeded :class:`torch.Generator` and draws all randomness of a
  step for the **global** batch (prompts, Dirichlet mixing weights, cameras, stratified
  jitter, SDS timesteps and noise), then keeps its own rows (:func:`shard`). The random
  streams therefore advance identically on every rank and equal those of one process that
  trains the whole batch.
* Each rank renders and scores ``batch_size / world_size`` prompts; its loss is the mean over
  its rows, so the mean of the ranks' losses is the global loss, and averaging the gradients
  (:func:`average_gradients`, one all-reduce of a flat buffer) gives the gradient of one
  process with the whole batch, up to float summation order.
* Gradient clipping and the optimiser step run on identical averaged gradients, so the
  weights stay identical on all ranks; rank 0 alone writes files. Checkpoints hold no rank
  state, so a run resumes on any number of processes.

A rank learns its place from the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); without it, everything here is a no-op
for a single process.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from att3d.utils.errors import Att3dError

log = logging.getLogger(__name__)

#: How long a collective may wait for the other ranks before the job fails (e.g. one rank died).
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


class DistributedError(Att3dError):
    """The distributed environment is unusable (bad ``RANK``/``WORLD_SIZE``, a batch that does not split)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job.

    Attributes:
        rank: global rank (0 writes checkpoints, logs and the final model).
        world_size: number of processes.
        local_rank: rank on this node (picks the CUDA device).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def env_info() -> DistInfo:
    """The job layout from ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (one process when they are unset)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedError(f"bad distributed environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}")
    return DistInfo(rank, world, local)


def current() -> DistInfo:
    """This process's place: from the initialised process group, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", dist.get_rank()))
    return DistInfo()


def default_backend() -> str:
    """``cpu:gloo,cuda:nccl`` when CUDA is there (collectives follow the tensors' device), else ``gloo``."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init_from_env(backend: str | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (``env://``).

    With ``WORLD_SIZE`` unset or 1 nothing happens. On CUDA the rank's device becomes
    ``cuda:LOCAL_RANK``. Returns this process's :class:`DistInfo`.
    """
    info = env_info()
    if not info.enabled:
        return info
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed")
    if dist.is_initialized():
        return current()
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise DistributedError(f"WORLD_SIZE={info.world_size} but {name} is unset: start the job with torchrun")
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend or default_backend(), init_method="env://", rank=info.rank,
                            world_size=info.world_size, timeout=timeout)
    log.info("joined the process group: rank %d of %d (local rank %d, backend %s)", info.rank, info.world_size,
             info.local_rank, dist.get_backend())
    return info


def shutdown() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device, info: DistInfo | None = None) -> torch.device:
    """``cuda`` without an index becomes this rank's ``cuda:LOCAL_RANK`` in a multi-process job."""
    info = info or current()
    if device.type == "cuda" and device.index is None and info.enabled:
        return torch.device("cuda", info.local_rank % max(1, torch.cuda.device_count()))
    return device


def shard(global_batch: int, info: DistInfo | None = None) -> slice:
    """The rows of a global batch that this rank trains; the batch must split evenly over the ranks."""
    info = info or current()
    if global_batch % info.world_size:
        raise DistributedError(f"trainer.batch_size={global_batch} does not split evenly over "
                               f"{info.world_size} processes; use a multiple of {info.world_size}")
    n = global_batch // info.world_size
    return slice(info.rank * n, (info.rank + 1) * n)


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if current().enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over the ranks (no-op for one process); returns ``t``."""
    if current().enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace every gradient by its mean over the ranks: one all-reduce of a flat buffer.

    A parameter without a gradient on this rank counts as a zero gradient, so all ranks
    reduce buffers of the same layout.
    """
    info = current()
    if not info.enabled:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).clone()
        offset += n


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy the parameters and buffers of rank ``src`` to every rank (no-op for one process)."""
    if not current().enabled:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=src)


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s picklable ``obj`` on every rank (used before training only, e.g. the run folder name)."""
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class BatchSlice:
    """A random source that draws for the global batch and keeps this rank's rows.

    The volume renderer's stratified jitter calls ``rand(shape, dtype)`` with ``shape[0]`` = the
    rank's batch; this draws ``(global_batch, *shape[1:])`` from the shared generator (so it
    advances as in a single process with the whole batch) and returns rows ``[start, stop)``.
    With one process and the whole batch it returns exactly what ``torch.rand(shape, generator)``
    would.

    Args:
        generator: the trainer's shared generator.
        global_batch: the step's batch over all ranks.
        rows: this rank's rows.
    """

    def __init__(self, generator: torch.Generator, global_batch: int, rows: slice):
        self.generator = generator
        self.global_batch = int(global_batch)
        self.rows = rows
        self.local_batch = rows.stop - rows.start

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def _global_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(int(s) for s in shape)
        if not shape or shape[0] != self.local_batch:
            raise ValueError(f"BatchSlice draws batch-first tensors of {self.local_batch} rows, got shape {shape}")
        return (self.global_batch, *shape[1:])

    def rand(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform [0, 1) noise of ``shape`` (batch first), on the generator's device."""
        full = torch.rand(self._global_shape(shape), generator=self.generator, device=self.device, dtype=dtype)
        return full[self.rows]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise of ``shape`` (batch first), on the generator's device."""
        full = torch.randn(self._global_shape(shape), generator=self.generator, device=self.device, dtype=dtype)
        return full[self.rows]
