"""Decode-time eviction at a flush (docs/decode-eviction.md): re-select, compact, report freed blocks.

The planning is the dense reference's (:func:`~vllm_kvmm.policies.plan_flush`, with the slot order, bin
insertion and rescoring of :class:`~vllm_kvmm.policies.StoredSlots`); this module reads from the paged cache
only what that needs — the stored keys of layers with decode queries to score, then the kept tokens that
move — and writes the moved ones into the blocks they came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from vllm.logger import init_logger

from vllm_kvmm.ops import decode_scores
from vllm_kvmm.policies.decode import (
    DecodeSpec,
    FlushInput,
    FlushPlan,
    flush_tail_start,
    insert_bin,
    plan_flushes,
    query_weights,
    rescore,
)
from vllm_kvmm.vllm_ext.messages import CompressedGroup, FlushJob
from vllm_kvmm.vllm_ext.paged_kv import flat_slots
from vllm_kvmm.vllm_ext.worker.moves import MOVE_BYTES, Move, chunked, move_kv, tensor_key
from vllm_kvmm.vllm_ext.worker.requests import RequestState

if TYPE_CHECKING:
    from vllm_kvmm.vllm_ext.worker.state import WorkerState

__all__ = ["carry_out", "flush", "prepare"]

logger = init_logger(__name__)

# Layers scored in one stack hold at most this much float64 keys and logits at once (a stack of every layer
# of a 7B model at a few thousand stored tokens would be a transient of a GiB beyond what vLLM budgeted).
SCORE_BYTES = 256 << 20
# On a CPU a stack costs more per row once it outgrows the caches: ~60 µs a KV-head row of 300 slots up to
# ~50 MiB, 105 at 100 MiB, 220 at 200 MiB on the 2-core machine of docs/benchmarks.md. Stacks stay smaller.
SCORE_BYTES_CPU = 32 << 20


@dataclass
class _Stored:
    """One layer's stored slots at a flush, in the order :func:`plan_flush` expects: the view's slots older
    than the new tail (live blocks, then absorbed old-tail tokens), the recycle bin's (bin blocks, outside
    the view), then the new tail (in place)."""

    pos: torch.Tensor  # [H_kv, S] true positions
    score: torch.Tensor  # [H_kv, S] float64, before this interval's decode queries
    src: torch.Tensor  # [S] the physical slot of each stored slot (the same for every head)


@dataclass
class _LayerFlush:
    """One layer's flush, computed and not yet applied: what to write where, and the layer's new state."""

    moves: list[Move]  # the kept tokens that change slots
    layout: tuple[tuple[int, ...], int, tuple[int, ...], tuple[int, ...]]  # live, tail, bins, freed
    num_kept: int
    pos: torch.Tensor
    score: torch.Tensor
    bin_pos: torch.Tensor
    bin_score: torch.Tensor


# Per KV-cache group, its layers' planned flushes: ``group → [(layer, flush)]``.
_Prepared = dict[int, list[tuple[int, _LayerFlush]]]


def flush(state: WorkerState, batch: Sequence[tuple[FlushJob, RequestState]]) -> None:
    """Flush every request of ``batch`` (this step's flushes): re-select each layer's stored tokens, compact
    them into live (and bin) blocks, report the rest.

    Every request's layers are scored and planned together first (:func:`prepare`: one scoring einsum per
    stack of equal shapes, one device-to-host copy and one top-k per class, whatever the number of requests:
    the flush's cost was per-call overhead, and on a GPU each copy is a host synchronisation); then each
    request's kept tokens move (:func:`carry_out`). A request whose flush fails is contained alone
    (:meth:`WorkerState.contain`): if the batch cannot be prepared, each request is prepared on its own, so
    one request's bad state fails that request only.
    """
    prepared: list[_Prepared] | None = None
    try:
        prepared = prepare(state, batch)
    except Exception as e:
        if len(batch) > 1:
            logger.warning(
                "vllm-kvmm: flushing %d requests together failed (%s); flushing each alone", len(batch), e
            )
        else:
            job, _ = batch[0]
            state.contain(job.req_id, job.epoch, "flush", e)
            return
    for i, (job, st) in enumerate(batch):
        try:
            carry_out(state, job, st, prepared[i] if prepared is not None else prepare(state, [(job, st)])[0])
        except Exception as e:
            state.contain(job.req_id, job.epoch, "flush", e)


def prepare(state: WorkerState, batch: Sequence[tuple[FlushJob, RequestState]]) -> list[_Prepared]:
    """Score and plan every layer of every request in ``batch``, layers of equal shapes together. Reads the
    stored keys it scores; writes nothing and changes no request's state (a failure leaves all as they were).
    """
    members = state.engine.members()
    stored = [_stored(state, job, st, members) for job, st in batch]
    scores = _rescored(state, [st for _, st in batch], stored)
    plans = _planned(state, batch, stored, scores)
    out: list[_Prepared] = []
    for (job, st), s, p in zip(batch, stored, plans, strict=True):
        planned: _Prepared = {}
        for group, layers in sorted(members.items()):
            planned[group] = [
                (layer, _layer_flush(state, job, st, group, name, s[layer], p[layer]))
                for name, layer in layers
            ]
            if len({f.layout for _, f in planned[group]}) != 1:
                raise RuntimeError(
                    f"kvmm: {job.req_id}: layers of group {group} flushed to different layouts"
                )
        out.append(planned)
    return out


def carry_out(state: WorkerState, job: FlushJob, st: RequestState, planned: _Prepared) -> None:
    """Move one request's kept tokens as :func:`prepare` planned them and take on its new state: groups in
    runs of at most :data:`MOVE_BYTES`, gathered before any of the run is written (:func:`move_kv`: one
    gather and one write per shared cache tensor), so a failure leaves each group as it was or fully
    flushed (and the groups flushed before it reported)."""
    engine = state.engine
    report: list[CompressedGroup] = []
    try:
        sizes = ((g, sum(m.nbytes(engine) for _, f in fs for m in f.moves)) for g, fs in planned.items())
        for run in chunked(sizes, MOVE_BYTES):
            move_kv(engine, [m for g in run for _, f in planned[g] for m in f.moves])
            for group in run:
                for layer, f in planned[group]:
                    st.queries.pop(layer, None)  # consumed by this flush's scores
                    st.positions[layer], st.scores[layer] = f.pos, f.score
                    st.bin_positions[layer], st.bin_scores[layer] = f.bin_pos, f.bin_score
                first = planned[group][0][1]
                live, tail, bins, freed = first.layout
                st.compact[group] = (live, tail)
                st.bin_blocks[group] = bins
                if freed:
                    report.append(CompressedGroup(group, len(live), tail, first.num_kept, freed))
    finally:
        # Groups flushed before a failure are reported: their freed blocks are no longer read.
        if report:
            state.out.flushed[job.req_id] = report
            state.out.epochs[job.req_id] = job.epoch
            state.out.stages.add(engine.stage)
    if state.recorder is not None:
        state.recorder.flushed(job.req_id, st, engine.num_layers)


def _stored(
    state: WorkerState, job: FlushJob, st: RequestState, members: dict[int, list[tuple[str, int]]]
) -> dict[int, _Stored]:
    """Where every layer's stored slots are, with their positions and scores so far. Reads no cache.

    Layers of one layout (the same live blocks, tail, bin blocks and stored shapes: every layer of a
    uniform-budget policy) are built as one stack — per layer this is a dozen small tensor operations,
    which were the largest per-layer part of a flush — and handed out as views, one per layer.
    """
    bs = state.engine.block_size
    classes: dict[tuple, list[tuple[int, int]]] = {}  # layout → [(group, layer)]
    for group, layers in members.items():
        live, tail = st.compact[group]
        for _, layer in layers:
            bin_pos = st.bin_positions.get(layer)
            n_bin = 0 if bin_pos is None else bin_pos.shape[1]
            key = (live, tail, st.bin_blocks.get(group, ()), tuple(st.positions[layer].shape), n_bin)
            classes.setdefault(key, []).append((group, layer))
    out: dict[int, _Stored] = {}
    for (live, tail, bins, (_, s0), n_bin), lays in classes.items():
        pos0 = torch.stack([st.positions[layer] for _, layer in lays])  # [L, H_kv, S0]
        # Decoded since the last flush: from the end of the stored tail. A tail can be empty (a prompt of
        # whole blocks whose layout kept no tail, or no token at all: found by the lifecycle fuzzer), and
        # then the last stored position lies in the prefix; the new tokens still start at the tail's start.
        last = pos0[:, 0, -1].tolist() if s0 else [-1] * len(lays)
        for since, idx in _by_value([max(x + 1, tail * bs) for x in last]):
            sub = [lays[i] for i in idx]
            pos = pos0 if len(idx) == len(lays) else pos0[torch.tensor(idx)]
            out.update(_stored_stack(state, job, st, sub, pos, since, live, tail, bins, n_bin))
    return out


def _stored_stack(
    state: WorkerState,
    job: FlushJob,
    st: RequestState,
    lays: list[tuple[int, int]],
    pos: torch.Tensor,
    since: int,
    live: tuple[int, ...],
    tail: int,
    bins: tuple[int, ...],
    n_bin: int,
) -> dict[int, _Stored]:
    """:func:`_stored` for layers ``lays`` (``(group, layer)``) of one layout whose new tokens start at
    ``since``; ``pos``: their stored positions ``[L, H_kv, S0]``."""
    spec = st.decode
    assert spec is not None
    bs, length = state.engine.block_size, job.length
    n, h = pos.shape[0], pos.shape[1]
    new = torch.arange(since, length).expand(n, h, -1)
    pos = torch.cat([pos, new], 2)
    score = torch.cat(
        [torch.stack([st.scores[layer] for _, layer in lays]), torch.zeros(new.shape, dtype=torch.float64)], 2
    )
    n_view = len(live) * bs + length - tail * bs
    if pos.shape[2] != n_view:
        layers = [layer for _, layer in lays]
        raise RuntimeError(f"kvmm: {job.req_id} layers {layers}: {pos.shape[2]} positions, {n_view} slots")
    blocks = [*live, *range(tail, -(-length // bs))]
    rows = torch.tensor([[job.block_ids[g][i] for i in blocks] for g, _ in lays], dtype=torch.long)
    src = flat_slots(rows, torch.arange(n_view), bs)  # [L, S]
    if n_bin:
        bin_pos = torch.stack([st.bin_positions[layer] for _, layer in lays])  # [L, H_kv, B]
        bin_score = torch.stack([st.bin_scores[layer] for _, layer in lays])
        bin_rows = torch.tensor([[job.block_ids[g][i] for i in bins] for g, _ in lays], dtype=torch.long)
        bin_src = flat_slots(bin_rows, torch.arange(n_bin), bs)
        ts = flush_tail_start(length, spec.recent, bs, tail * bs)
        parts = []
        for m, idx in _by_value((pos[:, 0] < ts).sum(1).tolist()):  # where each layer's bin goes
            sel = slice(None) if len(idx) == n else torch.tensor(idx)
            k = len(idx)
            parts.append((
                idx,
                insert_bin(pos[sel].flatten(0, 1), bin_pos[sel].flatten(0, 1), m).view(k, h, -1),
                insert_bin(score[sel].flatten(0, 1), bin_score[sel].flatten(0, 1), m).view(k, h, -1),
                insert_bin(src[sel], bin_src[sel], m),
            ))  # fmt: skip
        out = {}
        for idx, p, z, sr in parts:
            for i, pi, zi, si in zip(idx, p, z, sr, strict=True):
                out[lays[i][1]] = _Stored(pi, zi, si)
        return out
    return {layer: _Stored(p, z, sr) for (_, layer), p, z, sr in zip(lays, pos, score, src, strict=True)}


def _by_value(values: list[int]) -> list[tuple[int, list[int]]]:
    """``values``' distinct values with the indices holding each, in first-seen order."""
    out: dict[int, list[int]] = {}
    for i, x in enumerate(values):
        out.setdefault(x, []).append(i)
    return list(out.items())


def _rescored(
    state: WorkerState, sts: Sequence[RequestState], stored: Sequence[dict[int, _Stored]]
) -> list[dict[int, torch.Tensor]]:
    """Per request, ``layer → [H_kv, S]`` scores after the decode queries buffered since its last flush
    (layers without any keep :attr:`_Stored.score`). Reads each such layer's stored keys (not the values);
    layers whose decode spec, stored slots, query count and scale agree — of one request or of several —
    are scored as one stack of heads (:func:`decode_scores` treats each KV head's row alone, with its own
    queries' positions), and every fresh score comes back to the host in one copy."""
    names = {ref.index: name for name, ref in state.engine.layers.items()}
    # (spec, stored slots, queries' shape, scale) → (request, layer, queries [H, W, d], their positions [W])
    stacks: dict[tuple, list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {}
    for r, (st, layers) in enumerate(zip(sts, stored, strict=True)):
        for layer, s in layers.items():
            buffered = st.queries.get(layer, [])
            if not buffered:
                continue
            q = torch.stack([x[0] for x in buffered], 1)  # [H, W, d]
            key = (st.decode, s.pos.shape, q.shape, state.queries.scales[names[layer]])
            stacks.setdefault(key, []).append((r, layer, q, torch.tensor([x[1] for x in buffered])))
    out: list[dict[int, torch.Tensor]] = [{} for _ in sts]
    if not stacks:
        return out
    budget = SCORE_BYTES if state.engine.cuda else min(SCORE_BYTES, SCORE_BYTES_CPU)
    fresh: list[torch.Tensor] = []
    scored: list[tuple[list[tuple[int, int]], tuple[int, int], int, DecodeSpec]] = []
    for (spec, (h_kv, n), (h, w, d), scale), members in stacks.items():
        # decode_scores holds a layer's keys [H_kv, S, d] and [H, W, S] logits and probabilities in float64:
        # a stack is cut to at most `budget` of them.
        sizes = ((m, 8 * n * (h_kv * d + 4 * h * w)) for m in members)
        weights = query_weights(spec, w)
        for part in chunked(sizes, budget):
            rows = [(r, layer) for r, layer, _, _ in part]
            keys = _stored_keys(state, [(names[layer], stored[r][layer].src) for r, layer in rows])
            pos = torch.cat([stored[r][layer].pos for r, layer in rows])
            q = torch.cat([q for _, _, q, _ in part])
            q_pos = torch.cat([qp.expand(h_kv, -1) for *_, qp in part])  # [Σ H_kv, W]
            fresh.append(decode_scores(q, keys, pos, q_pos, scale, weights))  # [Σ H_kv, S]
            scored.append((rows, (h_kv, n), w, spec))
    host = torch.cat([x.flatten() for x in fresh]).cpu().split([x.numel() for x in fresh])
    for (rows, (h_kv, n), w, spec), x in zip(scored, host, strict=True):
        for (r, layer), part in zip(rows, x.view(len(rows) * h_kv, n).split(h_kv), strict=True):
            out[r][layer] = rescore(spec, stored[r][layer].score, part, w)
    return out


def _stored_keys(state: WorkerState, rows: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """``[len(rows)·H_kv, S, d]``: each row's stored keys (a layer's, at its slots ``[S]`` in stored order),
    in row order — one gather per cache tensor the layers share (with a KV-cache group per layer, one for
    all), not a read per layer."""
    engine = state.engine
    by_tensor: dict[tuple, list[int]] = {}
    for i, (name, _) in enumerate(rows):
        by_tensor.setdefault(tensor_key(engine.kv_caches[name]), []).append(i)
    parts: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    for idx in by_tensor.values():
        cache = engine.kv_caches[rows[idx[0]][0]]
        k = engine.paged.gather_keys(cache, torch.cat([rows[i][1] for i in idx]))  # [len·S, H_kv, d]
        k = k.view(len(idx), -1, *k.shape[1:]).transpose(1, 2)  # [len, H_kv, S, d]
        if len(by_tensor) == 1:
            return k.reshape(-1, *k.shape[2:])
        for j, i in enumerate(idx):
            parts[i] = k[j]
    return torch.cat(parts)


def _planned(
    state: WorkerState,
    batch: Sequence[tuple[FlushJob, RequestState]],
    stored: Sequence[dict[int, _Stored]],
    scores: Sequence[dict[int, torch.Tensor]],
) -> list[dict[int, tuple[FlushPlan, torch.Tensor]]]:
    """Per request, ``layer → (plan, scores it was planned from)``: one :func:`plan_flushes` for all."""
    bs = state.engine.block_size
    group_of = {ref.index: ref.group for ref in state.engine.layers.values()}
    where: list[tuple[int, int]] = []
    inputs: list[FlushInput] = []
    for r, ((job, st), layers) in enumerate(zip(batch, stored, strict=True)):
        spec = st.decode
        assert spec is not None
        for layer, s in layers.items():
            where.append((r, layer))
            capacity = spec.capacity if spec.capacity is not None else st.capacity[layer]
            tail_floor = st.compact[group_of[layer]][1] * bs
            score = scores[r].get(layer, s.score)
            inputs.append(FlushInput(spec, s.pos, score, job.length, capacity, tail_floor, st.shared))
    out: list[dict[int, tuple[FlushPlan, torch.Tensor]]] = [{} for _ in batch]
    for (r, layer), plan, x in zip(where, plan_flushes(inputs, bs), inputs, strict=True):
        out[r][layer] = (plan, x.scores)
    return out


def _layer_flush(
    state: WorkerState,
    job: FlushJob,
    st: RequestState,
    group: int,
    name: str,
    s: _Stored,
    planned: tuple[FlushPlan, torch.Tensor],
) -> _LayerFlush:
    """One layer's planned flush: where its kept tokens go. Reads nothing, changes nothing."""
    plan, score = planned
    bs = state.engine.block_size
    live, tail = st.compact[group]
    bins = st.bin_blocks.get(group, ())
    new_tail = plan.tail_start // bs
    if new_tail < tail:
        raise RuntimeError(f"kvmm: {job.req_id}: the tail moved back ({tail} -> {new_tail})")
    binned_idx = plan.binned if plan.binned is not None else plan.keep[:, :0]
    # Physical blocks for the new prefix and bin, taken from those whose contents are gathered here.
    candidates = [*live, *bins, *range(tail, new_tail)]
    n_live, n_bin = plan.prefix_keep // bs, -(-binned_idx.shape[1] // bs)
    new_live, new_bins = candidates[:n_live], candidates[n_live : n_live + n_bin]
    row = job.block_ids[group]
    moves = []
    # The shared prefix stays where it is (the first slots of the first live blocks, kept by plan_flush):
    # never written, as other requests may read its blocks.
    frozen = int((s.pos[0] < st.shared).sum()) if st.shared else 0
    for idx, blocks, skip in (
        (plan.keep[:, : plan.prefix_keep], new_live, frozen),
        (binned_idx, new_bins, 0),
    ):
        n = idx.shape[1]
        if n > skip:
            dst = flat_slots(
                torch.tensor([row[i] for i in blocks], dtype=torch.long), torch.arange(skip, n), bs
            )
            moves.append(Move(name, s.src[idx[:, skip:]], dst))
    return _LayerFlush(
        moves=moves,
        layout=(tuple(new_live), new_tail, tuple(new_bins), tuple(candidates[n_live + n_bin :])),
        num_kept=plan.num_kept,
        pos=torch.gather(s.pos, 1, plan.keep),
        score=torch.gather(score, 1, plan.keep),
        bin_pos=torch.gather(s.pos, 1, binned_idx),
        bin_score=torch.gather(score, 1, binned_idx),
    )
