"""The CPU attention backend with two additions: statistics of compressing prefills, and the compact view.

Registered over ``CPU_ATTN`` through vLLM's backend registry. For layers outside a compressing KV-cache
group, and for every request that was not compressed, it is the stock backend: same kernel, same
metadata, same numbers.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from vllm_kvmm.vllm_ext.paged_kv import CpuPagedKV
from vllm_kvmm.vllm_ext.spec import CompressSpec
from vllm_kvmm.vllm_ext.worker import compact_metadata, worker_state

__all__ = ["KVMMCpuBackend"]


class KVMMCpuBuilder(CPUAttentionMetadataBuilder):
    """Gives the stock kernel, per compressed request, ``row[0:keep] ++ row[tail:]`` and its length."""

    supports_update_block_table = False  # each group's view differs; never reuse another group's

    def __init__(
        self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.group = kv_cache_spec.group_index if isinstance(kv_cache_spec, CompressSpec) else None
        state = worker_state()
        if self.group is not None and state.paged is None:
            state.paged = CpuPagedKV(self.dtype, self.block_size, self.head_dim, self.isa)

    def build(self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False) -> Any:
        cm = common_attn_metadata
        if self.group is not None:
            view = worker_state().compact_view(self.group, cm.block_table_tensor, cm.seq_lens)
            if view is not None:
                cm = compact_metadata(cm, view)
        return super().build(common_prefix_len, cm, fast_build)


class KVMMCpuImpl(CPUAttentionBackendImpl):
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
        if attn_metadata is not None:
            worker_state().observe(
                layer.layer_name,
                query[: attn_metadata.num_actual_tokens],
                kv_cache,
                attn_metadata,
                self.num_heads,
                self.scale,
            )
        return out


class KVMMCpuBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[KVMMCpuImpl]:
        return KVMMCpuImpl

    @staticmethod
    def get_builder_cls() -> type[KVMMCpuBuilder]:
        return KVMMCpuBuilder
