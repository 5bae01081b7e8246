"""Per-group KV-cache spec and manager: a full-attention group whose running requests can free blocks.

Every attention layer (or class of layers) gets its own KV-cache group with a :class:`CompressSpec`;
all groups draw from vLLM's one shared block pool. After a request's prompt is compressed, the worker
reports per group the logical blocks it no longer reads; :meth:`CompressManager.release_blocks`
puts them back into the pool at once, and leaves null placeholders so logical block ``i`` still
covers tokens ``[i·bs, (i+1)·bs)`` for everything else the scheduler computes.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_kvmm.vllm_ext import internals
from vllm_kvmm.vllm_ext.prefix import shared_prefixes
from vllm_kvmm.vllm_ext.reuse import compressed_entries

__all__ = ["CompressManager", "CompressSpec", "managers", "register_specs"]


@dataclass(frozen=True, kw_only=True)
class CompressSpec(FullAttentionSpec):
    """A full-attention group under a KV policy. Same page layout as :class:`FullAttentionSpec`.

    ``group_index`` makes the specs of different groups unequal, so vLLM never merges two groups and
    metadata built for one group is never reused for another (see docs/design.md).
    """

    group_index: int = 0

    @classmethod
    def merge(cls, specs: list[Any]) -> CompressSpec:
        base = FullAttentionSpec.merge(specs)
        indices = {s.group_index for s in specs}
        if len(indices) != 1:
            raise ValueError(f"cannot merge KV-cache groups {sorted(indices)} of a compressing policy")
        return cls(**{f: getattr(base, f) for f in base.__dataclass_fields__}, group_index=indices.pop())


# Managers created in this process. vLLM 0.26 hands connectors the block pool but not the managers, so
# the scheduler-side connector finds its own here: those drawing from its pool (one engine, one pool).
_MANAGERS: weakref.WeakSet[CompressManager] = weakref.WeakSet()


def managers(block_pool: Any) -> dict[int, CompressManager]:
    """This engine's managers by KV-cache group id."""
    return {m.kv_cache_group_id: m for m in list(_MANAGERS) if m.block_pool is block_pool}


class CompressManager(FullAttentionManager):
    """:class:`FullAttentionManager` that can return a running request's middle blocks to the pool, and
    that puts only a compressing request's shared prefix into the prefix cache (vllm_ext/prefix.py)."""

    def __init__(self, kv_cache_spec: CompressSpec, **kwargs: Any) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        _MANAGERS.add(self)

    def add_local_computed_blocks(
        self,
        request_id: str,
        new_computed_blocks: Sequence[Any],
        num_local_computed_tokens: int,
        num_external_computed_tokens: int,
    ) -> None:
        """vLLM's, with the hit trimmed to the agreed length: 0.26's hybrid coordinator trims only its
        first full-attention group's hit blocks, and a longer list would make this group write the next
        tokens into a cached block other requests read. Our hits are whole blocks."""
        hit = new_computed_blocks[: num_local_computed_tokens // self.block_size]
        super().add_local_computed_blocks(
            request_id, hit, num_local_computed_tokens, num_external_computed_tokens
        )

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: Sequence[Any],
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
    ) -> int:
        """vLLM's count, except that a compressed entry the connector matched (reuse.py) supplies the
        blocks of its tokens: only those of its blocks that leave the free queue are counted, not a fresh
        block for each (an entry holds a fraction of its length; a follow-up must fit as it will)."""
        n = super().get_num_blocks_to_allocate(
            request_id,
            num_tokens,
            new_computed_blocks,
            total_computed_tokens,
            num_local_computed_tokens,
            num_tokens_main_model,
            apply_admission_cap,
        )
        entries = compressed_entries(self.block_pool)
        match = entries.pending.get(request_id)
        if match is None:  # pending only while a waiting request is being admitted
            return n
        # vLLM counted blocks [hit, match.blocks) as fresh ones.
        start = len(new_computed_blocks)
        return n - (match.blocks - start) + (entries.blocks_taken(self, request_id, start) or 0)

    def allocate_external_computed_blocks(
        self, request_id: str, num_local_computed_tokens: int, num_external_computed_tokens: int
    ) -> None:
        """vLLM's fresh blocks for the connector's tokens, unless they are a compressed entry the connector
        matched (vllm_ext/reuse.py): then the entry's own blocks (and nulls), already holding that KV.
        Adopted blocks count as cached: they are never hashed again."""
        row = internals.req_blocks(self, request_id)
        if compressed_entries(self.block_pool).adopt(self, request_id, row):
            internals.set_num_cached_blocks(self, request_id, len(row))
            return
        super().allocate_external_computed_blocks(
            request_id, num_local_computed_tokens, num_external_computed_tokens
        )

    def cache_blocks(self, request: Any, num_tokens: int, retention_interval: int | None = None) -> None:
        """vLLM's, up to the request's shared prefix when it compresses: compaction rewrites the blocks
        after it, so they must never be found by a hash."""
        cached = internals.num_cached_blocks(self, request.request_id) * self.block_size
        limit = shared_prefixes(self.block_pool).protected(request, cached)
        if limit is not None:
            num_tokens = min(num_tokens, limit)
        super().cache_blocks(request, num_tokens, retention_interval=retention_interval)

    def release_blocks(self, request_id: str, logical: tuple[int, ...] | list[int]) -> int:
        """Free the given logical blocks of ``request_id``; returns how many were freed.

        Blocks already null (an earlier release) are skipped, so repeated or overlapping calls are safe —
        unlike ``_remove_blocks_in_range``, which stops at the first null block.
        """
        blocks = internals.req_blocks(self, request_id)
        if not blocks:
            return 0
        null = internals.null_block(self)
        freed = []
        for i in sorted(set(logical), reverse=True):
            if i < len(blocks) and blocks[i] is not null:
                freed.append(blocks[i])
                blocks[i] = null
        if freed:
            self.block_pool.free_blocks(freed)
        return len(freed)

    def num_held_blocks(self, request_id: str) -> int:
        """Real (non-null) blocks the request holds in this group."""
        null = internals.null_block(self)
        return sum(b is not null for b in internals.req_blocks(self, request_id))


def register_specs() -> None:
    """Register :class:`CompressSpec` → :class:`CompressManager` (call after vLLM's built-ins)."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry.register(CompressSpec, CompressManager, uniform_type_base_spec=FullAttentionSpec)
