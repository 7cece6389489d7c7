"""Wall-clock seconds per named stage (:class:`StageTimer`), as ``att3d generate`` and ``att3d bench`` report them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

#: The stages of one-forward-pass generation, in report order (and :meth:`StageTimer.as_dict`'s default):
#: text encoder, mapping network, field on the grid, iso-surface extraction, UV atlas + texture, mesh file.
STAGES = ("encode", "mapping", "field", "extraction", "texture", "export")


class StageTimer:
    """Wall-clock seconds per named stage, accumulated over calls.

    ``with timer("field"): ...`` adds the block's duration to ``timer.seconds["field"]``. On CUDA
    (``sync=True``) the device is synchronised at both ends of a block so that asynchronous
    kernels are charged to the stage that launched them.

    Args:
        sync: synchronise CUDA around every stage (only if CUDA is initialised).
    """

    def __init__(self, sync: bool = False):
        self.sync = bool(sync)
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()  # stages may be timed from several threads (meshes of a batch)

    def _sync(self) -> None:
        if not self.sync:
            return
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float) -> None:
        """Charge ``seconds`` to ``stage``."""
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + float(seconds)
            self.calls[stage] = self.calls.get(stage, 0) + 1

    def total(self, stages: Sequence[str] | None = None) -> float:
        """Sum over ``stages`` (default: all recorded)."""
        keys = self.seconds if stages is None else stages
        return float(sum(self.seconds.get(k, 0.0) for k in keys))

    def as_dict(self, stages: Sequence[str] = STAGES) -> dict[str, float]:
        """Seconds of ``stages`` in order (0 for stages not run), then any other recorded stage."""
        out = {k: self.seconds.get(k, 0.0) for k in stages}
        out.update({k: v for k, v in self.seconds.items() if k not in out})
        return out

    def merge(self, other: StageTimer) -> StageTimer:
        """Add another timer's seconds into this one; returns self."""
        for k, v in other.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v
            self.calls[k] = self.calls.get(k, 0) + other.calls.get(k, 0)
        return self

    def summary(self, stages: Sequence[str] | None = STAGES, per: int = 1) -> str:
        """One line ``encode 0.01s, mapping 0.00s, ...`` of ``stages`` (None: all recorded), divided by ``per``."""
        keys = list(self.seconds) if stages is None else list(stages)
        return ", ".join(f"{k} {self.seconds.get(k, 0.0) / max(per, 1):.2f}s" for k in keys)


@contextmanager
def maybe_timed(timer: StageTimer | None, stage: str) -> Iterator[None]:
    """``timer(stage)`` when there is a timer, else nothing."""
    if timer is None:
        yield
    else:
        with timer(stage):
            yield
