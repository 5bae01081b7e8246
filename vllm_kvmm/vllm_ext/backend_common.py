"""What every attention backend of ours adds to its stock class: the compact view and the statistics.

Mixed in front of the stock builder / implementation (``class X(CompactViewBuilder, StockBuilder)``), so
the stock class does all the work and these two hooks only swap inputs or watch outputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vllm_kvmm.vllm_ext.spec import CompressSpec
from vllm_kvmm.vllm_ext.worker import compact_metadata, worker_state

__all__ = ["CompactViewBuilder", "StatsObservingImpl"]


class CompactViewBuilder:
    """Gives the stock kernel, per compressed request, ``row[0:keep] ++ row[tail:]`` and its length.

    Subclasses set up ``worker_state().paged`` (their cache layout) in ``make_paged_kv``.
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
        state = worker_state()
        if self.group is not None and state.paged is None:
            state.paged = self.make_paged_kv(kv_cache_spec)

    def make_paged_kv(self, kv_cache_spec: Any) -> Any:
        raise NotImplementedError

    def build(self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False) -> Any:
        cm = common_attn_metadata
        if self.group is None:
            return super().build(common_prefix_len, cm, fast_build)  # type: ignore[misc]
        state = worker_state()
        signature = state.view_signature(self.group)
        # Groups whose rows are compacted alike need the same metadata but their own block ids: build it
        # once per step and swap the table in (vLLM does the same across groups of one spec).
        key = (type(self), common_prefix_len, signature)
        shared = state.shared_metadata(key)
        if shared is not None:
            metadata, index = shared
            table = cm.block_table_tensor if index is None else torch.gather(cm.block_table_tensor, 1, index)
            return dataclasses.replace(metadata, block_table=table, slot_mapping=cm.slot_mapping)
        index = None
        if signature:
            view = state.compact_view(signature, cm.block_table_tensor, cm.seq_lens)
            cm, index = compact_metadata(cm, view), view.index
        metadata = super().build(common_prefix_len, cm, fast_build)  # type: ignore[misc]
        state.share_metadata(key, (metadata, index))
        return metadata


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
        if attn_metadata is not None and (state.jobs or state.decoding):
            state.observe(
                layer.layer_name,
                query[: attn_metadata.num_actual_tokens],
                kv_cache,
                attn_metadata,
                self.num_heads,
                self.scale,
            )
        return out
