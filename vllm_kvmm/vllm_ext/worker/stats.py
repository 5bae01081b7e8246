"""Statistics during the forward: prefill queries into each request's accumulators, decode queries kept.

Called by the attention backend after the stock kernel has written this step's keys, once per layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vllm_kvmm.ops import StatsAccumulator

if TYPE_CHECKING:
    from vllm_kvmm.vllm_ext.messages import PrefillJob
    from vllm_kvmm.vllm_ext.worker.requests import RequestState
    from vllm_kvmm.vllm_ext.worker.state import WorkerState

__all__ = ["QueryBuffers", "observe"]


def observe(
    state: WorkerState,
    layer_name: str,
    query: torch.Tensor,
    key: torch.Tensor | None,
    kv_cache: torch.Tensor,
    md: Any,
    heads: int,
    scale: float,
) -> None:
    """Feed this layer's queries of every compressing request in prefill to its accumulators.

    ``query``: ``[num_tokens, H, d]`` post-RoPE; ``key``: the step's keys ``[num_tokens, H_kv, d]`` as the
    backend has just written them to the paged cache (``None``: read them back from there). Only the keys
    of earlier steps are read back from the cache (none for a prompt prefilled in one step). Decode rows of
    decode-evicting requests keep their last query for the next flush (steps too large for the persistent
    buffers, see :class:`QueryBuffers`).
    """
    engine = state.engine
    if not (state.jobs or state.decoding) or layer_name not in engine.layers:
        return
    ref = engine.layers[layer_name]
    # The step's row offsets and lengths from the CPU copies (a read of the device tensors here would
    # stall every layer on the GPU); the device tensors only where vLLM gave no CPU copy.
    qsl = state.rows.qsl if state.rows.qsl is not None else md.query_start_loc.tolist()
    seq_lens = state.rows.seq_lens if state.rows.seq_lens is not None else md.seq_lens.tolist()
    for row, req_id in enumerate(state.rows.req_ids):
        st = state.requests.get(req_id)
        if st is None or st.failed is not None:
            continue
        if req_id in state.decoding:  # buffer this decode query for the next flush's scores
            if st.positions and not state.queries.buffered:
                q = query[qsl[row] : qsl[row + 1]][-1].clone()
                st.queries.setdefault(ref.index, []).append((q, state.decoding[req_id] - 1))
            continue
        job = state.jobs.get(req_id)
        if job is None:
            continue
        try:
            _accumulate(state, st, job, ref.index, row, query, key, kv_cache, md, heads, scale, qsl, seq_lens)
        except Exception as e:
            # This runs inside the model's forward, shared by every request of the step: one request's
            # failure must not end the step (the request is then served uncompressed).
            state.contain(req_id, job.epoch, "statistics", e)


def _accumulate(
    state: WorkerState,
    st: RequestState,
    job: PrefillJob,
    layer: int,
    row: int,
    query: torch.Tensor,
    key: torch.Tensor | None,
    kv_cache: torch.Tensor,
    md: Any,
    heads: int,
    scale: float,
    qsl: list[int],
    seq_lens: list[int],
) -> None:
    """Feed one prefill row's queries of one layer to the request's accumulator."""
    engine = state.engine
    request = st.policy.stats_request(st.info)
    if not request.wants_layer(layer):
        return
    n_q = qsl[row + 1] - qsl[row]
    q_start = seq_lens[row] - n_q
    # A recomputed (preempted) request may prefill past its prompt in one step: the statistics
    # cover prompt queries only, the later rows are its earlier output tokens.
    if q_start != job.q_start or n_q < job.num_new:
        raise RuntimeError(
            f"kvmm: request {job.req_id} row {row} computes [{q_start}, {q_start + n_q}) but the "
            f"scheduler planned prompt tokens [{job.q_start}, {job.q_start + job.num_new})"
        )
    seq_len = q_start + job.num_new
    acc = st.accs.get(layer)
    if acc is None:
        acc = st.accs[layer] = StatsAccumulator(
            request,
            st.info.num_tokens,
            heads,
            engine.num_kv_heads,
            st.info.vision_mask,
            scale,
            all_reduce=engine.all_reduce,
            world=engine.tp_world,
            start=st.cached,
        )
    if q_start + job.num_new <= acc.first_query:  # no query of this chunk counts: its keys are not read
        acc.skip(q_start, job.num_new)
        return
    acc.update(
        query[qsl[row] : qsl[row] + job.num_new],
        _keys(engine, row, key, kv_cache, md, q_start, qsl, seq_len),
        q_start,
    )


def _keys(
    engine: Any,
    row: int,
    key: torch.Tensor | None,
    kv_cache: torch.Tensor,
    md: Any,
    q_start: int,
    qsl: list[int],
    seq_len: int,
) -> torch.Tensor:
    """Keys ``[seq_len, H_kv, d]`` of one row: earlier steps' from the paged cache, this step's as the backend
    wrote them (bit for bit what a read-back would give: the cache is unquantised, ``patches.py``)."""

    def stored(n: int) -> torch.Tensor:  # the first n keys, read back from the paged cache
        return engine.paged.read_keys(kv_cache, md.block_table[row, : -(-n // engine.block_size)], n)

    if key is None:
        return stored(seq_len)
    mine = key[qsl[row] : qsl[row] + seq_len - q_start]
    if q_start == 0:
        return mine
    earlier = stored(q_start)
    return torch.cat([earlier, mine.to(earlier.dtype)])


class QueryBuffers:
    """Decode queries for decode-time scores, capture-safe.

    Every step of at most ``rows`` tokens copies each layer's queries into a persistent buffer
    (:meth:`record`, inside a replayed CUDA graph too), and :meth:`take` picks the decoding rows out after
    the forward. Larger steps never replay a full graph (capture sizes are at most ``rows``), so their
    decode rows are taken in Python during the forward (:func:`observe`).
    """

    def __init__(self, rows: int = 0) -> None:
        self.rows = rows
        self.bufs: dict[str, torch.Tensor] = {}
        self.scales: dict[str, float] = {}  # softmax scale per layer, for decode scores
        self.buffered = False  # this step's decode queries are in the buffers

    def step_tokens(self, n: int) -> None:
        self.buffered = 0 < n <= self.rows

    def record(self, layer_name: str, query: torch.Tensor) -> None:
        """Copy a decode-sized step's queries ``[n, H, d]`` into this layer's persistent buffer.

        Runs in every forward, so a CUDA graph captured with it repeats the copy on replay.
        """
        n = query.shape[0]
        if n > self.rows:
            return
        buf = self.bufs.get(layer_name)
        if buf is None:
            shape = (self.rows, *query.shape[1:])
            buf = self.bufs[layer_name] = torch.empty(shape, dtype=query.dtype, device=query.device)
        buf[:n].copy_(query)

    def take(self, state: WorkerState) -> None:
        """This step's decode queries of decode-evicting requests, out of the persistent buffers."""
        if not self.buffered:
            return
        assert state.rows.qsl is not None
        rows = [
            (row, req_id)
            for row, req_id in enumerate(state.rows.req_ids)
            if req_id in state.decoding and (st := state.requests.get(req_id)) is not None and st.positions
        ]
        if not rows or not self.bufs:
            return
        dev = next(iter(self.bufs.values())).device
        index = torch.tensor([state.rows.qsl[row + 1] - 1 for row, _ in rows], device=dev)
        for name, buf in self.bufs.items():
            layer = state.engine.layers[name].index
            picked = buf.index_select(0, index)  # [rows, H, d], a copy: the buffer is rewritten next step
            for i, (_, req_id) in enumerate(rows):
                queries = state.requests[req_id].queries.setdefault(layer, [])
                queries.append((picked[i], state.decoding[req_id] - 1))
