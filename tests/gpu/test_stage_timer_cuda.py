"""StageTimer on a real device: CUDA events time the kernels without a synchronisation on the step's path."""

from __future__ import annotations

import pytest
import torch

from vllm_kvmm.vllm_ext.worker.timing import StageTimer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_events_time_the_kernels_and_are_read_once_passed() -> None:
    timer = StageTimer()
    a = torch.randn(4096, 4096, device="cuda")
    with timer(True):
        for _ in range(20):
            a = a @ a / 64.0
    early = timer.finished()  # non-blocking: empty while the device is still busy, else the duration
    total = timer.drain()
    assert total > 0 and len(early + timer.finished()) == 1
    assert timer.finished() == [] and timer.drain() == total
