"""StageTimer: host durations at once; device durations one step later, the same step on every rank."""

from __future__ import annotations

import time

import pytest

from vllm_kvmm.vllm_ext.worker.timing import StageTimer


class FakeEvent:
    """A CUDA event stand-in on a shared fake device clock: ``record`` stamps the clock, ``synchronize``
    advances the device to the stamp (and counts)."""

    def __init__(self, device: dict[str, float]) -> None:
        self.device = device
        self.at: float | None = None

    def record(self) -> None:
        self.device["host"] += 1.0  # each launch moves the host's clock on by 1 ms
        self.at = self.device["host"]

    def synchronize(self) -> None:
        assert self.at is not None
        self.device["done"] = max(self.device["done"], self.at)
        self.device["syncs"] += 1

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.at is not None and end.at is not None
        return end.at - self.at  # milliseconds, as torch reports them


@pytest.fixture
def device() -> dict[str, float]:
    return {"host": 0.0, "done": 0.0, "syncs": 0}


def test_device_durations_are_read_one_step_later(device: dict[str, float]) -> None:
    timer = StageTimer(event=lambda: FakeEvent(device))
    with timer(True):
        device["host"] += 5.0  # the work: 5 ms of launches
    device["done"] = 1e9  # the device finished long ago: still nothing this step (every rank alike)
    assert timer.finished() == [] and device["syncs"] == 0
    with timer(True):
        device["host"] += 2.0
    # The next step: the first pair (5 ms of work + the end event's 1 ms launch), not yet the second.
    assert timer.finished() == [pytest.approx(0.006)] and device["syncs"] == 1
    assert timer.finished() == [pytest.approx(0.003)]
    assert timer.finished() == [] and timer.total == pytest.approx(0.009)


def test_drain_waits_for_every_pair_and_its_durations_still_reach_the_next_step(
    device: dict[str, float],
) -> None:
    timer = StageTimer(event=lambda: FakeEvent(device))
    with timer(True):
        device["host"] += 5.0
    assert timer.finished() == []
    with timer(True):
        device["host"] += 2.0
    assert timer.drain() == pytest.approx(0.009) and device["syncs"] == 2 and device["done"] == 11.0
    assert timer.finished() == [pytest.approx(0.006), pytest.approx(0.003)]
    assert timer.finished() == [] and timer.drain() == pytest.approx(0.009)


def test_host_durations_are_known_at_once(device: dict[str, float]) -> None:
    timer = StageTimer(event=lambda: FakeEvent(device))
    with timer(False):
        time.sleep(0.01)
    (dt,) = timer.finished()
    assert 0.01 <= dt < 1.0 and timer.total == dt and device["host"] == 0.0  # no event made


def test_a_failing_stage_leaves_no_open_pair(device: dict[str, float]) -> None:
    timer = StageTimer(event=lambda: FakeEvent(device))
    with pytest.raises(ValueError), timer(True):
        raise ValueError("tensor-parallel failures are raised")
    assert timer.drain() == 0.0 and device["syncs"] == 0
