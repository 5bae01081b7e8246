"""One layer's decode-time flush on a toy paged cache: what is read, which slots are written, what they hold.

The expected result is the dense reference's assembly (:class:`StoredSlots` from every stored token's
key and value, :meth:`~StoredSlots.with_bin`, :meth:`~StoredSlots.rescored`, :func:`plan_flush`,
:meth:`~StoredSlots.take`); the worker reads only keys to score and gathers only what moves, and must
write exactly what that assembly keeps. FlashAttention's layout on CPU tensors, a spy around the accessor.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.unit.paged_spy import SpyPagedKV
from vllm_kvmm.policies import DecodeSpec, StoredSlots, flush_tail_start, plan_flush
from vllm_kvmm.vllm_ext.messages import FlushJob, KVMMWorkerMeta
from vllm_kvmm.vllm_ext.paged_kv import FlashPagedKV
from vllm_kvmm.vllm_ext.worker.flush import flush
from vllm_kvmm.vllm_ext.worker.requests import LayerRef, RequestState

BS, H, D, LENGTH = 4, 2, 32, 20
SCALE = D**-0.5
# Logical blocks 0..5 of the request's row; 0 is the live prefix, 1 and 2 were freed at prefill (their
# physical ids are placeholders), 3 and 4 hold the tail (positions 12..19), 5 is the recycle bin's block.
ROW = [7, 0, 0, 9, 3, 6]
PREFIX = torch.tensor([[0, 3, 6, 11], [1, 2, 9, 10]])  # prefill kept 4 tokens per head, different ones
BIN = torch.tensor([[4, 5], [0, 7]])  # HAE's bin: 2 tokens per head waiting outside the view


def _setup(spec: DecodeSpec, with_bin: bool) -> tuple[SimpleNamespace, RequestState, StoredSlots, Any]:
    cache = torch.zeros(10, BS, H, 2 * D).permute(0, 2, 1, 3)  # logical [blocks, H, bs, 2d], NHD memory
    st, expected = _request(cache, spec, with_bin)
    return _state(cache), st, expected, cache


def _state(cache: torch.Tensor) -> SimpleNamespace:
    engine = SimpleNamespace(
        block_size=BS, layers={"l0": LayerRef(0, 0)}, kv_caches={"l0": cache}, paged=SpyPagedKV(BS, D),
        num_layers=1, stage=0, cuda=False, members=lambda: {0: [("l0", 0)]},
    )  # fmt: skip
    return SimpleNamespace(
        engine=engine, queries=SimpleNamespace(scales={"l0": SCALE}), out=KVMMWorkerMeta(), recorder=None
    )


def _request(
    cache: torch.Tensor, spec: DecodeSpec, with_bin: bool, seed: int = 0, shift: int = 0, row: list[int] = ROW
) -> tuple[RequestState, StoredSlots]:
    """One request's stored slots written into ``cache``, and the dense assembly of them. ``shift`` (whole
    blocks) moves every position on: one more freed block before the tail per block of shift."""
    assert shift % BS == 0
    m, length = shift // BS, LENGTH + shift
    g = torch.Generator().manual_seed(seed)
    io = FlashPagedKV(BS, D)
    # Stored slots in view order: the live block (per-head prefix positions), then the tail in place.
    tail_pos = torch.arange(12 + shift, length).expand(H, -1)
    pos = torch.cat([PREFIX + shift, tail_pos], 1)  # [H, 12]
    k, v = torch.randn(H, 12, D, generator=g), torch.randn(H, 12, D, generator=g)
    view_blocks = torch.tensor([row[0], row[3 + m], row[4 + m]])
    j = torch.arange(12)
    io.write(cache, view_blocks[j // BS] * BS + j % BS, k.transpose(0, 1), v.transpose(0, 1))
    # Scores so far: the prefix and the tail stored at the last flush (positions 12, 13); 14.. are new.
    score = torch.rand(H, 12, generator=g, dtype=torch.float64)
    score[:, 6:] = 0
    st = RequestState(policy=None, info=None, decode=spec)  # type: ignore[arg-type]
    st.compact[0] = ((0,), 3 + m)
    st.positions[0], st.scores[0], st.capacity[0] = pos[:, :6].clone(), score[:, :6].clone(), 8
    q = torch.randn(H, LENGTH - 14, D, generator=g)
    if spec.kind != "window":
        st.queries[0] = [(q[:, w], 14 + shift + w) for w in range(q.shape[1])]
    expected = StoredSlots(k, v, pos, score)
    if with_bin:
        bk, bv = torch.randn(H, 2, D, generator=g), torch.randn(H, 2, D, generator=g)
        b = row[5 + m] * BS
        io.write(cache, torch.tensor([b, b + 1]), bk.transpose(0, 1), bv.transpose(0, 1))
        bin_score = torch.rand(H, 2, generator=g, dtype=torch.float64)
        st.bin_blocks[0] = (5 + m,)
        st.bin_positions[0], st.bin_scores[0] = BIN.clone() + shift, bin_score
        binned = StoredSlots(bk, bv, BIN + shift, bin_score)
        expected = expected.with_bin(binned, flush_tail_start(length, spec.recent, BS, 12 + shift))
    if spec.kind != "window":
        expected = expected.rescored(spec, q, torch.arange(14 + shift, length), SCALE)
    return st, expected


def _stored_at(cache: torch.Tensor, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = FlashPagedKV(BS, D)._split(cache)  # [nb, bs, H, d]
    idx = torch.tensor(slots)
    return k[idx // BS, idx % BS], v[idx // BS, idx % BS]  # [n, H, d]


@pytest.mark.parametrize(
    "spec, with_bin",
    [
        (DecodeSpec("score", interval=6, recent=4, capacity=8), False),
        (DecodeSpec("score", interval=6, recent=4, capacity=8, decay=0.9), False),
        (DecodeSpec("window", interval=6, recent=4, capacity=8, sinks=1), False),
        (DecodeSpec("bin", interval=6, recent=4, capacity=8, bin_size=8), True),
    ],
    ids=["h2o", "h2o-decay", "streamingllm", "hae-bin"],
)
def test_flush_writes_what_the_dense_assembly_keeps_and_reads_only_keys_and_movers(
    spec: DecodeSpec, with_bin: bool
) -> None:
    state, st, expected, cache = _setup(spec, with_bin)
    plan = plan_flush(spec, expected.pos, expected.score, LENGTH, 8, BS, tail_floor=12)
    flush(state, [(FlushJob("r", LENGTH, [ROW]), st)])  # type: ignore[arg-type]

    calls = state.engine.paged.calls
    # Keys of the view and the bin, one gather, only where there are decode queries to score; no whole read.
    reads = ["gather_keys"] if spec.kind != "window" else []
    # The movers into live blocks and into the bin: one gather, then one write (one layer, one tensor).
    assert calls == [*reads, "gather", "write"]
    # The new tail starts at 16: the 4 kept of the 8 slots before it fill live block 0 (physical 7), the bin
    # (if any) reuses the next candidate block; the rest is reported freed.
    assert plan.tail_start == 16 and plan.prefix_keep == 4
    kept = expected.take(plan.keep[:, :4])
    k, v = _stored_at(cache, [7 * BS + i for i in range(4)])
    assert torch.equal(k, kept.k.transpose(0, 1)) and torch.equal(v, kept.v.transpose(0, 1))
    assert torch.equal(st.positions[0], torch.gather(expected.pos, 1, plan.keep))
    assert torch.equal(st.scores[0], torch.gather(expected.score, 1, plan.keep))
    live, tail = st.compact[0]
    assert (live, tail) == ((0,), 4)
    if with_bin:
        # 2 binned before and 4 falling out now wait in the bin: its old block, then old-tail block 3.
        assert plan.binned is not None and plan.binned.shape[1] == 4 + 2
        assert st.bin_blocks[0] == (5, 3)
        binned = expected.take(plan.binned)
        bk, bv = _stored_at(cache, [[ROW[5], ROW[3]][i // BS] * BS + i % BS for i in range(6)])
        assert torch.equal(bk, binned.k.transpose(0, 1)) and torch.equal(bv, binned.v.transpose(0, 1))
        assert torch.equal(st.bin_positions[0], binned.pos)
        assert "r" not in state.out.flushed  # no block freed
    else:
        (group,) = state.out.flushed["r"]
        assert (group.group, group.kept_tokens, group.freed) == (0, 8, (3,))


def test_the_tail_is_not_rewritten() -> None:
    spec = DecodeSpec("score", interval=6, recent=4, capacity=8)
    state, st, _, cache = _setup(spec, False)
    before = cache.clone()
    flush(state, [(FlushJob("r", LENGTH, [ROW]), st)])  # type: ignore[arg-type]
    # Logical block 4 (physical 3, positions 16..19) is the new tail: untouched; block 7 holds the prefix.
    assert torch.equal(cache[3], before[3])
    assert not torch.equal(cache[7], before[7])


# Request B is a block further along than A (positions + 4, one more freed block before its tail).
ROW_B = [11, 0, 0, 0, 14, 13, 12]


@pytest.mark.parametrize(
    "spec, with_bin",
    [
        (DecodeSpec("score", interval=6, recent=4, capacity=8), False),
        (DecodeSpec("window", interval=6, recent=4, capacity=8, sinks=1), False),
        (DecodeSpec("bin", interval=6, recent=4, capacity=8, bin_size=8), True),
    ],
    ids=["h2o", "streamingllm", "hae-bin"],
)
def test_requests_flushed_together_equal_each_flushed_alone(
    spec: DecodeSpec, with_bin: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step's flushes are scored in one stack (each request's rows with its own query positions) and
    planned in one call: every cache slot, every request's new state and report equal flushing each alone,
    and the later request's kept tokens are the dense assembly's."""
    import importlib

    flush_module = importlib.import_module("vllm_kvmm.vllm_ext.worker.flush")
    scored: list[int] = []
    decode_scores = flush_module.decode_scores

    def counting(q: torch.Tensor, *a: Any) -> torch.Tensor:
        scored.append(q.shape[0] // H)  # requests' layers in the stack
        return decode_scores(q, *a)

    monkeypatch.setattr(flush_module, "decode_scores", counting)
    runs = []
    for together in (True, False):
        cache = torch.zeros(16, BS, H, 2 * D).permute(0, 2, 1, 3)
        st_a, _ = _request(cache, spec, with_bin, seed=0)
        st_b, expected_b = _request(cache, spec, with_bin, seed=1, shift=BS, row=ROW_B)
        state = _state(cache)
        jobs = [(FlushJob("a", LENGTH, [ROW]), st_a), (FlushJob("b", LENGTH + BS, [ROW_B]), st_b)]
        if together:
            flush(state, jobs)  # type: ignore[arg-type]
        else:
            for job in jobs:
                flush(state, [job])  # type: ignore[arg-type]
        runs.append((cache, st_a, st_b, state.out))
    (cache, st_a, st_b, out), (cache_alone, st_a_alone, st_b_alone, out_alone) = runs
    assert scored == ([2, 1, 1] if spec.kind != "window" else [])
    assert torch.equal(cache, cache_alone)
    for x, y in ((st_a, st_a_alone), (st_b, st_b_alone)):
        assert x.compact == y.compact and x.bin_blocks == y.bin_blocks
        assert torch.equal(x.positions[0], y.positions[0]) and torch.equal(x.scores[0], y.scores[0])
        assert not x.queries
    assert out.flushed == out_alone.flushed and not out.compressed
    assert set(out.flushed) == (set() if with_bin else {"a", "b"})
    plan = plan_flush(spec, expected_b.pos, expected_b.score, LENGTH + BS, 8, BS, tail_floor=12 + BS)
    assert torch.equal(st_b.positions[0], torch.gather(expected_b.pos, 1, plan.keep))
    kept = expected_b.take(plan.keep[:, : plan.prefix_keep])
    k, v = _stored_at(cache, [ROW_B[0] * BS + i for i in range(plan.prefix_keep)])
    assert torch.equal(k, kept.k.transpose(0, 1)) and torch.equal(v, kept.v.transpose(0, 1))


def test_stored_keys_of_a_stack_come_in_row_order_whatever_tensors_the_layers_share() -> None:
    """A scoring stack reads its layers' keys with one gather per cache tensor: layers ``a`` and ``b`` view
    one tensor (vLLM's layout for a KV-cache group per layer), ``c`` has its own (``--kv-groups``); the rows
    come back in the stack's order, each layer's keys at its own slots."""
    from vllm_kvmm.vllm_ext.worker.flush import _stored_keys

    g = torch.Generator().manual_seed(5)
    shared = torch.randn(8, BS, H, 2 * D, generator=g).permute(0, 2, 1, 3)
    own = torch.randn(8, BS, H, 2 * D, generator=g).permute(0, 2, 1, 3)
    paged = SpyPagedKV(BS, D)
    state = SimpleNamespace(
        engine=SimpleNamespace(kv_caches={"a": shared, "b": shared, "c": own}, paged=paged)
    )
    slots = {
        "a": torch.tensor([5, 0, 9, 30]),
        "b": torch.tensor([17, 18, 2, 6]),
        "c": torch.tensor([1, 4, 12, 3]),
    }
    rows = [("a", slots["a"]), ("c", slots["c"]), ("b", slots["b"])]
    got = _stored_keys(state, rows)  # type: ignore[arg-type]
    caches = {"a": shared, "b": shared, "c": own}
    want = torch.cat([_stored_at(caches[name], src.tolist())[0].transpose(0, 1) for name, src in rows])
    assert got.shape == (3 * H, 4, D) and torch.equal(got, want)
    assert paged.calls == ["gather_keys", "gather_keys"]  # one per tensor, not one per layer
    only_shared = _stored_keys(state, [("b", slots["b"]), ("a", slots["a"])])  # type: ignore[arg-type]
    assert torch.equal(only_shared, torch.cat([want[2 * H :], want[:H]]))


def test_stored_slots_of_layers_built_together_equal_each_built_alone() -> None:
    """Layers of one layout are built as one stack (handed out as views); layers of other layouts (more live
    blocks, a recycle bin) apart: every layer's positions, scores and source slots equal its build alone."""
    from vllm_kvmm.vllm_ext.worker.flush import _stored

    g = torch.Generator().manual_seed(9)
    spec = DecodeSpec("bin", interval=6, recent=4, capacity=8, bin_size=8)
    st = RequestState(policy=None, info=None, decode=spec)  # type: ignore[arg-type]
    rows, members = [], {}
    # (live blocks, bin blocks): layers 0-2 share a layout, 3 has two live blocks, 4 a bin block.
    for layer, (live, bins) in enumerate([((0,), ()), ((0,), ()), ((0,), ()), ((0, 1), ()), ((0,), (5,))]):
        members[layer] = [(f"l{layer}", layer)]
        rows.append(torch.randperm(40, generator=g)[:6].tolist())  # this layer's group's physical blocks
        st.compact[layer] = (live, 3)
        n_prefix = len(live) * BS
        prefix = torch.stack([torch.randperm(12, generator=g)[:n_prefix].sort().values for _ in range(H)])
        st.positions[layer] = torch.cat([prefix, torch.arange(12, 14).expand(H, -1)], 1)
        st.scores[layer] = torch.rand(st.positions[layer].shape, generator=g, dtype=torch.float64)
        if bins:
            st.bin_blocks[layer] = bins
            st.bin_positions[layer] = BIN.clone()
            st.bin_scores[layer] = torch.rand(H, 2, generator=g, dtype=torch.float64)
    state = SimpleNamespace(engine=SimpleNamespace(block_size=BS))
    job = FlushJob("r", LENGTH, rows)
    together = _stored(state, job, st, members)  # type: ignore[arg-type]
    for layer in members:
        (alone,) = _stored(state, job, st, {layer: members[layer]}).values()  # type: ignore[arg-type]
        got = together[layer]
        assert torch.equal(got.pos, alone.pos) and torch.equal(got.score, alone.score)
        assert torch.equal(got.src, alone.src)
        # By hand: the view's slots (live blocks, then logical blocks 3, 4 of the tail), the bin after
        # the slots older than the new tail (16) for layer 4.
        view = [rows[layer][b] * BS + o for b in [*st.compact[layer][0], 3, 4] for o in range(BS)]
        if layer == 4:
            view = [*view[:8], rows[4][5] * BS, rows[4][5] * BS + 1, *view[8:]]
        assert got.src.tolist() == view
    assert together[0].pos.shape == (H, 12) and together[3].pos.shape == (H, 16)
