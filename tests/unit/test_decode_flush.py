"""Flush planning of decode-time eviction (pure): layouts, H2O's greedy rule, StreamingLLM's window."""

from __future__ import annotations

import pytest
import torch

from vllm_kvmm.policies import DecodeSpec, plan_flush


def test_score_flush_layout_and_choice() -> None:
    h, g = 2, 4
    # Stored: prefix slots at positions 0..9 (per head), then the tail 12..19 (positions 10, 11 evicted).
    positions = torch.cat([torch.arange(10), torch.arange(12, 20)]).expand(h, -1).clone()
    scores = torch.rand(h, 18, generator=torch.Generator().manual_seed(0))
    spec = DecodeSpec("score", interval=4, recent=6)
    plan = plan_flush(spec, positions, scores, length=20, capacity=13, granularity=g)
    # tail_start = 4·⌊(20 − 6)/4⌋ = 12 → the 8 tail tokens stay; prefix keeps 4·⌊(13 − 8)/4⌋ = 4.
    assert (plan.tail_start, plan.prefix_keep, plan.num_kept) == (12, 4, 12)
    for hh in range(h):
        best = torch.argsort(scores[hh, :10], descending=True)[:4].sort().values
        assert plan.keep[hh, :4].tolist() == best.tolist()
        assert plan.keep[hh, 4:].tolist() == list(range(10, 18))


def test_tail_moves_forward_into_the_prefix() -> None:
    positions = torch.arange(30).expand(1, -1).clone()
    spec = DecodeSpec("score", interval=8, recent=4)
    plan = plan_flush(spec, positions, torch.arange(30.0)[None], length=30, capacity=12, granularity=8)
    assert plan.tail_start == 24  # 8·⌊26/8⌋: tokens 24..29 stay in place
    assert plan.prefix_keep == 0  # 8·⌊(12 − 6)/8⌋
    assert plan.keep.tolist() == [list(range(24, 30))]


def test_window_keeps_sinks_and_the_latest() -> None:
    positions = torch.arange(40).expand(2, -1).clone()
    spec = DecodeSpec("window", interval=4, recent=0, sinks=4)
    plan = plan_flush(spec, positions, torch.zeros(2, 40), length=40, capacity=20, granularity=4)
    assert plan.tail_start == 40 and plan.prefix_keep == 20
    assert plan.keep[0].tolist() == [0, 1, 2, 3, *range(24, 40)]
    assert torch.equal(plan.keep[0], plan.keep[1])


def test_flush_every_token_is_h2o_greedy_eviction() -> None:
    """Interval 1, granularity 1: each flush drops the lowest-scoring token outside the recent window."""
    g = torch.Generator().manual_seed(3)
    cap, recent, start = 10, 3, 14
    spec = DecodeSpec("score", interval=1, recent=recent)
    pos = torch.arange(start)  # stored positions (one head)
    score = torch.rand(start, generator=g, dtype=torch.float64)
    kept_naive = list(range(start))
    naive_score = dict(zip(kept_naive, score.tolist(), strict=True))
    # Bring both to capacity first with the same rule.
    plan = plan_flush(spec, pos[None], score[None], start, cap)
    pos, score = pos[plan.keep[0]], score[plan.keep[0]]
    while len(kept_naive) > cap:
        outside = [p for p in kept_naive if p < start - recent]
        kept_naive.remove(min(outside, key=lambda p: (naive_score[p], -p)))
    for step in range(30):
        new_pos = start + step
        pos = torch.cat([pos, torch.tensor([new_pos])])
        score = torch.cat([score, torch.zeros(1, dtype=torch.float64)])
        att = torch.rand(len(pos), generator=g, dtype=torch.float64)
        score += att
        kept_naive.append(new_pos)
        naive_score[new_pos] = 0.0
        for p, a in zip(pos.tolist(), att.tolist(), strict=True):
            naive_score[p] += a
        plan = plan_flush(spec, pos[None], score[None], new_pos + 1, cap)
        pos, score = pos[plan.keep[0]], score[plan.keep[0]]
        outside = [p for p in kept_naive if p < new_pos + 1 - recent]
        kept_naive.remove(min(outside, key=lambda p: (naive_score[p], -p)))
        assert pos.tolist() == kept_naive, step


def test_a_missing_tail_token_is_an_error() -> None:
    positions = torch.tensor([[0, 1, 2, 5, 6]])
    with pytest.raises(ValueError, match="stored tail holds"):
        plan_flush(DecodeSpec("score", 4, recent=4), positions, torch.zeros(1, 5), length=7, capacity=4)
