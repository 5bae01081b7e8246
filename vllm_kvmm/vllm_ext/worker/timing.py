"""How long each compression and each step's flushes took, without stalling the step to find out.

On a CPU the work is done when the call returns: wall-clock time. On a GPU the call returns once its
kernels are launched; synchronising the device to time them would stop the host from preparing the next
step while the device catches up (the compression runs at the start of a step, before its forward is
launched). So the timer records a CUDA event pair around the work and reads it one step later, when the
device passed its end long ago (the step's forward and sampling came after it). One step, not "whenever
the device is done": under tensor parallelism every rank must report a stage in the same step's output,
which keeps one copy (``KVMMWorkerMeta.aggregate``). The work itself may still wait for the device where
it needs a value on the host (a plan's sizes); that is not the timer's doing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["StageTimer"]


class StageTimer:
    """Durations of timed stages, in seconds, as they become known (:meth:`finished`).

    ``event``: makes a timing event (``torch.cuda.Event(enable_timing=True)``; tests pass a stand-in).
    """

    def __init__(self, event: Callable[[], Any] | None = None) -> None:
        self._event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self._open: list[tuple[Any, Any]] = []  # device event pairs of this step, in order
        self._last: list[tuple[Any, Any]] = []  # ... and of the step before, read at the next call
        self._ready: list[float] = []  # host durations, and device ones read by ``drain``
        self.total = 0.0  # every duration read so far

    @contextmanager
    def __call__(self, device: bool) -> Iterator[None]:
        """Time the body: on the device (events) when ``device``, else by the host clock."""
        if device:
            start, end = self._event(), self._event()
            start.record()
            yield
            end.record()
            self._open.append((start, end))
            return
        t0 = time.perf_counter()
        yield
        self._add(time.perf_counter() - t0)

    def finished(self) -> list[float]:
        """Call once a step: its host durations, and the device durations of the step before (their end
        events waited for, which the device passed a step ago); this step's device pairs wait for the
        next call."""
        self._wait(self._last)
        self._last, self._open = self._open, []
        out, self._ready = self._ready, []
        return out

    def drain(self) -> float:
        """Wait for every open device pair (benchmarks, between runs); returns :attr:`total`. Their
        durations still reach the next :meth:`finished`."""
        self._wait([*self._last, *self._open])
        self._last, self._open = [], []
        return self.total

    def _wait(self, pairs: list[tuple[Any, Any]]) -> None:
        """Read device pairs in order, each once the device has passed its end event."""
        for start, end in pairs:
            end.synchronize()
            self._add(start.elapsed_time(end) / 1000.0)  # milliseconds

    def _add(self, seconds: float) -> None:
        self._ready.append(seconds)
        self.total += seconds
