"""What the worker knows about each layer and each compressing request (plain data, no behaviour)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_kvmm.ops import StatsAccumulator
from vllm_kvmm.policies import DecodeSpec, KVPolicy, PromptInfo

__all__ = ["LayerRef", "RequestState"]


@dataclass(frozen=True)
class LayerRef:
    index: int  # decoder layer index (the policy's layer)
    group: int  # KV-cache group id


@dataclass
class RequestState:
    """What the worker keeps about one compressing request until it finishes."""

    policy: KVPolicy
    info: PromptInfo
    # Prompt tokens found in the prefix cache (statistics start after them) and the shared prefix kept
    # exact by compaction and flushes (vllm_ext/prefix.py).
    cached: int = 0
    shared: int = 0
    # Prefill statistics per decoder layer, fed during attention until the prompt's last chunk.
    accs: dict[int, StatsAccumulator] = field(default_factory=dict)
    # group -> (live logical blocks holding the compacted prefix, first logical block of the in-place tail)
    compact: dict[int, tuple[tuple[int, ...], int]] = field(default_factory=dict)
    # Decode-time eviction (docs/decode-eviction.md), per layer: stored slots' true positions and scores
    # [H_kv, S] (slot order = the compact view's order), the capacity, and the decode queries since the
    # last flush as (q [H, d], position).
    decode: DecodeSpec | None = None
    positions: dict[int, torch.Tensor] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    capacity: dict[int, int] = field(default_factory=dict)
    queries: dict[int, list[tuple[torch.Tensor, int]]] = field(default_factory=dict)
    # HAE's recycle bin: per group the logical blocks holding binned tokens (outside the view), per layer
    # their positions and scores [H_kv, n].
    bin_blocks: dict[int, tuple[int, ...]] = field(default_factory=dict)
    bin_positions: dict[int, torch.Tensor] = field(default_factory=dict)
    bin_scores: dict[int, torch.Tensor] = field(default_factory=dict)
    # Set when compression or a flush failed for this request: what failed. It is then served with what
    # was consistently done before (nothing, if planning failed) and is not compressed or flushed again.
    failed: str | None = None
