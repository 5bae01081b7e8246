"""Prometheus metrics of compression, exported on vLLM's ``/metrics`` through the KV-connector stats path.

The scheduler-side connector counts what each step compressed and freed; vLLM aggregates those counts
into its scheduler stats and hands them to :class:`KVMMPromMetrics` in the API server process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.metrics.utils import create_metric_per_engine

__all__ = ["COUNTERS", "HISTOGRAMS", "KVMMPromMetrics", "KVMMStats"]

# name in the stats dict -> (Prometheus name, help)
COUNTERS: dict[str, tuple[str, str]] = {
    "compressed_requests": ("vllm_kvmm:compressed_requests", "Requests whose prompt KV was compressed."),
    "prompt_tokens": ("vllm_kvmm:prompt_tokens", "Prompt tokens of compressed requests."),
    "kv_tokens_full": (
        "vllm_kvmm:kv_token_layers_prompt",
        "Prompt KV entries before compression (tokens × layers).",
    ),
    "kv_tokens_kept": ("vllm_kvmm:kv_token_layers_kept", "Prompt KV entries kept (tokens × layers)."),
    "blocks_freed": ("vllm_kvmm:blocks_freed", "KV blocks returned to the pool by compression."),
    "shared_prefix_tokens": (
        "vllm_kvmm:shared_prefix_tokens",
        "Prompt tokens of compressing requests kept exact as a shared prefix (found in the prefix cache or "
        "marked with kv_shared_prefix), counted when the request ends.",
    ),
    "reused_tokens": (
        "vllm_kvmm:reused_tokens",
        "Tokens follow-up requests took from earlier requests' compressed caches (kv_reuse) instead of "
        "prefilling them, counted when the request is admitted.",
    ),
    "compression_seconds": ("vllm_kvmm:compression_seconds", "Time spent compressing (worker side)."),
    "decode_flushes": ("vllm_kvmm:decode_flushes", "Decode-time eviction flushes."),
    "failed_compressions": (
        "vllm_kvmm:failed_compressions",
        "Compressions or flushes that failed and were contained (the request went on without them).",
    ),
}

# name in the stats dict (a list of observations) -> (Prometheus name, help, buckets)
HISTOGRAMS: dict[str, tuple[str, str, list[float]]] = {
    "compression_durations": (
        "vllm_kvmm:compression_duration_seconds",
        "Seconds of each prompt compression or decode-time flush (worker side, device-synchronised).",
        [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
    ),
}


@dataclass
class KVMMStats(KVConnectorStats):
    data: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        self.data = {}

    def add(self, key: str, value: float) -> None:
        self.data[key] = self.data.get(key, 0) + value

    def observe(self, key: str, values: list[float]) -> None:
        """Histogram observations (kept as a list until the API process observes them)."""
        if values:
            self.data.setdefault(key, []).extend(values)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            if isinstance(v, list):
                self.observe(k, v)
            elif isinstance(v, int | float):
                self.add(k, v)
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: v for k, v in self.data.items() if isinstance(v, int | float)}

    def is_empty(self) -> bool:
        return not any(self.data.values())


class KVMMPromMetrics(KVConnectorPromMetrics):
    def __init__(
        self, vllm_config: Any, metric_types: Any, labelnames: list[str], per_engine_labelvalues: Any
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters = {
            key: create_metric_per_engine(
                self._counter_cls(name=name, documentation=doc, labelnames=labelnames), per_engine_labelvalues
            )
            for key, (name, doc) in COUNTERS.items()
        }
        self.histograms = {
            key: create_metric_per_engine(
                self._histogram_cls(name=name, documentation=doc, buckets=buckets, labelnames=labelnames),
                per_engine_labelvalues,
            )
            for key, (name, doc, buckets) in HISTOGRAMS.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, value in transfer_stats_data.items():
            if key in self.counters and value:
                self.counters[key][engine_idx].inc(value)
            elif key in self.histograms:
                for x in value:
                    self.histograms[key][engine_idx].observe(x)
