"""``pyramidkv``: SnapKV scoring with budgets that shrink linearly with depth (Cai et al., 2024).

With ``b = B − w`` per layer on average, ``min = b/β``, ``max = 2b − min`` (if ``max ≥ N − w``:
``max = N − w`` and ``min = 2b − max``); layer ``l`` keeps ``max − l·(max − min)/(L − 1)`` plus the
window (KVCache-Factory's ``PyramidKVCluster``, β = 20). Integer budgets are rounded by largest
remainder so that they sum exactly to ``L·B``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from vllm_kvmm.ops import LayerStats
from vllm_kvmm.policies.base import PromptInfo, budget_tokens
from vllm_kvmm.policies.budgets import round_preserving_sum
from vllm_kvmm.policies.snapkv import SnapKV


class PyramidKV(SnapKV):
    name: ClassVar[str] = "pyramidkv"
    summary: ClassVar[str] = "SnapKV scoring, per-layer budgets decreasing linearly with depth (PyramidKV)"

    beta: float = Field(20.0, gt=1.0, description="steepness: top layer keeps 1/beta of the average")

    def layer_budgets(self, stats: Sequence[LayerStats | None], info: PromptInfo) -> list[int]:
        n, layers = info.num_tokens, info.num_layers
        w = self._w(info)
        b = budget_tokens(self.budget, n) - w
        if b <= 0 or layers == 1:
            return [budget_tokens(self.budget, n)] * layers
        lo = b / self.beta
        hi = 2 * b - lo
        if hi >= n - w:
            hi = n - w
            lo = 2 * b - hi
        steps = [hi - layer * (hi - lo) / (layers - 1) for layer in range(layers)]
        return [x + w for x in round_preserving_sum(steps, b * layers)]
