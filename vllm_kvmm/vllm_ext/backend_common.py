"""What every attention backend of ours adds to its stock class: the compact view and the statistics.

Mixed in front of the stock builder / implementation (``class X(CompactViewBuilder, StockBuilder)``), so
the stock class does all the work and these two hooks only swap inputs or watch outputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vllm_kvmm.vllm_ext import internals
from vllm_kvmm.vllm_ext.spec import CompressSpec
from vllm_kvmm.vllm_ext.worker import compact_metadata, compact_view, observe, view_signature, worker_state

__all__ = ["CompactViewBuilder", "StatsObservingImpl"]


class CompactViewBuilder:
    """Gives the stock kernel, per compressed request, ``row[0:keep] ++ row[tail:]`` and its length.

    Subclasses set up ``worker_state().engine.paged`` (their cache layout) in ``make_paged_kv``.
    """

    def __init__(
        self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)  # type: ignore[call-arg]
        self.group = kv_cache_spec.group_index if isinstance(kv_cache_spec, CompressSpec) else None
        if self.group is not None:
            # Each compressing group's view differs: never reuse another group's metadata (vanilla groups
            # keep the stock behaviour).
            self.supports_update_block_table = False
        engine = worker_state().engine
        if self.group is not None and engine.paged is None:
            engine.paged = self.make_paged_kv(kv_cache_spec)
        # Full CUDA graphs replay the addresses captured at warm-up: a compressing group then hands the
        # kernel its view in buffers of its own that never move (allocated at the first build, which
        # precedes capture), refilled every step.
        self.persistent = self.group is not None and internals.uses_full_cuda_graph(self)
        self._rows = max(vllm_config.scheduler_config.max_num_seqs, internals.capture_size(vllm_config))
        self._table: torch.Tensor | None = None
        self._seq_lens: torch.Tensor | None = None

    def make_paged_kv(self, kv_cache_spec: Any) -> Any:
        raise NotImplementedError

    def build(self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False) -> Any:
        cm = common_attn_metadata
        if self.group is None:
            return super().build(common_prefix_len, cm, fast_build)  # type: ignore[misc]
        state = worker_state()
        state.note_rows(cm.query_start_loc_cpu, internals.seq_lens_cpu(cm))
        signature = view_signature(state, self.group)
        # Groups whose rows are compacted alike need the same metadata but their own block ids: build it
        # once per step and swap the table in (vLLM does the same across groups of one spec).
        key = (type(self), common_prefix_len, signature)
        shared = state.rows.metadata.get(key)
        if shared is not None:
            metadata, index = shared
            table = cm.block_table_tensor if index is None else torch.gather(cm.block_table_tensor, 1, index)
            metadata = dataclasses.replace(metadata, block_table=table, slot_mapping=cm.slot_mapping)
            return self._persist(metadata) if self.persistent else metadata
        index = None
        if signature:
            view = compact_view(signature, cm.block_table_tensor, cm.seq_lens, state.engine.block_size)
            cm, index = compact_metadata(cm, view), view.index
        metadata = super().build(common_prefix_len, cm, fast_build)  # type: ignore[misc]
        state.rows.metadata[key] = (metadata, index)
        return self._persist(metadata) if self.persistent else metadata

    def _persist(self, metadata: Any) -> Any:
        """``metadata`` with its table, lengths and FlashAttention schedule in this group's own buffers."""
        table, lens = metadata.block_table, metadata.seq_lens
        n, width = table.shape
        if self._table is None:
            self._table = torch.zeros(self._rows, width, dtype=table.dtype, device=table.device)
            self._seq_lens = torch.zeros(self._rows, dtype=lens.dtype, device=lens.device)
        assert self._seq_lens is not None
        if n > self._rows or width > self._table.shape[1]:
            raise RuntimeError(f"vllm-kvmm: a {n}×{width} block table outgrew the persistent buffers")
        self._table[:n, :width].copy_(table, non_blocking=True)
        self._seq_lens[: lens.shape[0]].copy_(lens, non_blocking=True)
        changes: dict[str, Any] = dict(
            block_table=self._table[:n, :width], seq_lens=self._seq_lens[: lens.shape[0]]
        )
        schedule = internals.metadata_schedule(metadata)
        own = internals.builder_schedule(self)
        if schedule is not None and own is not None and schedule.data_ptr() != own.data_ptr():
            # Built by another group's builder (shared metadata): copy its schedule into ours.
            k = schedule.shape[0]
            own[:k].copy_(schedule, non_blocking=True)
            own[k:] = 0
            changes["scheduler_metadata"] = own[:k]
        return dataclasses.replace(metadata, **changes)


class StatsObservingImpl:
    """After the stock forward (which has written this step's keys), feed compressing prefills' queries."""

    num_heads: int
    scale: float

    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        key: Any,
        value: Any,
        kv_cache: torch.Tensor,
        attn_metadata: Any,
        output: torch.Tensor,
        output_scale: Any = None,
        output_block_scale: Any = None,
    ) -> torch.Tensor:
        out = super().forward(  # type: ignore[misc]
            layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
        )
        state = worker_state()
        if attn_metadata is None or layer.layer_name not in state.engine.layers:
            return out
        # The copy is needed only by decode-evicting requests' flushes, and in every CUDA-graph capture (a
        # replayed graph repeats it whatever the step holds).
        if state.decoding or (query.is_cuda and torch.cuda.is_current_stream_capturing()):
            state.queries.record(layer.layer_name, query)
        state.queries.scales[layer.layer_name] = self.scale  # for decode-time scores at a flush
        # Decode rows need Python here only in steps too large for the persistent buffers; a decode-only
        # step of a large batch would otherwise walk every row in every layer to do nothing.
        if state.jobs or (state.decoding and not state.queries.buffered):
            # A named range in profiles (bench profile-decode).
            with torch.profiler.record_function("kvmm.statistics"):
                n = attn_metadata.num_actual_tokens
                observe(
                    state,
                    layer.layer_name,
                    query[:n],
                    None if key is None else key[:n].view(n, -1, query.shape[-1]),
                    kv_cache,
                    attn_metadata,
                    self.num_heads,
                    self.scale,
                )
        return out
