"""The shared prefix of prefix caching with compression, engine-free: planning, merging, flushes,
statistics from a cache hit, and who fixes the prefix (vllm_ext/prefix.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_kvmm.ops import LayerStats, StatsAccumulator, StatsRequest
from vllm_kvmm.policies import (
    DecodeSpec,
    LayerPlan,
    MergeSpec,
    PromptInfo,
    apply_plan,
    make_policy,
    plan_compression,
    plan_flush,
)
from vllm_kvmm.vllm_ext.prefix import SharedPrefixes


def _stats(layers: int, h: int, n: int, seed: int = 0) -> list[LayerStats | None]:
    g = torch.Generator().manual_seed(seed)
    # The frozen prefix scores lowest: only the frozen rule can keep it.
    out = []
    for _ in range(layers):
        col = torch.rand(h, n, generator=g) + 1.0
        col[:, :32] = 0.0
        out.append(LayerStats(colsum=col, window=col.clone()))
    return out


@pytest.mark.parametrize("name", ["h2o", "snapkv"])
def test_frozen_prefix_is_kept_first_and_the_budget_applies_to_the_rest(name: str) -> None:
    n, h, layers, bs = 300, 2, 3, 16
    info = PromptInfo.text_only(n, layers, h)
    policy = make_policy(name, 0.25)
    free = plan_compression(policy, _stats(layers, h, n), info, granularity=bs)
    plans = plan_compression(policy, _stats(layers, h, n), info, granularity=bs, frozen=32)
    kept = sum(p.num_kept for p in plans)
    # 32 + 0.25 · (300 − 32) = 99 tokens a layer, within half a block over the layers (carried rounding).
    assert abs(kept - 3 * 99) <= bs / 2
    for a, b in zip(free, plans, strict=True):
        assert not bool((a.keep[:, :32] < 32).any())  # unfrozen: the low scores lose
        assert torch.equal(b.keep[:, :32], torch.arange(32).expand(h, 32)) and b.frozen == 32


def test_a_shared_prefix_far_above_the_budget_leaves_the_recent_window() -> None:
    """1,120 shared tokens of 1,184 (ρ 0.2 would be 237 in all): the question at the end stays (found by
    `bench multiturn`: the window shrank to nothing and answers lost the question)."""
    n, h = 1184, 2
    info = PromptInfo.text_only(n, 2, h)
    policy = make_policy("snapkv", 0.2)
    for plan in plan_compression(policy, _stats(2, h, n), info, granularity=16, frozen=1120):
        assert plan.tail_start <= n - policy.window
        assert plan.prefix_keep == 1120  # the rest keeps ρ of its 64 tokens at most: no whole block


def test_merging_leaves_the_frozen_prefix_unchanged() -> None:
    h, n, d = 2, 40, 8
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(h, n, d, generator=g), torch.randn(h, n, d, generator=g)
    # Kept: 0..7 (frozen 0..7 when asked) and 32..39; every evicted token merges into a kept one.
    keep = torch.cat([torch.arange(8), torch.arange(32, 40)]).expand(h, -1).clone()
    merge = MergeSpec("average")
    merged_all = apply_plan(LayerPlan(keep, 32, 8, n), keys, values, merge)
    frozen = apply_plan(LayerPlan(keep, 32, 8, n, frozen=8), keys, values, merge)
    assert not torch.equal(merged_all[0][:, :8], keys[:, :8])  # merging does change these slots
    assert torch.equal(frozen[0][:, :8], keys[:, :8]) and torch.equal(frozen[1][:, :8], values[:, :8])
    assert torch.equal(frozen[0][:, 8:], merged_all[0][:, 8:])


@pytest.mark.parametrize("kind", ["score", "window", "bin"])
def test_flush_keeps_the_frozen_prefix_whatever_its_score_and_the_capacity(kind: str) -> None:
    h, length = 2, 100
    positions = torch.arange(length).expand(h, -1).clone()
    scores = torch.linspace(1, 2, length).expand(h, -1).clone()
    scores[:, :32] = 0.0
    spec = DecodeSpec(kind, interval=8, recent=16, bin_size=64)  # type: ignore[arg-type]
    plan = plan_flush(spec, positions, scores, length, capacity=40, granularity=16, frozen=32)
    assert torch.equal(plan.keep[:, :32], torch.arange(32).expand(h, 32))
    free = plan_flush(spec, positions, scores, length, capacity=40, granularity=16)
    assert not bool((free.keep[:, :16] < 16).all())
    # A capacity below the frozen prefix grows to hold it (whole blocks), as sinks do.
    small = plan_flush(spec, positions, scores, length, capacity=20, granularity=16, frozen=32)
    assert small.prefix_keep == 32 and torch.equal(small.keep[:, :32], torch.arange(32).expand(h, 32))


def test_statistics_from_a_cache_hit_cover_the_queries_that_ran() -> None:
    n, hq, hk, d, start = 96, 4, 2, 16, 48
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(n, hq, d, generator=g), torch.randn(n, hk, d, generator=g)
    vision = torch.zeros(n, dtype=torch.bool)
    req = StatsRequest(colsum=True, entropy=True)
    hit = StatsAccumulator(req, n, hq, hk, vision, 0.25, chunk=16, kernels="torch", start=start)
    hit.update(q[start:], k, start)
    assert hit.done
    # The same sums from the explicit attention of rows [start, N) (causal; the mean over each GQA group).
    logits = torch.einsum("qhd,khd->hqk", q[start:], k.repeat_interleave(hq // hk, 1)) * 0.25
    rows = torch.arange(start, n)[:, None]
    att = logits.masked_fill(torch.arange(n)[None, :] > rows, float("-inf")).softmax(-1)
    want = att.sum(1).view(hk, hq // hk, n).mean(1)
    got = hit.result().colsum
    assert got is not None and torch.allclose(got.float(), want, atol=1e-5)
    with pytest.raises(ValueError, match="query chunks must arrive in order: expected start 48, got 0"):
        StatsAccumulator(req, n, hq, hk, vision, 0.25, kernels="torch", start=start).update(q, k, 0)
    with pytest.raises(ValueError, match="start 97 is outside a prompt of 96 tokens"):
        StatsAccumulator(req, n, hq, hk, vision, 0.25, start=97)


def test_shared_prefix_is_fixed_once_per_epoch_by_whoever_asks_first() -> None:
    prefixes = SharedPrefixes()
    req = SimpleNamespace(request_id="r", num_preemptions=0)
    assert prefixes.protected(req, 64) is None  # not compressing: vLLM caches every block
    prefixes.admit("r", 32)
    assert prefixes.protected(req, 64) == 64  # the hit is longer than the mark
    assert prefixes.protected(req, 0) == 64 and prefixes.cached("r") == 64  # fixed for this epoch
    req.num_preemptions = 1  # resumed after preemption: found nothing in the cache this time
    assert prefixes.protected(req, 0) == 32 and prefixes.cached("r") == 0 and prefixes.shared("r") == 32
    prefixes.forget("r")
    assert prefixes.protected(req, 0) is None and prefixes.shared("r") == 0
