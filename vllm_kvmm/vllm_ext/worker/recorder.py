"""What tests and benchmarks inspect: every plan the worker made (off in production: ``recorder = None``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_kvmm.policies import LayerPlan
from vllm_kvmm.vllm_ext.worker.requests import RequestState

__all__ = ["PlanRecorder"]


@dataclass
class PlanRecorder:
    """``plans``: per request, the prefill plan of every layer. ``flushes`` / ``bins``: per request and
    flush, every layer's stored positions ``[H_kv, S]`` and recycle-bin positions right after it."""

    plans: dict[str, list[LayerPlan]] = field(default_factory=dict)
    flushes: dict[str, list[list[torch.Tensor]]] = field(default_factory=dict)
    bins: dict[str, list[list[torch.Tensor]]] = field(default_factory=dict)

    def flushed(self, req_id: str, st: RequestState, num_layers: int) -> None:
        self.flushes.setdefault(req_id, []).append([st.positions[i].clone() for i in range(num_layers)])
        self.bins.setdefault(req_id, []).append([st.bin_positions[i].clone() for i in range(num_layers)])
