"""Flush planning of decode-time eviction (pure): layouts, H2O's greedy rule, StreamingLLM's window."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vllm_kvmm.policies import DecodeSpec, decode, plan_flush
from vllm_kvmm.policies.decode import FlushInput, plan_flushes


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


def test_bin_flush_every_token_is_the_recycle_bin() -> None:
    """``"bin"`` flushes at interval 1 and granularity 1 reproduce ``RecycleBin`` step by step."""
    from vllm_kvmm.policies import RecycleBin

    g = torch.Generator().manual_seed(5)
    h, start, cap, recent, bin_size = 2, 12, 8, 2, 3
    spec = DecodeSpec("bin", interval=1, recent=recent, capacity=cap, bin_size=bin_size)
    machine = RecycleBin(h, cap, bin_size, recent)
    prompt = torch.rand(h, start, generator=g, dtype=torch.float64)
    machine.start(prompt)
    slot_pos = torch.arange(start).expand(h, -1).clone()  # the machine's slot -> position
    # Flush state: stored slots [prefix (active) | bin | tail] with positions and scores per head.
    # Like RecycleBin.start: the prompt's slots beyond capacity start in the bin (no purge yet).
    plan = plan_flush(spec, slot_pos.clone(), prompt.clone(), start, cap)
    rest = torch.stack([torch.tensor(sorted(set(range(start)) - set(r.tolist()))) for r in plan.keep])
    pos, score = torch.gather(slot_pos, 1, plan.keep), torch.gather(prompt, 1, plan.keep)
    bin_pos, bin_score = torch.gather(slot_pos, 1, rest), torch.gather(prompt, 1, rest)
    n_prefix = plan.prefix_keep
    for step in range(40):
        length = start + step + 1
        new_pos = torch.full((h, 1), length - 1)
        # One attention row over every stored slot (binned ones as if active), shared by both sides.
        all_pos = torch.cat([slot_pos, new_pos], 1)
        row = torch.rand(h, all_pos.shape[1], generator=g, dtype=torch.float64)
        ev = machine.step(row)
        slot_pos = all_pos if ev.keep is None else torch.gather(all_pos, 1, ev.keep)
        by_pos = {(hh, int(p)): float(row[hh, i]) for hh in range(h) for i, p in enumerate(all_pos[hh])}

        stored_pos = torch.cat([pos[:, :n_prefix], bin_pos, pos[:, n_prefix:], new_pos], 1)
        stored_score = torch.cat(
            [score[:, :n_prefix], bin_score, score[:, n_prefix:], torch.zeros(h, 1, dtype=torch.float64)], 1
        )
        stored_score += torch.tensor(
            [[by_pos[(hh, int(p))] for p in stored_pos[hh]] for hh in range(h)], dtype=torch.float64
        )
        plan = plan_flush(spec, stored_pos, stored_score, length, cap)
        pos, score = torch.gather(stored_pos, 1, plan.keep), torch.gather(stored_score, 1, plan.keep)
        bin_pos, bin_score = (
            torch.gather(stored_pos, 1, plan.binned),
            torch.gather(stored_score, 1, plan.binned),
        )
        n_prefix = plan.prefix_keep
        for hh in range(h):
            active = sorted(int(p) for p in slot_pos[hh][machine.active[hh]])
            binned = sorted(int(p) for p in slot_pos[hh][~machine.active[hh]])
            assert sorted(pos[hh].tolist()) == active, step
            assert sorted(bin_pos[hh].tolist()) == binned, step


def test_a_flush_never_starts_its_tail_before_the_current_tail() -> None:
    # Prefill kept one prefix block [0, 16) and started its tail at 48 (its layout may start the tail later
    # than length - recent). A decode flush with recent 32 at length 70 would start its tail at 32, where
    # only part of [32, 48) is stored; the tail floor keeps it at 48.
    from vllm_kvmm.policies import flush_tail_start

    pos = torch.cat([torch.arange(16), torch.arange(48, 70)]).expand(2, -1)
    spec = DecodeSpec("score", interval=4, recent=32)
    scores = torch.rand(2, pos.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(ValueError, match="stored tail holds 22 tokens, expected 38: a tail was evicted"):
        plan_flush(spec, pos, scores, 70, capacity=38, granularity=16)
    plan = plan_flush(spec, pos, scores, 70, capacity=38, granularity=16, tail_floor=48)
    assert (plan.tail_start, plan.prefix_keep) == (48, 16)
    assert torch.equal(plan.keep[0], torch.arange(38))
    assert flush_tail_start(70, 32, 16, 48) == 48 and flush_tail_start(120, 32, 16, 48) == 80


def _layer(g: torch.Generator, n_prefix: int, frozen: int, length: int, tail: int, h: int = 2):
    """A layer's stored slots: ``n_prefix`` distinct per-head positions older than ``tail`` (the first
    ``frozen`` shared), then the tail ``[tail, length)``; random float64 scores with a few exact ties."""
    rows = []
    for _ in range(h):
        rest = torch.randperm(tail - frozen, generator=g)[: n_prefix - frozen] + frozen
        rows.append(torch.cat([torch.arange(frozen), rest.sort().values, torch.arange(tail, length)]))
    pos = torch.stack(rows)
    score = torch.randint(0, 6, pos.shape, generator=g).double() / 4  # ties across slots and layers
    return pos, score


@pytest.mark.parametrize(
    "spec",
    [
        DecodeSpec("score", interval=4, recent=4),
        DecodeSpec("window", interval=4, recent=4, sinks=3),
        DecodeSpec("bin", interval=4, recent=4, bin_size=12),
        DecodeSpec("bin", interval=4, recent=4, bin_size=2),  # the bin overflows: purged
    ],
    ids=["score", "window", "bin", "bin-purge"],
)
def test_many_layers_planned_at_once_equal_each_planned_alone(spec: DecodeSpec) -> None:
    """plan_flushes stacks layers whose numbers agree and plans the rest apart: every layer's plan must be
    plan_flush's for that layer alone, whatever the mix (capacities, tail floors, prefix sizes, frozen)."""
    g = torch.Generator().manual_seed(7)
    length, frozen = 40, 4
    # (slots older than the tail, capacity, tail floor): three layers share one stack, the others differ.
    shapes = [(20, 24, 32), (20, 24, 32), (16, 24, 32), (20, 24, 32), (20, 16, 32), (24, 30, 28)]
    layers = []
    for n_prefix, cap, floor in shapes:
        pos, score = _layer(g, n_prefix, frozen, length, floor)
        layers.append(FlushInput(spec, pos, score, length, cap, floor, frozen))
    plans = plan_flushes(layers, granularity=4)
    _assert_each_alone(layers, plans)
    # The frozen shared prefix is kept in every layer, and the layers keep different positions.
    assert all(bool((p.keep[:, :frozen] == torch.arange(frozen)).all()) for p in plans)
    pairs = zip(layers, plans, strict=True)
    kept = {tuple(torch.gather(x.positions, 1, p.keep).flatten().tolist()) for x, p in pairs}
    assert len(kept) == len(layers)


def test_many_requests_planned_at_once_equal_each_planned_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers of several requests in one call (a step's flushes): a stack never mixes requests whose
    lengths, frozen prefixes or decode specs differ, and requests that agree on all are stacked."""
    g = torch.Generator().manual_seed(11)
    h2o, h2o_decay = DecodeSpec("score", 4, recent=4), DecodeSpec("score", 4, recent=4, decay=0.9)
    window = DecodeSpec("window", 4, recent=4, sinks=2)
    # (spec, length, frozen, slots older than the tail, tail floor): the first two requests agree on
    # every number; the others differ in one each.
    requests = [
        (h2o, 40, 0, 20, 32),
        (h2o, 40, 0, 20, 32),
        (h2o, 44, 0, 20, 32),  # longer: a different tail (the same stored count would tear it)
        (h2o, 40, 4, 20, 32),  # a shared prefix
        (h2o_decay, 40, 0, 20, 32),
        (window, 40, 0, 20, 32),
    ]
    inputs = []
    for spec, length, frozen, n_prefix, floor in requests:
        for _ in range(3):  # layers
            pos, score = _layer(g, n_prefix, frozen, length, floor)
            inputs.append(FlushInput(spec, pos, score, length, 24, floor, frozen))
    calls: list[int] = []
    original = decode.plan_flush

    def counting(spec: DecodeSpec, pos: torch.Tensor, *a: Any, **kw: Any) -> Any:
        calls.append(pos.shape[0] // 2)  # layers in the stack (2 heads each)
        return original(spec, pos, *a, **kw)

    monkeypatch.setattr(decode, "plan_flush", counting)
    plans = plan_flushes(inputs, granularity=4)
    monkeypatch.undo()
    _assert_each_alone(inputs, plans)
    assert sorted(calls) == [3, 3, 3, 3, 6]  # the two agreeing requests' six layers in one stack


def _assert_each_alone(inputs: list[FlushInput], plans: list) -> None:
    assert len(plans) == len(inputs)
    for x, got in zip(inputs, plans, strict=True):
        want = plan_flush(x.spec, x.positions, x.scores, x.length, x.capacity, 4, x.tail_floor, x.frozen)
        assert (got.tail_start, got.prefix_keep) == (want.tail_start, want.prefix_keep)
        assert torch.equal(got.keep, want.keep)
        assert (got.binned is None) == (want.binned is None)
        if want.binned is not None:
            assert torch.equal(got.binned, want.binned)


def test_many_layers_at_once_refuse_what_one_layer_refuses() -> None:
    spec = DecodeSpec("score", interval=4, recent=4)
    good = FlushInput(
        spec, torch.arange(20).expand(2, -1), torch.zeros(2, 20, dtype=torch.float64), 20, 12, 16
    )
    torn_pos = torch.cat([torch.arange(18), torch.tensor([19])]).expand(2, -1)  # position 18 is missing
    torn = FlushInput(spec, torn_pos, torch.zeros(2, 19, dtype=torch.float64), 20, 12, 16)
    plan_flushes([good], 4)
    with pytest.raises(ValueError, match="stored tail holds 3 tokens, expected 4: a tail was evicted"):
        plan_flushes([good, torn], 4)
