"""StageTimer on a real device: CUDA events time the kernels, read a step later."""

from __future__ import annotations

import pytest
import torch

from vllm_kvmm.vllm_ext.worker.timing import StageTimer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_events_time_the_kernels_and_are_read_a_step_later() -> None:
    timer = StageTimer()
    a = torch.randn(4096, 4096, device="cuda")
    with timer(True):
        for _ in range(20):
            a = a @ a / 64.0
    assert timer.finished() == []  # this step's pair waits for the next step
    (dt,) = timer.finished()
    assert dt > 0 and timer.total == dt and timer.drain() == dt
