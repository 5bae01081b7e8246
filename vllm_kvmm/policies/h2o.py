"""``h2o``: heavy hitters by accumulated attention plus a recent window (Zhang et al., NeurIPS 2023).

Prefill: ``s_j = Σ_i A[i, j]`` over all prompt queries; each KV head keeps the last
``r = recent_fraction·B`` tokens and the top ``B − r`` of the rest (the paper's 20 % budget split
1:1). The original also evicts greedily at every decode step; that lives in the decode path
(:class:`vllm_kvmm.policies.hae.RecycleBin` with ``bin_size=0`` is exactly that greedy rule).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from pydantic import Field

from vllm_kvmm.ops import LayerStats
from vllm_kvmm.policies.base import KVPolicy, PromptInfo, budget_tokens
from vllm_kvmm.policies.decode import DecodeSpec
from vllm_kvmm.policies.parts import DecodeCadence, SampledScores


class H2O(SampledScores, DecodeCadence, KVPolicy):
    name: ClassVar[str] = "h2o"
    summary: ClassVar[str] = "heavy hitters by accumulated attention + recent window (H2O)"

    recent_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of the budget for recent tokens")

    def recent_window(self, info: PromptInfo, budget: int) -> int:
        return budget_tokens(self.recent_fraction, budget)

    def decode_rule(self, info: PromptInfo, interval: int) -> DecodeSpec:
        recent = self.recent_window(info, budget_tokens(self.budget, info.num_tokens))
        return DecodeSpec("score", interval, recent)

    def scores(self, stats: Sequence[LayerStats | None], info: PromptInfo, layer: int) -> torch.Tensor:
        st = stats[layer]
        assert st is not None and st.colsum is not None
        return st.colsum
