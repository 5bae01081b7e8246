"""How long each compression and each step's flushes took, without stalling the step to find out.

On a CPU the work is done when the call returns: wall-clock time. On a GPU the call returns once its
kernels are launched; synchronising the device to time them would stop the host from preparing the next
step while the device catches up (the compression runs at the start of a step, before its forward is
launched). So the timer records a CUDA event pair around the work and reads it once the device has
passed the end event (``Event.query``, which does not block): a duration reaches the scheduler a step or
two later, in the step output in which it is read.
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
        self._open: list[tuple[Any, Any]] = []  # device event pairs not read yet, in order
        self._ready: list[float] = []  # host durations, and device ones read by ``total``
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
        """The durations known since the last call: host ones, and device ones whose end the device has
        passed (in order; a later pair waits for an earlier one)."""
        while self._open and self._open[0][1].query():
            self._read(*self._open.pop(0))
        out, self._ready = self._ready, []
        return out

    def drain(self) -> float:
        """Wait for every open device pair (benchmarks, between runs); returns :attr:`total`."""
        while self._open:
            start, end = self._open.pop(0)
            end.synchronize()
            self._read(start, end)
        return self.total

    def _read(self, start: Any, end: Any) -> None:
        self._add(start.elapsed_time(end) / 1000.0)  # milliseconds

    def _add(self, seconds: float) -> None:
        self._ready.append(seconds)
        self.total += seconds
