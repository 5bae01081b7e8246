"""Decode-time eviction at a flush (docs/decode-eviction.md): re-select, compact, report freed blocks.

The planning is the dense reference's (:class:`~vllm_kvmm.policies.StoredSlots`,
:func:`~vllm_kvmm.policies.plan_flush`); this module reads the stored slots out of the paged cache and
writes the kept ones into the blocks they came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vllm_kvmm.policies import StoredSlots, flush_tail_start, plan_flush
from vllm_kvmm.vllm_ext.messages import CompressedGroup, FlushJob
from vllm_kvmm.vllm_ext.worker.requests import RequestState

if TYPE_CHECKING:
    from vllm_kvmm.vllm_ext.worker.state import WorkerState

__all__ = ["flush"]


@dataclass
class _LayerFlush:
    """One layer's flush, computed and not yet applied: what to write where, and the layer's new state."""

    writes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (slots, keys, values)
    layout: tuple[tuple[int, ...], int, tuple[int, ...], tuple[int, ...]]  # live, tail, bins, freed
    num_kept: int
    pos: torch.Tensor
    score: torch.Tensor
    bin_pos: torch.Tensor
    bin_score: torch.Tensor


def flush(state: WorkerState, job: FlushJob, st: RequestState) -> None:
    """Re-select every layer's stored tokens, compact them into live (and bin) blocks, report the rest.

    Group by group: every layer of a group is planned and its moved KV computed before the group's cache
    is written, so a failure (:meth:`WorkerState.contain`) leaves each group as it was or fully flushed.
    """
    engine = state.engine
    members: dict[int, list[tuple[str, int]]] = {}
    for name, ref in engine.layers.items():
        members.setdefault(ref.group, []).append((name, ref.index))
    report: list[CompressedGroup] = []
    try:
        for group, layers in sorted(members.items()):
            planned = [
                (name, layer, _plan_layer(state, job, st, group, name, layer)) for name, layer in layers
            ]
            layouts = {f.layout for _, _, f in planned}
            if len(layouts) != 1:
                raise RuntimeError(
                    f"kvmm: {job.req_id}: layers of group {group} flushed to different layouts"
                )
            for name, layer, f in planned:
                for slots, k, v in f.writes:
                    engine.paged.write(engine.kv_caches[name], slots, k, v)
                st.queries.pop(layer, None)  # consumed by this flush's scores
                st.positions[layer], st.scores[layer] = f.pos, f.score
                st.bin_positions[layer], st.bin_scores[layer] = f.bin_pos, f.bin_score
            live, tail, bins, freed = planned[0][2].layout
            st.compact[group] = (live, tail)
            st.bin_blocks[group] = bins
            if freed:
                report.append(CompressedGroup(group, len(live), tail, planned[0][2].num_kept, freed))
    finally:
        # Groups flushed before a failure are reported: their freed blocks are no longer read.
        if report:
            state.out.compressed[job.req_id] = report
            state.out.epochs[job.req_id] = job.epoch
            state.out.flushed.add(job.req_id)
            state.out.stages.add(engine.stage)
    if state.recorder is not None:
        state.recorder.flushed(job.req_id, st, engine.num_layers)


def _plan_layer(
    state: WorkerState, job: FlushJob, st: RequestState, group: int, name: str, layer: int
) -> _LayerFlush:
    """Stored slots, in the order :func:`plan_flush` expects: the view's slots older than the new tail
    (live blocks, then absorbed old-tail tokens), the recycle bin's slots (bin blocks, outside the
    view), then the new tail (in place). Reads the cache; changes nothing."""
    engine, spec = state.engine, st.decode
    assert spec is not None and engine.paged is not None
    bs, length = engine.block_size, job.length
    live, tail = st.compact[group]
    bins = st.bin_blocks.get(group, ())
    pos, score = st.positions[layer], st.scores[layer]
    h = pos.shape[0]
    # Decoded since the last flush: from the end of the stored tail. A tail can be empty (a prompt of whole
    # blocks whose layout kept no tail, or no token at all: found by the lifecycle fuzzer), and then the
    # last stored position lies in the prefix; the new tokens still start at the tail's start.
    since = max(int(pos[0, -1]) + 1 if pos.shape[1] else 0, tail * bs)
    tail_pos = torch.arange(since, length).expand(h, -1)
    pos = torch.cat([pos, tail_pos], 1)
    score = torch.cat([score, torch.zeros(tail_pos.shape, dtype=torch.float64)], 1)
    n_view = len(live) * bs + length - tail * bs
    if pos.shape[1] != n_view:
        raise RuntimeError(f"kvmm: {job.req_id} layer {layer}: {pos.shape[1]} positions, {n_view} slots")
    row = job.block_ids[group]
    cache = engine.kv_caches[name]
    ids = [row[i] for i in [*live, *range(tail, -(-length // bs))]]
    k, v = engine.paged.read(cache, torch.tensor(ids, dtype=torch.long), n_view)  # [S, H_kv, d]
    slots = StoredSlots(k.transpose(0, 1), v.transpose(0, 1), pos, score)
    bin_pos = st.bin_positions.get(layer)
    if bin_pos is not None and bin_pos.shape[1]:
        bin_ids = torch.tensor([row[i] for i in bins], dtype=torch.long)
        bk, bv = engine.paged.read(cache, bin_ids, bin_pos.shape[1])
        binned = StoredSlots(bk.transpose(0, 1), bv.transpose(0, 1), bin_pos, st.bin_scores[layer])
        slots = slots.with_bin(binned, flush_tail_start(length, spec.recent, bs, tail * bs))
    buffered = st.queries.get(layer, [])
    if buffered:
        q = torch.stack([x[0] for x in buffered], 1)  # [H, W, d]
        slots = slots.rescored(spec, q, torch.tensor([x[1] for x in buffered]), state.queries.scales[name])
    cap = spec.capacity if spec.capacity is not None else st.capacity[layer]
    plan = plan_flush(spec, slots.pos, slots.score, length, cap, bs, tail_floor=tail * bs, frozen=st.shared)
    new_tail = plan.tail_start // bs
    if new_tail < tail:
        raise RuntimeError(f"kvmm: {job.req_id}: the tail moved back ({tail} -> {new_tail})")
    binned_idx = plan.binned if plan.binned is not None else plan.keep[:, :0]
    # Physical blocks for the new prefix and bin, taken from those whose contents were just read.
    candidates = [*live, *bins, *range(tail, new_tail)]
    n_live, n_bin = plan.prefix_keep // bs, -(-binned_idx.shape[1] // bs)
    new_live, new_bins = candidates[:n_live], candidates[n_live : n_live + n_bin]
    writes = []
    # The shared prefix stays where it is (the first slots of the first live blocks, kept by plan_flush):
    # never written, as other requests may read its blocks.
    frozen = int((slots.pos[0] < st.shared).sum())
    for idx, blocks, skip in (
        (plan.keep[:, : plan.prefix_keep], new_live, frozen),
        (binned_idx, new_bins, 0),
    ):
        n = idx.shape[1]
        if n > skip:
            moved = slots.take(idx[:, skip:])
            j = torch.arange(skip, n)
            dst = torch.tensor([row[i] for i in blocks], dtype=torch.long)[j // bs] * bs + j % bs
            writes.append((dst, moved.k.transpose(0, 1), moved.v.transpose(0, 1)))
    return _LayerFlush(
        writes=writes,
        layout=(tuple(new_live), new_tail, tuple(new_bins), tuple(candidates[n_live + n_bin :])),
        num_kept=plan.num_kept,
        pos=torch.gather(slots.pos, 1, plan.keep),
        score=torch.gather(slots.score, 1, plan.keep),
        bin_pos=torch.gather(slots.pos, 1, binned_idx),
        bin_score=torch.gather(slots.score, 1, binned_idx),
    )
