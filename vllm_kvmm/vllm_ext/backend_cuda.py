"""FlashAttention with the same two additions as the CPU backend (statistics, compact view).

Registered over ``FLASH_ATTN``. Works under FULL CUDA graphs: a compressing group hands the kernel its
compact view in persistent buffers (``CompactViewBuilder._persist``), and steps whose attention feeds
statistics are dispatched to piecewise graphs (``patches.py``, patch 5).
"""

from __future__ import annotations

from typing import Any

from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from vllm_kvmm.vllm_ext.backend_common import CompactViewBuilder, StatsObservingImpl
from vllm_kvmm.vllm_ext.paged_kv import FlashPagedKV

__all__ = ["KVMMFlashBackend"]


class KVMMFlashBuilder(CompactViewBuilder, FlashAttentionMetadataBuilder):
    def make_paged_kv(self, kv_cache_spec: Any) -> FlashPagedKV:
        return FlashPagedKV(kv_cache_spec.block_size, kv_cache_spec.head_size)


class KVMMFlashImpl(StatsObservingImpl, FlashAttentionImpl):
    pass


class KVMMFlashBackend(FlashAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[KVMMFlashImpl]:
        return KVMMFlashImpl

    @staticmethod
    def get_builder_cls() -> type[KVMMFlashBuilder]:
        return KVMMFlashBuilder
