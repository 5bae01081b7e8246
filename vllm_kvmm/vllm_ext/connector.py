"""The KV connector that drives compression inside continuous batching.

Scheduler side (engine-core process): decides each step which requests are prefilling under a
compressing policy and which finish their prompt (``build_connector_meta``), and frees the blocks the
worker reports as no longer read (``update_connector_output``), before the next ``schedule()``.

Worker side: hands the step's jobs to :class:`~vllm_kvmm.vllm_ext.worker.WorkerState` before the
forward pass, notes the prefills that finished in it (``wait_for_save`` runs as the forward context exits)
and compresses them at the start of the next step (``handle_preemptions``, off the first token's path),
then reports the freed ranges (``build_connector_worker_meta``). The scheduler takes that report before
it finishes the step's requests (patches.py, patch 6), so a request that ends in the step that
compressed it reports what it kept.

It moves no KV anywhere (``kv_role="kv_producer"``). Its one use of vLLM's "external tokens" is compressed
reuse (vllm_ext/reuse.py): ``get_num_new_matched_tokens`` reports the tokens a follow-up takes from a
compressed entry already in the pool, which the KV-cache managers then place without a copy.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.logger import init_logger

from vllm_kvmm.config import (
    FULL,
    SHARED_IMAGES,
    PolicyError,
    ResolvedPolicy,
    resolve_request,
    reuse_arg,
    shared_prefix_arg,
)
from vllm_kvmm.policies import BUDGET_TOLERANCE
from vllm_kvmm.vllm_ext import internals
from vllm_kvmm.vllm_ext.grouping import layer_index
from vllm_kvmm.vllm_ext.messages import Adoption, FlushJob, KVMMStepMeta, KVMMWorkerMeta, PrefillJob
from vllm_kvmm.vllm_ext.metrics import KVMMPromMetrics, KVMMStats
from vllm_kvmm.vllm_ext.prefix import shared_prefixes
from vllm_kvmm.vllm_ext.reuse import compressed_entries
from vllm_kvmm.vllm_ext.settings import settings_from_vllm_config
from vllm_kvmm.vllm_ext.spec import CompressSpec, managers
from vllm_kvmm.vllm_ext.worker import EngineLayout, LayerRef, worker_state

logger = init_logger(__name__)

__all__ = ["KVMMConnector"]


class KVMMConnector(KVConnectorBase_V1, SupportsHMA):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        settings = settings_from_vllm_config(vllm_config)
        if settings is None:
            raise ValueError("KVMMConnector needs additional_config['kv_policy'] (use --kv-policy)")
        self.settings = settings
        # Under pipeline parallelism a request may only name a policy each stage can plan alone.
        pp = vllm_config.parallel_config.pipeline_parallel_size
        self._rules = replace(settings.rules, layer_local_only=pp > 1)
        self.block_size = vllm_config.cache_config.block_size
        # scheduler side
        self._requests: dict[str, Any] = {}
        self._block_pool: Any = None
        self._policies: dict[str, ResolvedPolicy] = {}
        # What compression did to each request, returned with its output (``kv_transfer_params``).
        self._reports: dict[str, dict[str, Any]] = {}
        self._stats = KVMMStats()
        # Compressed reuse (vllm_ext/reuse.py) needs every KV-cache group to be ours.
        self._num_groups = len(kv_cache_config.kv_cache_groups) if kv_cache_config is not None else 0
        if role == KVConnectorRole.WORKER and kv_cache_config is not None:
            # The compressed layers only (sliding-window groups are vLLM's), numbered 0..L-1 in decoder
            # order: the policy's layer index, whatever decoder layers lie between them.
            ours = [
                (name, gid)
                for gid, group in enumerate(kv_cache_config.kv_cache_groups)
                if isinstance(group.kv_cache_spec, CompressSpec)
                for name in group.layer_names
            ]
            ours.sort(key=lambda x: layer_index(x[0]))
            groups = kv_cache_config.kv_cache_groups
            spec = groups[ours[0][1]].kv_cache_spec
            model_layers, stage = 0, 0
            if vllm_config.parallel_config.pipeline_parallel_size > 1:
                # vLLM hands each stage every group, those of other stages' layers empty; with one layer
                # per group (enforced at start-up) a layer's index is its group's.
                from vllm.distributed import get_pp_group

                layers = {name: LayerRef(groups[gid].kv_cache_spec.group_index, gid) for name, gid in ours}
                model_layers = sum(isinstance(g.kv_cache_spec, CompressSpec) for g in groups)
                stage = get_pp_group().rank_in_group
            else:
                layers = {name: LayerRef(i, gid) for i, (name, gid) in enumerate(ours)}
            tp = vllm_config.parallel_config.tensor_parallel_size
            all_reduce = None
            if tp > 1:
                total_kv = vllm_config.model_config.get_total_num_kv_heads()
                if total_kv % tp:
                    raise ValueError(
                        f"vllm-kvmm: tensor parallelism needs the {total_kv} KV heads to split evenly over "
                        f"{tp} ranks (replicated KV heads would be compressed differently on each rank)"
                    )
                from vllm.distributed import tensor_model_parallel_all_reduce

                all_reduce = tensor_model_parallel_all_reduce
            # Decode-sized steps (every CUDA-graph capture size included) keep their queries in buffers.
            rows = max(vllm_config.scheduler_config.max_num_seqs, internals.capture_size(vllm_config))
            engine = EngineLayout(
                layers,
                spec.block_size,
                spec.num_kv_heads,
                tp,
                all_reduce,
                model_layers=model_layers,
                stage=stage,
            )
            worker_state().configure(engine, query_rows=rows)

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        # Full CUDA graphs are safe: compact views are written into persistent per-group buffers (see
        # CompactViewBuilder), and steps that must watch queries in attention run without full graphs.
        return False

    # ---- scheduler side ------------------------------------------------------------------------
    def bind_gpu_block_pool(self, gpu_block_pool: Any) -> None:
        self._block_pool = gpu_block_pool

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens past the local prefix-cache hit that a compressed entry holds for this follow-up (see
        vllm_ext/reuse.py); vLLM counts them computed, and our managers place the entry's blocks."""
        entries = compressed_entries(self._block_pool)
        entries.pending.pop(request.request_id, None)
        prefixes = shared_prefixes(self._block_pool)
        # An earlier attempt that could not allocate blocks fixed nothing for good.
        prefixes.unfix(request.request_id)
        pol = self._policies.get(request.request_id)
        if pol is None or not self._reusable(pol) or not entries.wants(request.request_id):
            return 0, False
        match = entries.find(request, pol, num_computed_tokens, managers(self._block_pool))
        if match is None:
            return 0, False
        entries.pending[request.request_id] = match
        # The follow-up's exact prefix is the entry's: blocks after it hold KV computed over a compressed
        # cache and must never get a token hash, whatever the follow-up marks.
        prefixes.fix(request, match.entry.shared, num_computed_tokens)
        return match.blocks * self.block_size - num_computed_tokens, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        match = compressed_entries(self._block_pool).placed(request, num_external_tokens)
        if match is not None:
            self._stats.add("reused_tokens", match.blocks * self.block_size)

    def _reusable(self, pol: ResolvedPolicy) -> bool:
        """Whether requests under ``pol`` can leave or take compressed entries on this engine: prefix
        caching on, every KV-cache group ours (a sliding-window group would get fresh, empty blocks for
        the taken tokens), and a policy that never rewrites its cache while decoding (an entry is the row
        its prefill compression left)."""
        return (
            pol.compresses
            and pol.decode_interval is None
            and internals.prefix_caching(self._block_pool)
            and len(managers(self._block_pool)) == self._num_groups
        )

    def on_new_request(self, request: Any) -> None:
        self._requests[request.request_id] = request
        extra = request.sampling_params.extra_args if request.sampling_params is not None else None
        if request.resumable:
            # Streaming-input sessions grow their prompt under the same id after a first prefill; a
            # compressed prefix cannot take more prompt tokens behind it. Served uncompressed.
            self._policies[request.request_id] = FULL
            return
        mark: int | str = 0
        try:
            # Resolved once, here: the worker builds its policy from this, and the decode cadence the
            # scheduler schedules flushes by is the one the worker's policy has.
            pol = resolve_request(extra, self.settings, request.num_prompt_tokens, self._rules)
            mark = shared_prefix_arg(extra)
        except PolicyError as e:
            # The API layer rejects bad or refused values with HTTP 400 first; if one still gets here
            # (offline use with hand-built SamplingParams), serve the request under the engine's own
            # policy — never uncompressed, which would bypass the operator's memory plan.
            logger.error("kvmm: request %s: %s; serving it with the engine's policy", request.request_id, e)
            pol = resolve_request(None, self.settings, request.num_prompt_tokens)
        self._policies[request.request_id] = pol
        if pol.compresses:
            compressed_entries(self._block_pool).admit(
                request.request_id, reuse_arg(extra, self.settings.reuse)
            )
            if mark == SHARED_IMAGES:
                mark = max((off + n for off, n in _vision_runs(request)), default=0)
            n = min(int(mark), request.num_prompt_tokens)
            shared_prefixes(self._block_pool).admit(request.request_id, n - n % self.block_size)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = KVMMStepMeta()
        meta.dropped = set(scheduler_output.finished_req_ids or ())
        meta.dropped |= set(scheduler_output.preempted_req_ids or ())
        prefixes = shared_prefixes(self._block_pool)
        entries = compressed_entries(self._block_pool)
        for req_id, n_sched in scheduler_output.num_scheduled_tokens.items():
            req = self._requests.get(req_id)
            pol = self._policies.get(req_id)
            if req is None or pol is None or not pol.compresses:
                continue
            match, first = entries.adoption(req)
            if match is not None:
                # Started from a compressed entry: the worker takes the entry's layout in the epoch's first
                # step and the request is never compressed again (its policy does not flush).
                if first:
                    layout = match.entry.layout
                    meta.adopted[req_id] = Adoption(
                        req_id, pol, req.num_prompt_tokens, layout, req.num_preemptions
                    )
                continue
            n_prompt = req.num_prompt_tokens
            before = req.num_computed_tokens  # not yet advanced for this step (see docs/design.md)
            end = before + n_sched
            interval = pol.decode_interval
            if before >= n_prompt:  # decoding
                if interval is not None:
                    meta.decoding[req_id] = end
                    if (end - n_prompt) % interval == 0:
                        meta.flushes[req_id] = FlushJob(
                            req_id, end, self._block_ids(req_id), req.num_preemptions
                        )
                continue
            num_new = min(n_sched, n_prompt - before)
            completes = end >= n_prompt
            block_ids = self._block_ids(req_id) if completes else None
            # Fixed at the epoch's first scheduling (by the KV-cache managers first when prefix caching
            # is on: they cache this prefix only); ``before`` is then the prefix-cache hit.
            shared = prefixes.protected(req, before) or 0
            meta.jobs[req_id] = PrefillJob(
                req_id=req_id,
                num_prompt_tokens=n_prompt,
                q_start=before,
                num_new=num_new,
                policy=pol,
                vision=_vision_runs(req),
                completes=completes,
                block_ids=block_ids,
                epoch=req.num_preemptions,
                end=end,
                cached=prefixes.cached(req_id),
                shared=shared,
            )
        return meta

    def _block_ids(self, req_id: str) -> list[list[int]]:
        """The request's logical block row in every group (null blocks included, by position)."""
        return [
            [b.block_id for b in internals.req_blocks(m, req_id)]
            for _, m in sorted(managers(self._block_pool).items())
        ]

    def update_connector_output(self, connector_output: Any) -> None:
        # Called twice a step: early by patch 6 (before finished requests are freed), then by vLLM.
        meta = connector_output.kv_connector_worker_meta
        if not isinstance(meta, KVMMWorkerMeta) or meta.applied:
            return
        meta.applied = True
        mgrs = managers(self._block_pool)
        entries = compressed_entries(self._block_pool)
        st = self._stats
        for req_id, groups in meta.flushed.items():
            if self._release(meta, req_id, groups, mgrs):
                st.add("decode_flushes", 1)
        for req_id, groups in meta.compressed.items():
            if not self._release(meta, req_id, groups, mgrs):
                continue
            req = self._requests[req_id]
            n = meta.prompt_tokens.get(req_id, 0)
            epoch = meta.epochs.get(req_id, req.num_preemptions)
            entries.reported(req_id, epoch, {g.group: (g.keep, g.tail) for g in groups})
            st.add("compressed_requests", 1)
            st.add("prompt_tokens", n)
            st.add("kv_tokens_full", n * meta.num_layers)
            kept = meta.kept_token_layers.get(req_id, 0)
            st.add("kv_tokens_kept", kept)
            self._reports[req_id] = {"prompt_tokens": n, "kv_kept": kept / max(1, n * meta.num_layers)}
        for req_id, epoch in meta.settled.items():
            req = self._requests.get(req_id)
            if req is not None and req.num_preemptions == epoch:
                entries.reported(req_id, epoch, {})  # its layout is final (groups compressed, if any, above)
        for req_id, why in meta.failed.items():
            req, pol = self._requests.get(req_id), self._policies.get(req_id)
            if req is None or pol is None or req.num_preemptions != meta.epochs.get(req_id, -1):
                continue
            # The worker contained a failure: no more flushes for this request (it has no decode state),
            # and its output says what failed.
            st.add("failed_compressions", 1)
            self._policies[req_id] = replace(pol, decode_interval=None)
            self._reports.setdefault(req_id, {})["error"] = why
        st.add("compression_seconds", meta.seconds)
        st.observe("compression_durations", meta.durations)

    def _release(self, meta: KVMMWorkerMeta, req_id: str, groups: list[Any], mgrs: dict[int, Any]) -> bool:
        """Free the blocks ``groups`` no longer read; ``False`` (nothing freed) when the report is stale."""
        req = self._requests.get(req_id)
        if req is None:
            return False  # finished in the meantime: its blocks are already free
        if req.num_preemptions != meta.epochs.get(req_id, req.num_preemptions):
            return False  # preempted since (async scheduling): these ranges belong to freed blocks
        for g in groups:
            self._stats.add("blocks_freed", mgrs[g.group].release_blocks(req_id, g.freed))
        return True

    def get_kv_connector_stats(self) -> KVMMStats | None:
        if self.role != KVConnectorRole.SCHEDULER or self._stats.is_empty():
            return None
        out, self._stats = self._stats, KVMMStats()
        return out

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVMMStats:
        return KVMMStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls, vllm_config: Any, metric_types: Any, labelnames: list[str], per_engine_labelvalues: Any
    ) -> KVMMPromMetrics:
        return KVMMPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict | None]:
        return False, self._forget(request)

    def request_finished_all_groups(
        self, request: Any, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict | None]:
        return False, self._forget(request)

    def _end_reuse(self, request: Any) -> Any:
        """Leave the finished ``request``'s compressed row as an entry follow-ups can reuse (reuse.py),
        before vLLM frees its blocks, unless a contained failure may have left it half done; returns the
        entry it had started from (for its report)."""
        req_id = request.request_id
        pol = self._policies.get(req_id)
        ok = pol is not None and self._reusable(pol) and "error" not in self._reports.get(req_id, {})
        shared = shared_prefixes(self._block_pool).shared(req_id)
        mgrs = managers(self._block_pool)
        return compressed_entries(self._block_pool).finish(request, pol if ok else None, shared, mgrs)

    def _forget(self, request: Any) -> dict[str, Any] | None:
        """Drop a request's state; returns its report for the output's ``kv_transfer_params``.

        ``{"kvmm": {"policy", "budget", "compressed", "shared_prefix"?, "kv_kept"?, "budget_met"?}}``: the
        effective policy and budget, the prompt tokens kept exact as a shared prefix (when any), and for a
        compressed prompt the measured fraction of its KV kept (tokens × layers) and whether that is within
        ``BUDGET_TOLERANCE`` of the budget, applied to the prompt after the shared prefix when there is one
        (``false``: what the policy always keeps, sinks, recent window, whole blocks, exceeds the budget on
        this prompt; short prompts). A request that ends with its first token was never compressed (the
        worker compresses in the step after the prefill) and says ``compressed: false``.
        """
        req_id = request.request_id
        adopted = self._end_reuse(request)
        self._requests.pop(req_id, None)
        prefixes = shared_prefixes(self._block_pool)
        shared = prefixes.shared(req_id)
        prefixes.forget(req_id)
        if shared:
            self._stats.add("shared_prefix_tokens", shared)
        pol = self._policies.pop(req_id, None)
        report = self._reports.pop(req_id, None)
        if pol is None:
            return None
        report = report or {}
        said = {"policy": pol.name, "budget": pol.budget, "compressed": "kv_kept" in report}
        if shared:
            said["shared_prefix"] = shared
        if adopted is not None:
            said["reused"] = adopted.blocks * self.block_size
        if "kv_kept" in report:
            # With a shared prefix the budget applies to the rest of the prompt (plan_compression).
            n = report["prompt_tokens"]
            target = (shared + pol.budget * (n - shared)) / n if shared else pol.budget
            report["budget_met"] = report["kv_kept"] <= (1 + BUDGET_TOLERANCE) * target
        return {"kvmm": {**said, **report}}

    # ---- worker side ---------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        worker_state().register_kv_caches(kv_caches)

    def shutdown(self) -> None:
        # The worker's shutdown: let go of this engine's caches and requests (the state outlives it).
        if self.role == KVConnectorRole.WORKER:
            worker_state().reset()
        super().shutdown()

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        # The first worker hook of a step, called before the runner picks its CUDA-graph mode.
        if isinstance(kv_connector_metadata, KVMMStepMeta):
            state = worker_state()
            state.drop(kv_connector_metadata.dropped)
            state.adopt(kv_connector_metadata.adopted)
            # Last step's finished prefills, before this step's attention metadata reads their compact
            # view (and after the drop: a finished request's blocks may already be another's).
            state.compress_pending()
            # Prefill statistics are gathered in Python during attention; decode queries are not (see
            # WorkerState.record_queries), so decode-evicting steps may replay full graphs.
            state.eager_attention = bool(kv_connector_metadata.jobs)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, KVMMStepMeta)
        worker_state().begin_step(connector_metadata)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        worker_state().after_forward()

    def build_connector_worker_meta(self) -> KVMMWorkerMeta | None:
        return worker_state().take_output()


def _vision_runs(request: Any) -> list[tuple[int, int]]:
    """``(offset, length)`` runs of embedded multimodal tokens, from the request's placeholder ranges."""
    runs: list[tuple[int, int]] = []
    for f in request.mm_features:
        pos = f.mm_position
        if pos.is_embed is None:
            runs.append((pos.offset, pos.length))
            continue
        mask = pos.is_embed.tolist()
        start = None
        for i, m in enumerate([*mask, False]):
            if m and start is None:
                start = i
            elif not m and start is not None:
                runs.append((pos.offset + start, i - start))
                start = None
    return runs
