"""FlashAttention with the same two additions as the CPU backend (statistics, compact view).

Registered over ``FLASH_ATTN``. Under a policy the connector asks vLLM for piecewise CUDA graphs, so
attention (whose per-request tables change after compression) runs outside the captured graphs while
everything else stays captured.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from vllm_kvmm.vllm_ext.paged_kv import FlashPagedKV
from vllm_kvmm.vllm_ext.spec import CompressSpec
from vllm_kvmm.vllm_ext.worker import compact_metadata, worker_state

__all__ = ["KVMMFlashBackend"]


class KVMMFlashBuilder(FlashAttentionMetadataBuilder):
    supports_update_block_table = False  # each group's view differs: never copy another group's metadata

    def __init__(
        self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.group = kv_cache_spec.group_index if isinstance(kv_cache_spec, CompressSpec) else None
        state = worker_state()
        if self.group is not None and state.paged is None:
            state.paged = FlashPagedKV(kv_cache_spec.block_size, kv_cache_spec.head_size)

    def build(self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False) -> Any:
        cm = common_attn_metadata
        if self.group is not None:
            view = worker_state().compact_view(self.group, cm.block_table_tensor, cm.seq_lens)
            if view is not None:
                cm = compact_metadata(cm, view)
        return super().build(common_prefix_len, cm, fast_build)


class KVMMFlashImpl(FlashAttentionImpl):
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
        out = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
        )
        if attn_metadata is not None and worker_state().jobs:
            worker_state().observe(
                layer.layer_name,
                query[: attn_metadata.num_actual_tokens],
                kv_cache,
                attn_metadata,
                self.num_heads,
                self.scale,
            )
        return out


class KVMMFlashBackend(FlashAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[KVMMFlashImpl]:
        return KVMMFlashImpl

    @staticmethod
    def get_builder_cls() -> type[KVMMFlashBuilder]:
        return KVMMFlashBuilder
