"""Worker-side state: statistics during prefill, compaction after it, and the compact read view.

One :class:`WorkerState` per worker process (``worker_state()``). The attention backend feeds it the
queries of compressing requests (:meth:`WorkerState.observe`), the connector runs the compression after
the forward pass (:meth:`WorkerState.compress_finished_prefills`), and the metadata builder asks it for
each group's compact block table (:meth:`WorkerState.compact_view`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_kvmm.config import KVPolicyArgs
from vllm_kvmm.ops import StatsAccumulator, decode_scores
from vllm_kvmm.policies import (
    DecodeSpec,
    KVPolicy,
    LayerPlan,
    PromptInfo,
    apply_plan,
    flush_tail_start,
    plan_compression,
    plan_flush,
)
from vllm_kvmm.vllm_ext.messages import CompressedGroup, FlushJob, KVMMStepMeta, KVMMWorkerMeta, PrefillJob

__all__ = ["CompactView", "LayerRef", "RequestState", "WorkerState", "worker_state"]


@dataclass(frozen=True)
class LayerRef:
    index: int  # decoder layer index (the policy's layer)
    group: int  # KV-cache group id


@dataclass
class RequestState:
    """What the worker keeps about one compressing request until it finishes."""

    policy: KVPolicy
    info: PromptInfo
    accs: dict[int, StatsAccumulator] = field(default_factory=dict)
    # group -> (live logical blocks holding the compacted prefix, first logical block of the in-place tail)
    compact: dict[int, tuple[tuple[int, ...], int]] = field(default_factory=dict)
    # Decode-time eviction (docs/decode-eviction.md), per layer: stored slots' true positions and scores
    # [H_kv, S] (slot order = the compact view's order), the capacity, and the decode queries since the
    # last flush as (q [H, d], position).
    decode: DecodeSpec | None = None
    positions: dict[int, torch.Tensor] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    capacity: dict[int, int] = field(default_factory=dict)
    queries: dict[int, list[tuple[torch.Tensor, int]]] = field(default_factory=dict)
    # HAE's recycle bin: per group the logical blocks holding binned tokens (outside the view), per layer
    # their positions and scores [H_kv, n].
    bin_blocks: dict[int, tuple[int, ...]] = field(default_factory=dict)
    bin_positions: dict[int, torch.Tensor] = field(default_factory=dict)
    bin_scores: dict[int, torch.Tensor] = field(default_factory=dict)


class WorkerState:
    def __init__(self) -> None:
        self.layers: dict[str, LayerRef] = {}
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.block_size = 0
        self.num_kv_heads = 0
        self.paged: Any = None
        self.requests: dict[str, RequestState] = {}
        self.jobs: dict[str, PrefillJob] = {}
        self.decoding: dict[str, int] = {}
        self.flushes: dict[str, FlushJob] = {}
        self.row_req_ids: list[str] = []
        self._metadata: dict[tuple, Any] = {}
        self._row_qsl: list[int] | None = None
        self._row_seq_lens: list[int] | None = None
        # Decode queries for decode-time scores, capture-safe: every step of at most ``query_rows`` tokens
        # copies each layer's queries into a persistent buffer (inside a replayed CUDA graph too), and
        # after_forward picks the decoding rows out. Larger steps never replay a full graph (capture sizes
        # are at most ``query_rows``), so their decode rows are taken in Python during the forward.
        self.query_rows = 0
        self._query_bufs: dict[str, torch.Tensor] = {}
        self._buffered_step = False
        self.out = KVMMWorkerMeta()
        self.keep_plans = False  # tests set it to inspect kept sets
        self.tp_world = 1
        self.all_reduce: Any = None
        self.plan_history: dict[str, list[LayerPlan]] = {}
        self.flush_history: dict[str, list[list[torch.Tensor]]] = {}
        self.bin_history: dict[str, list[list[torch.Tensor]]] = {}
        self.scales: dict[str, float] = {}
        # This step feeds queries to statistics (a compressing prefill, decode-time scores): its attention
        # must run outside full CUDA graphs, where Python hooks do not run. ``force_piecewise``: tests.
        self.eager_attention = False
        self.force_piecewise = False
        # Since configure(): seconds spent compressing and flushing (device-synchronised), for benchmarks.
        self.seconds_total = 0.0

    # ---- set-up ------------------------------------------------------------------------------
    def configure(
        self,
        layers: dict[str, LayerRef],
        block_size: int,
        num_kv_heads: int,
        tp_world: int = 1,
        all_reduce: Any = None,
        query_rows: int = 0,
    ) -> None:
        """Start afresh for a new engine (one compressing engine per process at a time).

        ``num_kv_heads`` is this rank's; under tensor parallelism ``all_reduce`` sums a tensor over ranks.
        """
        self.reset()
        self.tp_world = tp_world
        self.all_reduce = all_reduce
        self.layers = layers
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.query_rows = query_rows

    def reset(self) -> None:
        """Forget everything: no engine, caches or requests (``configure`` and the connector's shutdown)."""
        self.__init__()  # type: ignore[misc]

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Take the engine's layer caches; a second engine in this process is refused here.

        vLLM keeps one worker-side KV connector per process and hands it to every engine started there
        while it lives: a second in-process engine would register its caches over the first one's, and
        the first would go on compressing the second's caches.
        """
        if self.kv_caches:
            raise RuntimeError(
                "vllm-kvmm: a second engine with a KV policy in this process; vLLM shares one KV connector "
                "per process between them. Shut the first engine down before starting another, or run "
                "engines in their own processes (VLLM_ENABLE_V1_MULTIPROCESSING=1, vLLM's default)"
            )
        self.kv_caches = dict(kv_caches)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_groups(self) -> list[list[int]]:
        """Decoder layers per KV-cache group (they share a block table, hence a layout)."""
        out: dict[int, list[int]] = {}
        for ref in self.layers.values():
            out.setdefault(ref.group, []).append(ref.index)
        return [sorted(v) for _, v in sorted(out.items())]

    # ---- per step ----------------------------------------------------------------------------
    def begin_step(self, meta: KVMMStepMeta) -> None:
        """Forget dropped requests and register this step's prefill jobs (before the forward)."""
        self.drop(meta.dropped)
        self.jobs = meta.jobs
        self.decoding = meta.decoding
        self.flushes = meta.flushes
        for req_id, job in meta.jobs.items():
            if req_id not in self.requests or job.q_start == 0:
                self.requests[req_id] = self._new_request(job)

    def drop(self, req_ids: set[str] | list[str]) -> None:
        for r in req_ids:
            self.requests.pop(r, None)
            self.jobs.pop(r, None)
            self.decoding.pop(r, None)
            self.flushes.pop(r, None)

    def _new_request(self, job: PrefillJob) -> RequestState:
        policy = KVPolicyArgs.parse(job.policy, job.budget, job.config)
        vision = torch.zeros(job.num_prompt_tokens, dtype=torch.bool)
        for off, length in job.vision:
            vision[off : off + length] = True
        info = PromptInfo(job.num_prompt_tokens, vision, self.num_layers, self.num_kv_heads)
        return RequestState(policy=policy, info=info, decode=policy.decode_spec(info))

    # ---- statistics (called by the attention backend, per layer) ------------------------------
    def observe(
        self, layer_name: str, query: torch.Tensor, kv_cache: torch.Tensor, md: Any, heads: int, scale: float
    ) -> None:
        """Feed this layer's queries of every compressing request in prefill to its accumulators.

        ``query``: ``[num_tokens, H, d]`` post-RoPE. Keys are read back from the paged cache, where the
        backend has just written this step's tokens.
        """
        if not (self.jobs or self.decoding) or layer_name not in self.layers:
            return
        ref = self.layers[layer_name]
        self.scales[layer_name] = scale
        # The step's row offsets and lengths from the CPU copies (a read of the device tensors here would
        # stall every layer on the GPU); the device tensors only where vLLM gave no CPU copy.
        qsl = self._row_qsl if self._row_qsl is not None else md.query_start_loc.tolist()
        seq_lens = self._row_seq_lens if self._row_seq_lens is not None else md.seq_lens.tolist()
        for row, req_id in enumerate(self.row_req_ids):
            st = self.requests.get(req_id)
            if st is None:
                continue
            if req_id in self.decoding:  # buffer this decode query for the next flush's scores
                if st.positions and not self._buffered_step:
                    q = query[qsl[row] : qsl[row + 1]][-1].clone()
                    st.queries.setdefault(ref.index, []).append((q, self.decoding[req_id] - 1))
                continue
            job = self.jobs.get(req_id)
            if job is None:
                continue
            request = st.policy.stats_request(st.info)
            if not request.wants_layer(ref.index):
                continue
            n_q = qsl[row + 1] - qsl[row]
            q_start = seq_lens[row] - n_q
            # A recomputed (preempted) request may prefill past its prompt in one step: the statistics
            # cover prompt queries only, the later rows are its earlier output tokens.
            if q_start != job.q_start or n_q < job.num_new:
                raise RuntimeError(
                    f"kvmm: request {req_id} row {row} computes [{q_start}, {q_start + n_q}) but the "
                    f"scheduler planned prompt tokens [{job.q_start}, {job.q_start + job.num_new})"
                )
            seq_len = q_start + job.num_new
            acc = st.accs.get(ref.index)
            if acc is None:
                acc = StatsAccumulator(
                    request,
                    st.info.num_tokens,
                    heads,
                    self.num_kv_heads,
                    st.info.vision_mask,
                    scale,
                    all_reduce=self.all_reduce,
                    world=self.tp_world,
                )
                st.accs[ref.index] = acc
            n_blocks = -(-seq_len // self.block_size)
            k, _ = self.paged.read(kv_cache, md.block_table[row, :n_blocks], seq_len)
            acc.update(query[qsl[row] : qsl[row] + job.num_new], k, q_start)

    # ---- compression (after the forward) -----------------------------------------------------
    def after_forward(self) -> None:
        """Compress prompts whose prefill ended this step, then run this step's decode-time flushes."""
        t0 = time.perf_counter()
        if self.decoding and self._buffered_step:
            self._take_buffered_queries()
        done = [j for j in self.jobs.values() if j.completes and j.req_id in self.requests]
        for job in done:
            self._compress(job, self.requests[job.req_id])
        flushes = [f for f in self.flushes.values() if f.req_id in self.requests]
        for flush in flushes:
            self._flush(flush, self.requests[flush.req_id])
        if done or flushes:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # count the kernels, not just their launches
            dt = time.perf_counter() - t0
            self.out.seconds += dt
            self.seconds_total += dt
        self.jobs = {}
        self.flushes = {}

    def _compress(self, job: PrefillJob, st: RequestState) -> None:
        if self.paged is None:
            raise RuntimeError("kvmm: no KV-cache accessor: the attention backend is not vllm-kvmm's")
        info, policy = st.info, st.policy
        n, bs = info.num_tokens, self.block_size
        stats = [st.accs[i].result() if i in st.accs else None for i in range(self.num_layers)]
        plans = plan_compression(policy, stats, info, granularity=bs, groups=self.layer_groups())
        st.accs.clear()
        if self.keep_plans:
            self.plan_history[job.req_id] = plans
        merge = policy.merge_spec(info)
        assert job.block_ids is not None
        report: dict[int, CompressedGroup] = {}
        for name, ref in self.layers.items():
            plan = plans[ref.index]
            keep, tail = plan.prefix_keep // bs, plan.tail_start // bs
            prev = report.get(ref.group)
            if prev is not None and (prev.keep, prev.tail) != (keep, tail):
                raise RuntimeError(f"kvmm: layers of group {ref.group} planned different layouts")
            report[ref.group] = CompressedGroup(
                ref.group, keep, tail, plan.num_kept, tuple(range(keep, tail))
            )
            if st.decode is not None:
                self._start_decode_state(st, ref.index, plan, stats[ref.index], job.end)
                st.compact[ref.group] = (tuple(range(keep)), tail)
            if plan.is_identity or keep == tail:
                continue
            ids = torch.tensor(job.block_ids[ref.group][: -(-n // bs)], dtype=torch.long)
            cache = self.kv_caches[name]
            k, v = self.paged.read(cache, ids, n)  # [N, H_kv, d]
            k2, v2 = apply_plan(plan, k.transpose(0, 1), v.transpose(0, 1), merge)  # [H_kv, K_total, d]
            # Destination slots: the kept prefix fills logical blocks [0, keep); the tail stays in place.
            pos = torch.cat([torch.arange(plan.prefix_keep), torch.arange(plan.tail_start, n)])
            slots = ids[pos // bs] * bs + pos % bs
            self.paged.write(cache, slots, k2.transpose(0, 1), v2.transpose(0, 1))
            st.compact[ref.group] = (tuple(range(keep)), tail)
        groups = [g for g in report.values() if g.keep < g.tail]
        if groups:
            self.out.compressed[job.req_id] = groups
            self.out.prompt_tokens[job.req_id] = n
            self.out.kept_token_layers[job.req_id] = sum(p.num_kept for p in plans)
            self.out.epochs[job.req_id] = job.epoch
            self.out.num_layers = self.num_layers

    def _start_decode_state(
        self, st: RequestState, layer: int, plan: LayerPlan, stats: Any, end: int
    ) -> None:
        """Positions and H2O scores of the slots kept by prefill, in the compact view's slot order."""
        h, n = self.num_kv_heads, st.info.num_tokens
        head = plan.keep[:, : plan.prefix_keep]
        tail = torch.arange(plan.tail_start, max(end, n)).expand(h, -1)  # a recompute may reach past N
        st.positions[layer] = torch.cat([head, tail], 1)
        score = torch.zeros(st.positions[layer].shape, dtype=torch.float64)
        col = stats.colsum if stats is not None else None
        if col is not None:
            known = plan.keep.shape[1]  # prompt slots; tokens past the prompt start at zero
            score[:, :known] = torch.gather(col.double().cpu(), 1, plan.keep)
        st.scores[layer] = score
        st.capacity[layer] = plan.num_kept

    def _flush(self, job: FlushJob, st: RequestState) -> None:
        """Re-select every layer's stored tokens, compact them into live (and bin) blocks, report the rest.

        Stored slots, in the order :func:`plan_flush` expects: the view's slots older than the new tail
        (live blocks, then absorbed old-tail tokens), the recycle bin's slots (bin blocks, outside the
        view), then the new tail (in place).
        """
        spec = st.decode
        assert spec is not None and self.paged is not None
        bs, length = self.block_size, job.length
        report: dict[int, CompressedGroup] = {}
        for name, ref in self.layers.items():
            live, tail = st.compact[ref.group]
            bins = st.bin_blocks.get(ref.group, ())
            layer = ref.index
            pos, score = st.positions[layer], st.scores[layer]
            h = pos.shape[0]
            tail_pos = torch.arange(int(pos[0, -1]) + 1, length).expand(h, -1)  # decoded since last flush
            pos = torch.cat([pos, tail_pos], 1)
            score = torch.cat([score, torch.zeros(tail_pos.shape, dtype=torch.float64)], 1)
            n_view = len(live) * bs + length - tail * bs
            if pos.shape[1] != n_view:
                raise RuntimeError(
                    f"kvmm: {job.req_id} layer {layer}: {pos.shape[1]} positions, {n_view} slots"
                )
            row = job.block_ids[ref.group]
            cache = self.kv_caches[name]
            ids = [row[i] for i in [*live, *range(tail, -(-length // bs))]]
            k, v = self.paged.read(cache, torch.tensor(ids, dtype=torch.long), n_view)  # [S, H_kv, d]
            k, v = k.transpose(0, 1), v.transpose(0, 1)
            bin_pos = st.bin_positions.get(layer, pos[:, :0])
            if bin_pos.shape[1]:
                bk, bv = self.paged.read(
                    cache, torch.tensor([row[i] for i in bins], dtype=torch.long), bin_pos.shape[1]
                )
                tail_start = flush_tail_start(length, spec.recent, bs)
                m = int((pos[0] < tail_start).sum())
                k = torch.cat([k[:, :m], bk.transpose(0, 1).to(k.device), k[:, m:]], 1)
                v = torch.cat([v[:, :m], bv.transpose(0, 1).to(v.device), v[:, m:]], 1)
                pos = torch.cat([pos[:, :m], bin_pos, pos[:, m:]], 1)
                score = torch.cat([score[:, :m], st.bin_scores[layer], score[:, m:]], 1)
            buffered = st.queries.pop(layer, [])
            if buffered:
                q = torch.stack([x[0] for x in buffered], 1)  # [H, W, d]
                qpos = torch.tensor([x[1] for x in buffered])
                w = q.shape[1]
                weights = spec.decay ** torch.arange(w - 1, -1, -1, dtype=torch.float64)
                score = score * spec.decay**w
                score = score + decode_scores(q, k, pos, qpos, self._scale(name), weights).cpu()
            cap = spec.capacity if spec.capacity is not None else st.capacity[layer]
            plan = plan_flush(spec, pos, score, length, cap, bs)
            new_tail = plan.tail_start // bs
            if new_tail < tail:
                raise RuntimeError(f"kvmm: {job.req_id}: the tail moved back ({tail} -> {new_tail})")
            binned = plan.binned if plan.binned is not None else plan.keep[:, :0]
            # Physical blocks for the new prefix and bin, taken from those whose contents were just read.
            candidates = [*live, *bins, *range(tail, new_tail)]
            n_live, n_bin = plan.prefix_keep // bs, -(-binned.shape[1] // bs)
            new_live, new_bins = candidates[:n_live], candidates[n_live : n_live + n_bin]
            freed = tuple(candidates[n_live + n_bin :])
            for slots_of, blocks in ((plan.keep[:, : plan.prefix_keep], new_live), (binned, new_bins)):
                n = slots_of.shape[1]
                if n:
                    idx = slots_of.to(k.device)[..., None].expand(-1, -1, k.shape[2])
                    j = torch.arange(n)
                    dst = torch.tensor([row[i] for i in blocks], dtype=torch.long)[j // bs] * bs + j % bs
                    self.paged.write(
                        cache,
                        dst,
                        torch.gather(k, 1, idx).transpose(0, 1),
                        torch.gather(v, 1, idx).transpose(0, 1),
                    )
            st.positions[layer] = torch.gather(pos, 1, plan.keep)
            st.scores[layer] = torch.gather(score, 1, plan.keep)
            st.bin_positions[layer] = torch.gather(pos, 1, binned)
            st.bin_scores[layer] = torch.gather(score, 1, binned)
            st.compact[ref.group] = (tuple(new_live), new_tail)
            st.bin_blocks[ref.group] = tuple(new_bins)
            report[ref.group] = CompressedGroup(ref.group, len(new_live), new_tail, plan.num_kept, freed)
        groups = [g for g in report.values() if g.freed]
        if groups:
            self.out.compressed[job.req_id] = groups
            self.out.epochs[job.req_id] = job.epoch
            self.out.flushed.add(job.req_id)
        if self.keep_plans:
            self.flush_history.setdefault(job.req_id, []).append(
                [st.positions[i].clone() for i in range(self.num_layers)]
            )
            self.bin_history.setdefault(job.req_id, []).append(
                [st.bin_positions[i].clone() for i in range(self.num_layers)]
            )

    def _scale(self, layer_name: str) -> float:
        return self.scales[layer_name]

    def take_output(self) -> KVMMWorkerMeta | None:
        out, self.out = self.out, KVMMWorkerMeta()
        return out if out.compressed or out.seconds else None

    # ---- read view (called by the metadata builder, per group) --------------------------------
    def view_signature(self, group: int) -> tuple[tuple[int, tuple[int, ...], int], ...]:
        """``(row, live blocks, tail)`` of every row of this step compacted in ``group`` (empty: none)."""
        out = []
        for i, r in enumerate(self.row_req_ids):
            st = self.requests.get(r)
            if st is not None and group in st.compact:
                out.append((i, *st.compact[group]))
        return tuple(out)

    def compact_view(
        self,
        signature: tuple[tuple[int, tuple[int, ...], int], ...],
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
    ) -> CompactView:
        """Per-row ``row[live] ++ row[tail:]`` and ``seq_len − (tail − len(live))·bs`` for compacted rows.

        Built as one gather on the table's device from an index made on the CPU, so a step costs one
        host-to-device copy per group and no device sync.
        """
        n_rows, width = block_table.shape
        index = torch.arange(width).repeat(n_rows, 1)
        shift = torch.zeros(n_rows, dtype=torch.long)
        for i, live, tail in signature:
            keep = len(live)
            index[i, :keep] = torch.tensor(live, dtype=torch.long)
            # Columns past the end of the shortened row repeat its last block; the kernel never reads them.
            index[i, keep:] = torch.arange(tail, tail + width - keep).clamp_max(width - 1)
            shift[i] = (tail - keep) * self.block_size
        dev = block_table.device
        index = index.to(dev, non_blocking=True)
        lens = seq_lens - shift[: seq_lens.shape[0]].to(dev, dtype=seq_lens.dtype, non_blocking=True)
        return CompactView(table=torch.gather(block_table, 1, index), seq_lens=lens, shift=shift, index=index)

    # ---- metadata shared by groups with the same view, within one step -----------------------------
    def new_step(self, req_ids: list[str]) -> None:
        """Called once per step before any metadata is built: the row order, and a fresh share cache."""
        self.row_req_ids = req_ids
        self._metadata = {}
        self._row_qsl = self._row_seq_lens = None

    def note_rows(self, query_start_loc_cpu: torch.Tensor, seq_lens_cpu: torch.Tensor | None) -> None:
        """The step's query offsets and (uncompacted) lengths per row, from the first group's metadata."""
        if self._row_qsl is None:
            self._row_qsl = query_start_loc_cpu.tolist()
            self._row_seq_lens = seq_lens_cpu.tolist() if seq_lens_cpu is not None else None
            self._buffered_step = 0 < self._row_qsl[-1] <= self.query_rows

    def record_queries(self, layer_name: str, query: torch.Tensor) -> None:
        """Copy a decode-sized step's queries ``[n, H, d]`` into this layer's persistent buffer.

        Runs in every forward, so a CUDA graph captured with it repeats the copy on replay.
        """
        n = query.shape[0]
        if n > self.query_rows or layer_name not in self.layers:
            return
        buf = self._query_bufs.get(layer_name)
        if buf is None:
            shape = (self.query_rows, *query.shape[1:])
            buf = self._query_bufs[layer_name] = torch.empty(shape, dtype=query.dtype, device=query.device)
        buf[:n].copy_(query)

    def _take_buffered_queries(self) -> None:
        """This step's decode queries of decode-evicting requests, out of the persistent buffers."""
        assert self._row_qsl is not None
        rows = [
            (row, req_id)
            for row, req_id in enumerate(self.row_req_ids)
            if req_id in self.decoding and (st := self.requests.get(req_id)) is not None and st.positions
        ]
        if not rows or not self._query_bufs:
            return
        dev = next(iter(self._query_bufs.values())).device
        index = torch.tensor([self._row_qsl[row + 1] - 1 for row, _ in rows], device=dev)
        for name, buf in self._query_bufs.items():
            layer = self.layers[name].index
            picked = buf.index_select(0, index)  # [rows, H, d], a copy: the buffer is rewritten next step
            for i, (_, req_id) in enumerate(rows):
                queries = self.requests[req_id].queries.setdefault(layer, [])
                queries.append((picked[i], self.decoding[req_id] - 1))

    def shared_metadata(self, key: tuple) -> Any:
        return self._metadata.get(key)

    def share_metadata(self, key: tuple, metadata: Any) -> None:
        self._metadata[key] = metadata


@dataclass(frozen=True)
class CompactView:
    """A group's compact block table and lengths; ``shift`` (CPU) is what each row's length lost, and
    ``index`` (on the table's device) the gather that turns any group's table with this view compact."""

    table: torch.Tensor
    seq_lens: torch.Tensor
    shift: torch.Tensor
    index: torch.Tensor


def compact_metadata(cm: Any, view: CompactView) -> Any:
    """``CommonAttentionMetadata`` with a group's compact view, keeping every CPU-side copy consistent.

    ``max_seq_len`` stays the uncompacted maximum: an upper bound is all kernels need, and computing the
    exact one would read the device.
    """
    changes: dict[str, Any] = dict(block_table_tensor=view.table, seq_lens=view.seq_lens)
    cpu = getattr(cm, "_seq_lens_cpu", None)
    if cpu is not None:
        changes["_seq_lens_cpu"] = cpu - view.shift[: cpu.shape[0]].to(cpu.dtype)
    if getattr(cm, "_num_computed_tokens_cpu", None) is not None:
        changes["_num_computed_tokens_cpu"] = None  # derived from seq_lens on demand
    return cm.replace(**changes)


_STATE: WorkerState | None = None


def worker_state() -> WorkerState:
    global _STATE
    if _STATE is None:
        _STATE = WorkerState()
    return _STATE
