"""Selection runs on the scores' device: on CUDA it must keep exactly what the CPU keeps (ties included)."""

from __future__ import annotations

import pytest
import torch

from vllm_kvmm.ops import LayerStats, select_topk
from vllm_kvmm.policies import PromptInfo, make_policy, plan_compression

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_select_topk_on_cuda_equals_cpu_with_ties():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 50, (32, 8000), generator=gen).float()  # many exact ties
    protected = torch.rand(8000, generator=gen) < 0.01
    for k in (0, 1, 1600, 7999):
        cpu = select_topk(scores, k, protected)
        gpu = select_topk(scores.cuda(), k, protected.cuda())
        assert torch.equal(gpu.cpu(), cpu), k


def test_plan_from_cuda_statistics_equals_plan_from_cpu():
    n, layers, h = 3000, 4, 8
    info = PromptInfo.text_only(n, layers, h)
    gen = torch.Generator().manual_seed(1)
    stats = [LayerStats(window=torch.rand(h, n, generator=gen).round(decimals=2)) for _ in range(layers)]
    on_gpu = [LayerStats(window=s.window.cuda()) for s in stats]
    policy = make_policy("snapkv", 0.2)
    cpu = plan_compression(policy, stats, info, granularity=16)
    gpu = plan_compression(policy, on_gpu, info, granularity=16)
    for a, b in zip(cpu, gpu, strict=True):
        assert b.keep.device.type == "cpu"
        assert torch.equal(a.keep, b.keep) and a.tail_start == b.tail_start
