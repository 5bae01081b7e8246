"""The CPU attention backend with two additions: statistics of compressing prefills, and the compact view.

Registered over ``CPU_ATTN`` through vLLM's backend registry. For layers outside a compressing KV-cache
group, and for every request that was not compressed, it is the stock backend: same kernel, same
metadata, same numbers.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from vllm_kvmm.vllm_ext.backend_common import CompactViewBuilder, StatsObservingImpl
from vllm_kvmm.vllm_ext.paged_kv import CpuPagedKV

__all__ = ["KVMMCpuBackend"]


class KVMMCpuBuilder(CompactViewBuilder, CPUAttentionMetadataBuilder):
    def make_paged_kv(self, kv_cache_spec: Any) -> CpuPagedKV:
        return CpuPagedKV(self.dtype, self.block_size, self.head_dim, self.isa)


class KVMMCpuImpl(StatsObservingImpl, CPUAttentionBackendImpl):
    pass


class KVMMCpuBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[KVMMCpuImpl]:
        return KVMMCpuImpl

    @staticmethod
    def get_builder_cls() -> type[KVMMCpuBuilder]:
        return KVMMCpuBuilder
