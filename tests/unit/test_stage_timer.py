"""StageTimer: host durations at once; device durations read only once the device has passed them."""

from __future__ import annotations

import time

import pytest

from vllm_kvmm.vllm_ext.worker.timing import StageTimer


class FakeEvent:
    """A CUDA event stand-in on a shared fake device clock: ``record`` stamps the clock, ``query`` says
    whether the device has reached the stamp, ``synchronize`` advances the device to it."""

    def __init__(self, device: dict[str, float]) -> None:
        self.device = device
        self.at: float | None = None

    def record(self) -> None:
        self.device["host"] += 1.0  # each launch moves the host's clock on by 1 ms
        self.at = self.device["host"]

    def query(self) -> bool:
        assert self.at is not None
        return self.device["done"] >= self.at

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


def test_device_durations_wait_for_the_device_without_blocking(device: dict[str, float]) -> None:
    timer = StageTimer(event=lambda: FakeEvent(device))
    with timer(True):
        device["host"] += 5.0  # the work: 5 ms of launches
    with timer(True):
        device["host"] += 2.0
    assert timer.finished() == [] and device["syncs"] == 0  # the device has not got there: nothing, no wait
    device["done"] = 7.0  # past the first pair's end (stamped at 7), not the second's (11)
    assert timer.finished() == [pytest.approx(0.006)]  # 5 ms of work + the end event's 1 ms launch
    assert timer.finished() == []
    assert timer.drain() == pytest.approx(0.006 + 0.003) and device["syncs"] == 1
    assert timer.finished() == [pytest.approx(0.003)]  # drained durations still reach the next step


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
