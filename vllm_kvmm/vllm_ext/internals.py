"""Every read of a vLLM internal outside our patches, in one place, and the contract that checks them.

vLLM has no public API for what these functions read. Each one names its target in :data:`READS`;
:func:`check_reads` (run at start-up by ``patches.check_vllm_internals`` and by
``tests/vllm/test_patches.py``) verifies that every target still exists on vLLM 0.26.0's classes, so an
upgrade that renames one refuses to start with the attribute's name instead of degrading silently.
No function here falls back to a default when an attribute is missing.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "READS",
    "block_hashes",
    "block_key",
    "builder_schedule",
    "cache_block",
    "cached_block",
    "capture_size",
    "check_reads",
    "has_cli_flag",
    "metadata_schedule",
    "null_block",
    "num_cached_blocks",
    "prefix_caching",
    "replace_common_metadata",
    "req_blocks",
    "seq_lens_cpu",
    "set_num_cached_blocks",
    "step_req_ids",
    "uses_full_cuda_graph",
]


# Where each class we read from lives.
_OWNERS: dict[str, str] = {
    "CommonAttentionMetadata": "vllm.v1.attention.backend",
    "FlashAttentionMetadataBuilder": "vllm.v1.attention.backends.flash_attn",
    "FlashAttentionMetadata": "vllm.v1.attention.backends.flash_attn",
    "CompilationConfig": "vllm.config",
    "GPUModelRunner": "vllm.v1.worker.gpu_model_runner",
    "InputBatch": "vllm.v1.worker.gpu_input_batch",
    "SingleTypeKVCacheManager": "vllm.v1.core.single_type_kv_cache_manager",
    "BlockPool": "vllm.v1.core.block_pool",
    "Request": "vllm.v1.request",
    "KVConnectorOutput": "vllm.v1.outputs",
    "ModelRunnerOutput": "vllm.v1.outputs",
    "Scheduler": "vllm.v1.core.sched.scheduler",
    "EngineArgs": "vllm.engine.arg_utils",
    "ArgumentParser": "argparse",
}

# The private or version-specific attributes we read, each checked by :func:`check_reads`.
READS: tuple[str, ...] = (
    "CommonAttentionMetadata._seq_lens_cpu",
    "CommonAttentionMetadata._num_computed_tokens_cpu",
    "FlashAttentionMetadataBuilder.use_full_cuda_graph",
    "FlashAttentionMetadataBuilder.scheduler_metadata",
    "FlashAttentionMetadata.scheduler_metadata",
    "CompilationConfig.max_cudagraph_capture_size",
    "GPUModelRunner.input_batch",
    "InputBatch.req_ids",
    "SingleTypeKVCacheManager.req_to_blocks",
    "SingleTypeKVCacheManager.num_cached_block",
    "SingleTypeKVCacheManager.block_pool",
    "BlockPool.null_block",
    "BlockPool._insert_block_hash",
    "BlockPool.cached_block_hash_to_block",
    "BlockPool.enable_caching",
    "Request.block_hashes",
    "Request.num_tokens",
    "Request.resumable",
    "Request.num_preemptions",
    "Request.num_computed_tokens",
    "Request.num_prompt_tokens",
    "Request.mm_features",
    "Request.sampling_params",
    "KVConnectorOutput.kv_connector_worker_meta",
    # Read by patch 6 (patches.py), which hands the connector the worker's report early.
    "ModelRunnerOutput.kv_connector_output",
    "Scheduler.connector",
    "ArgumentParser._actions",
    # Engine arguments a policy checks or sets (patches.engine_overrides).
    *(
        f"EngineArgs.{f}"
        for f in (
            "enable_prefix_caching",
            "pipeline_parallel_size",
            "distributed_executor_backend",
            "decode_context_parallel_size",
            "data_parallel_size",
            "enable_dbo",
            "kv_cache_dtype",
            "attention_backend",
            "block_size",
            "kv_transfer_config",
            "speculative_config",
            "logits_processors",
        )
    ),
)


def _init_assigns(cls: type) -> set[str]:
    """Attributes an ``__init__`` along ``cls``'s MRO assigns on ``self`` (read from its source: vLLM sets
    these there). Generated ``__init__`` methods have no source; their dataclass fields cover them."""
    out: set[str] = set()
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        try:
            src = inspect.getsource(klass.__init__)
        except (OSError, TypeError):
            continue
        out |= {
            line.split("self.", 1)[1].split("=")[0].split(":")[0].strip()
            for line in src.splitlines()
            if line.strip().startswith("self.") and "=" in line
        }
    return out


def _provided(owner: str) -> set[str]:
    """What ``owner`` provides in this vLLM: members, dataclass fields, attributes set in ``__init__``."""
    cls = getattr(importlib.import_module(_OWNERS[owner]), owner)
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return set(dir(cls)) | fields | _init_assigns(cls)


def check_reads(provided: Callable[[str], set[str]] | None = None) -> list[str]:
    """The targets in :data:`READS` that vLLM no longer provides (empty: all there).

    ``provided(owner)`` → the owner class's attributes; the default asks vLLM (tests pass a fake).
    """
    look = provided or _provided
    cache: dict[str, set[str]] = {}
    missing = []
    for name in READS:
        owner, attr = name.split(".", 1)
        if owner not in cache:
            cache[owner] = look(owner)
        if attr not in cache[owner]:
            missing.append(f"{name} is gone")
    return missing


# ---- the reads ---------------------------------------------------------------------------------------
def seq_lens_cpu(cm: Any) -> torch.Tensor | None:
    """The CPU copy of the step's sequence lengths, when the runner made one (never a device read)."""
    return cm._seq_lens_cpu


def replace_common_metadata(cm: Any, table: torch.Tensor, seq_lens: torch.Tensor, shift: torch.Tensor) -> Any:
    """``cm`` with another block table and lengths, its CPU copies kept consistent (shortened by
    ``shift`` per row; the computed-token copy is dropped: vLLM derives it from the lengths on demand)."""
    changes: dict[str, Any] = dict(block_table_tensor=table, seq_lens=seq_lens)
    if cm._seq_lens_cpu is not None:
        changes["_seq_lens_cpu"] = cm._seq_lens_cpu - shift[: cm._seq_lens_cpu.shape[0]].to(torch.long)
    if cm._num_computed_tokens_cpu is not None:
        changes["_num_computed_tokens_cpu"] = None
    return cm.replace(**changes)


def uses_full_cuda_graph(builder: Any) -> bool:
    """Whether a metadata builder replays full CUDA graphs (FlashAttention's builder says so; the CPU
    builder has no graphs)."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

    return isinstance(builder, FlashAttentionMetadataBuilder) and bool(builder.use_full_cuda_graph)


def builder_schedule(builder: Any) -> torch.Tensor | None:
    """The FlashAttention builder's persistent scheduler-metadata buffer (``None``: it has none)."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

    return builder.scheduler_metadata if isinstance(builder, FlashAttentionMetadataBuilder) else None


def metadata_schedule(metadata: Any) -> torch.Tensor | None:
    """FlashAttention metadata's scheduler metadata (``None`` for other backends' metadata)."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata

    return metadata.scheduler_metadata if isinstance(metadata, FlashAttentionMetadata) else None


def capture_size(vllm_config: Any) -> int:
    """The largest CUDA-graph capture size (0: none)."""
    return int(vllm_config.compilation_config.max_cudagraph_capture_size or 0)


def step_req_ids(runner: Any, num_reqs: int) -> list[str]:
    """The request id of each row of this step's batch, in row order."""
    return list(runner.input_batch.req_ids[:num_reqs])


def req_blocks(manager: Any, req_id: str) -> list[Any]:
    """A request's logical block row in one KV-cache group (the manager's own list: edits stick)."""
    return manager.req_to_blocks.get(req_id, [])


def num_cached_blocks(manager: Any, req_id: str) -> int:
    """Blocks of a request's row one group has put into the prefix cache (prefix-cache hits included)."""
    return manager.num_cached_block.get(req_id, 0)


def set_num_cached_blocks(manager: Any, req_id: str, n: int) -> None:
    """Mark the first ``n`` blocks of a request's row as cached (vLLM then never hashes them again)."""
    manager.num_cached_block[req_id] = n


def null_block(manager: Any) -> Any:
    """The placeholder block standing for a logical block that holds nothing (the pool's, public)."""
    return manager.block_pool.null_block


def block_hashes(request: Any) -> list[bytes]:
    """The request's chained hashes of its whole blocks of tokens (prompt and output so far, multimodal
    hashes and cache salt folded in): vLLM's own prefix-cache keys, before the group id."""
    return request.block_hashes


def block_key(digest: bytes, group: int) -> bytes:
    """A prefix-cache table key: ``digest`` (32 bytes) for KV-cache group ``group``."""
    from vllm.v1.core.kv_cache_utils import BlockHash, make_block_hash_with_group_id

    return make_block_hash_with_group_id(BlockHash(digest), group)


def cache_block(pool: Any, key: bytes, block: Any) -> None:
    """Put ``block`` into the pool's prefix-cache table under one more ``key`` (a block may carry several;
    reallocating it drops them all). vLLM's own insertion, which keeps its per-block bookkeeping."""
    pool._insert_block_hash(key, block, None)


def cached_block(pool: Any, key: bytes) -> Any:
    """The block cached under ``key`` (``None``: none, e.g. evicted since)."""
    return pool.cached_block_hash_to_block.get_one_block(key)


def prefix_caching(pool: Any) -> bool:
    """Whether the engine caches prefixes (its block pool keeps a hash table)."""
    return bool(pool.enable_caching)


def has_cli_flag(parser: Any, flag: str) -> bool:
    """Whether an argparse parser already defines ``flag`` (our flags are added once)."""
    return any(flag in a.option_strings for a in parser._actions)
