"""Moving kept tokens inside the paged cache (worker/moves.py): one gather and one write per cache tensor,
every gather before any write, on toy FlashAttention-layout caches (CPU tensors, a spy on the accessor)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.unit.paged_spy import SpyPagedKV
from vllm_kvmm.vllm_ext.worker.moves import Move, chunked, move_kv

BS, H, D, BLOCKS = 4, 2, 32, 8


def _cache(seed: int) -> torch.Tensor:
    """A logical ``[blocks, H, bs, 2d]`` cache in NHD memory, every slot holding distinct values."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BLOCKS, BS, H, 2 * D, generator=g).permute(0, 2, 1, 3)


def _slot(cache: torch.Tensor, slot: int, head: int) -> torch.Tensor:
    """Key and value of one head at one flat slot, concatenated."""
    return cache[slot // BS, head, slot % BS].clone()


def test_layers_sharing_a_tensor_move_in_one_gather_and_one_write() -> None:
    shared, own = _cache(0), _cache(1)
    # Per-layer KV-cache groups: vLLM hands every layer a view of one tensor; their blocks never overlap
    # (a: blocks 0-1, b: blocks 2-3). Layer c has a tensor of its own.
    engine = SimpleNamespace(
        kv_caches={"a": shared, "b": shared.view(shared.shape), "c": own}, paged=SpyPagedKV(BS, D)
    )
    before_shared, before_own = shared.clone(), own.clone()
    moves = [
        # Layer a swaps slots 1 and 5 of head 0 while head 1 copies 6 to 1 and 2 to 5: a destination is
        # another move's source, so both reads must see the cache as it was.
        Move("a", torch.tensor([[5, 1], [6, 2]]), torch.tensor([1, 5])),
        Move("b", torch.tensor([[9, 12], [8, 8]]), torch.tensor([8, 9])),
        Move("c", torch.tensor([[3], [0]]), torch.tensor([30])),
        Move("c", torch.tensor([[], []], dtype=torch.long), torch.tensor([], dtype=torch.long)),  # nothing
    ]
    move_kv(engine, moves)  # type: ignore[arg-type]
    assert engine.paged.calls == ["gather", "gather", "write", "write"]
    for m in moves:
        cache, before = (own, before_own) if m.layer == "c" else (shared, before_shared)
        for j, dst in enumerate(m.dst.tolist()):
            for h in range(H):
                want = _slot(before, int(m.src[h, j]), h)
                assert torch.equal(_slot(cache, dst, h), want), (m.layer, dst, h)
    # Nothing else changed.
    written = {(0, s) for m in moves[:2] for s in m.dst.tolist()}
    for s in range(BLOCKS * BS):
        if (0, s) not in written:
            assert torch.equal(shared[s // BS, :, s % BS], before_shared[s // BS, :, s % BS]), s
        if s != 30:
            assert torch.equal(own[s // BS, :, s % BS], before_own[s // BS, :, s % BS]), s


def test_runs_of_groups_stay_within_the_budget() -> None:
    units = [("g0", 10), ("g1", 10), ("g2", 1), ("g3", 50), ("g4", 5), ("g5", 0)]
    assert chunked(units, 21) == [["g0", "g1", "g2"], ["g3"], ["g4", "g5"]]
    assert chunked(units, 1 << 30) == [["g0", "g1", "g2", "g3", "g4", "g5"]]
    assert chunked(units, 1) == [["g0"], ["g1"], ["g2"], ["g3"], ["g4"], ["g5"]]  # each over the budget
    assert chunked([], 8) == []
    assert chunked([("g0", 0), ("g1", 0)], 8) == [["g0", "g1"]]  # groups that move nothing


def test_two_layers_writing_one_slot_of_a_shared_tensor_are_refused_before_any_write() -> None:
    shared = _cache(2)
    engine = SimpleNamespace(kv_caches={"a": shared, "b": shared}, paged=SpyPagedKV(BS, D))
    before = shared.clone()
    moves = [
        Move("a", torch.tensor([[1], [2]]), torch.tensor([5])),
        Move("b", torch.tensor([[9], [10]]), torch.tensor([5])),  # a layout bug: groups' blocks overlap
    ]
    with pytest.raises(RuntimeError, match=r"kvmm: moves of layers \['a', 'b'\] write one slot twice"):
        move_kv(engine, moves)  # type: ignore[arg-type]
    assert engine.paged.calls == [] and torch.equal(shared, before)
