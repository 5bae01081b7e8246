"""Primitives for KV scoring, selection, merging and compaction (no vLLM import).

Torch throughout; the prefill statistics also have flash-style Triton kernels (``stats_triton``), which
``StatsAccumulator`` uses for CUDA tensors.
"""

from vllm_kvmm.ops.merge import MergeKind, merge_kv, nearest_kept
from vllm_kvmm.ops.select import complement, pool1d, reduce_heads, select_topk
from vllm_kvmm.ops.stats import (
    LayerStats,
    StatsAccumulator,
    StatsRequest,
    attention_stats,
    decode_scores,
    row_entropy,
)

__all__ = [
    "LayerStats",
    "MergeKind",
    "StatsAccumulator",
    "StatsRequest",
    "attention_stats",
    "complement",
    "decode_scores",
    "merge_kv",
    "nearest_kept",
    "pool1d",
    "reduce_heads",
    "row_entropy",
    "select_topk",
]
