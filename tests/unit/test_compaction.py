"""One layer's compaction on a toy paged cache: what is read, which slots are written, and what they hold.

Plans are built by hand (per-head kept prefixes, worked out below), the cache is FlashAttention's layout
on CPU tensors, and a spy around the accessor records every read and write.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.unit.paged_spy import SpyPagedKV
from vllm_kvmm.policies import LayerPlan, MergeSpec, apply_plan
from vllm_kvmm.vllm_ext.paged_kv import FlashPagedKV
from vllm_kvmm.vllm_ext.worker.compaction import _kept_move, _merged_kv
from vllm_kvmm.vllm_ext.worker.moves import move_kv

BS, H, D, N = 4, 2, 32, 14  # 4 blocks of 4: [0,4) [4,8) [8,12) [12,14)
IDS = torch.tensor([7, 2, 5, 9])  # the row's physical blocks, out of order as a block table is


def _engine() -> tuple[SimpleNamespace, torch.Tensor, torch.Tensor]:
    cache = torch.zeros(10, BS, H, 2 * D).permute(0, 2, 1, 3)  # logical [blocks, H, bs, 2d], NHD memory
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(N, H, D, generator=g), torch.randn(N, H, D, generator=g)
    io = FlashPagedKV(BS, D)
    pos = torch.arange(N)
    io.write(cache, IDS[pos // BS] * BS + pos % BS, k, v)
    return SimpleNamespace(block_size=BS, kv_caches={"l0": cache}, paged=SpyPagedKV(BS, D)), k, v


def _plan(frozen: int = 0) -> LayerPlan:
    # Tail [12, 14) in place; the prefix keeps 4 tokens per head (one block), different ones per head.
    prefix = (
        torch.tensor([[0, 3, 6, 11], [0, 1, 9, 10]])
        if not frozen
        else torch.tensor([[0, 1, 6, 11], [0, 1, 5, 8]])
    )
    keep = torch.cat([prefix, torch.arange(12, 14).expand(H, 2)], 1)
    return LayerPlan(keep=keep, tail_start=12, prefix_keep=4, num_tokens=N, frozen=frozen)


@pytest.mark.parametrize("frozen", [0, 2])
def test_without_merging_only_the_kept_prefix_is_read_and_written(frozen: int) -> None:
    engine, k, v = _engine()
    plan = _plan(frozen)
    move = _kept_move(engine, "l0", plan, IDS)  # type: ignore[arg-type]
    assert move is not None
    before = engine.kv_caches["l0"].clone()
    move_kv(engine, [move])  # type: ignore[arg-type]
    assert engine.paged.calls == ["gather", "write"]  # no read of the whole row
    # Destination: logical positions [frozen, 4) of block 7; the frozen prefix and the tail are not written.
    assert move.dst.tolist() == [7 * BS + p for p in range(frozen, 4)]
    # Read back straight from the layout (logical [blocks, H, bs, 2d]: keys, then values), not the accessor.
    stored = engine.kv_caches["l0"][7, :, frozen:4]  # [H, 4 - frozen, 2d]
    for head in range(H):
        src = plan.keep[head, frozen:4]
        assert torch.equal(stored[head, :, :D], k[src, head])
        assert torch.equal(stored[head, :, D:], v[src, head])
    changed = (engine.kv_caches["l0"] != before).any(-1).any(1)  # [blocks, bs]: a slot of any head
    assert {tuple(x) for x in changed.nonzero().tolist()} <= {(7, p) for p in range(frozen, 4)}


def test_with_merging_the_whole_row_is_read_and_the_merged_tail_written() -> None:
    engine, k, v = _engine()
    plan, merge = _plan(), MergeSpec(kind="average")
    move = _merged_kv(engine, "l0", plan, IDS, N, merge)  # type: ignore[arg-type]
    assert move is not None
    slots, k2, v2 = move
    assert engine.paged.calls == ["read"]
    # The prefix fills block 7, the tail stays at logical 12, 13 (block 9): both written, merged values.
    assert slots.tolist() == [7 * BS + p for p in range(4)] + [9 * BS, 9 * BS + 1]
    ek, ev = apply_plan(plan, k.transpose(0, 1), v.transpose(0, 1), merge)
    assert torch.equal(k2, ek.transpose(0, 1)) and torch.equal(v2, ev.transpose(0, 1))


def test_nothing_moves_when_nothing_is_evicted_or_all_the_prefix_is_frozen() -> None:
    engine, _, _ = _engine()
    whole = LayerPlan(keep=torch.arange(N).expand(H, N), tail_start=12, prefix_keep=12, num_tokens=N)
    assert _kept_move(engine, "l0", whole, IDS) is None  # type: ignore[arg-type]
    assert _merged_kv(engine, "l0", whole, IDS, N, MergeSpec(kind="average")) is None  # type: ignore[arg-type]
    keep = torch.cat([torch.arange(4), torch.arange(12, 14)]).expand(H, 6)
    frozen = LayerPlan(keep=keep, tail_start=12, prefix_keep=4, num_tokens=N, frozen=4)
    assert _kept_move(engine, "l0", frozen, IDS) is None  # type: ignore[arg-type]
    assert engine.paged.calls == []
