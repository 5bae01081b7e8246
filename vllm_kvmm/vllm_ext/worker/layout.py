"""The engine's layout as the worker sees it, and one step's rows (plain data, no behaviour)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_kvmm.vllm_ext.worker.requests import LayerRef

__all__ = ["EngineLayout", "StepRows"]


@dataclass
class EngineLayout:
    """What one engine registered with this process: its attention layers, caches and parallelism.

    ``num_kv_heads`` is this rank's; under tensor parallelism ``all_reduce`` sums a tensor over ranks.
    ``paged`` reads and writes the paged cache in the attention backend's layout (set by the backend).
    ``layers`` are this process's compressed layers; under pipeline parallelism the model has
    ``model_layers`` of them (``0``: all are here), indexed by ``LayerRef.index``, and ``stage`` is this
    process's pipeline rank.
    """

    layers: dict[str, LayerRef] = field(default_factory=dict)
    block_size: int = 0
    num_kv_heads: int = 0
    tp_world: int = 1
    all_reduce: Any = None
    kv_caches: dict[str, torch.Tensor] = field(default_factory=dict)
    paged: Any = None
    model_layers: int = 0
    stage: int = 0

    @property
    def num_layers(self) -> int:
        """The model's compressed layers (a policy's ``L``), on every pipeline stage."""
        return self.model_layers or len(self.layers)

    @property
    def cuda(self) -> bool:
        """Whether the caches are on a CUDA device (``torch.cuda.is_available()`` costs a driver query
        per call on a CPU host; this is read per compression and per step's flushes)."""
        return next(iter(self.kv_caches.values())).is_cuda if self.kv_caches else False

    @property
    def local_layers(self) -> frozenset[int] | None:
        """The layer indices this stage plans, or ``None`` when every layer is here."""
        if len(self.layers) == self.num_layers:
            return None
        return frozenset(ref.index for ref in self.layers.values())

    def members(self) -> dict[int, list[tuple[str, int]]]:
        """``group → [(layer name, layer index)]`` of this stage's compressed layers."""
        out: dict[int, list[tuple[str, int]]] = {}
        for name, ref in self.layers.items():
            out.setdefault(ref.group, []).append((name, ref.index))
        return out

    def layer_groups(self) -> list[list[int]]:
        """Decoder layers per KV-cache group (they share a block table, hence a layout). Under pipeline
        parallelism every group is one layer (start-up refuses ``--kv-groups`` with it)."""
        if self.local_layers is not None:
            return [[i] for i in range(self.num_layers)]
        out: dict[int, list[int]] = {}
        for ref in self.layers.values():
            out.setdefault(ref.group, []).append(ref.index)
        return [sorted(v) for _, v in sorted(out.items())]


@dataclass
class StepRows:
    """This step's rows: request id per row, query offsets and (uncompacted) lengths from the CPU copies.

    ``metadata``: attention metadata already built this step, shared by groups with the same view.
    """

    req_ids: list[str] = field(default_factory=list)
    qsl: list[int] | None = None
    seq_lens: list[int] | None = None
    metadata: dict[tuple, Any] = field(default_factory=dict)
