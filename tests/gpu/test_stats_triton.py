"""The Triton statistics kernels compiled for the GPU against the torch path, at serving sizes.

On CPU the kernels are checked in Triton's interpreter against a dense twin
(``tests/unit/test_stats_triton.py``); here the compiled kernels meet the torch path on a LLaVA-shaped
prompt (image span in the middle, a question after it) in bf16 and float32, MHA and GQA, one call and
vLLM-like prefill chunks.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from vllm_kvmm.ops import StatsAccumulator, StatsRequest

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ALL = StatsRequest(colsum=True, window=32, entropy=True, cross_entropy=True, t2v=True)


def run(kernels: str, q, k, vision, cuts, request: StatsRequest = ALL):
    n, h, _ = q.shape
    acc = StatsAccumulator(request, n, h, k.shape[1], vision, q.shape[-1] ** -0.5, kernels=kernels)  # type: ignore[arg-type]
    for s, e in itertools.pairwise(cuts):
        acc.update(q[s:e], k[:e], s)
    assert acc.done
    return acc.result()


@pytest.mark.parametrize(("step", "colsum_step"), [(1, 1), (11, 1), (11, 4)])
@pytest.mark.parametrize(
    ("dtype", "h", "h_kv", "n", "cuts"),
    [
        (torch.bfloat16, 32, 32, 2048, (0, 2048)),
        (torch.bfloat16, 28, 4, 1500, (0, 512, 1024, 1500)),
        (torch.float32, 8, 2, 700, (0, 100, 700)),
    ],
)
def test_triton_matches_torch_on_cuda(dtype, h, h_kv, n, cuts, step, colsum_step):
    gen = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(n, h, 128, device="cuda", generator=gen).to(dtype) * 1.5
    k = torch.randn(n, h_kv, 128, device="cuda", generator=gen).to(dtype) * 1.5
    vision = torch.zeros(n, dtype=torch.bool)
    vision[n // 8 : n // 8 + n // 2] = True
    # 11: meda's default row sample; colsum_step: sampled accumulated attention (`score_step`)
    request = dataclasses.replace(ALL, entropy_step=step, colsum_step=colsum_step)
    ref, got = run("torch", q, k, vision, cuts, request), run("triton", q, k, vision, cuts, request)
    for field in ("colsum", "window", "t2v_sum", "t2v_max"):
        torch.testing.assert_close(getattr(got, field), getattr(ref, field), rtol=1e-3, atol=1e-5, msg=field)
    for field in ("entropy", "entropy_tv", "entropy_vt"):
        a, b = float(getattr(got, field)), float(getattr(ref, field))
        assert not math.isnan(a) and a == pytest.approx(b, rel=1e-4), field
