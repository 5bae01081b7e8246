"""``snapkv``: observation-window scoring with pooling (Li et al., NeurIPS 2024).

``s_j = Σ_{i ∈ last w} A[i, j]`` for ``j < N − w``, smoothed by a 1-D pool of width ``kernel``; each
KV head keeps its top ``B − w`` tokens plus the last ``w``. Defaults are the official repo's
(``window_size=32, kernel_size=5, avgpool``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field

from vllm_kvmm.ops import LayerStats, StatsRequest, pool1d
from vllm_kvmm.policies.base import KVPolicy, PromptInfo


class SnapKV(KVPolicy):
    name: ClassVar[str] = "snapkv"
    summary: ClassVar[str] = "last-window attention with pooling, uniform budget per layer (SnapKV)"

    window: int = Field(32, ge=1, description="observation window: last prompt queries, always kept")
    kernel: int = Field(5, ge=1, description="pooling width (odd)")
    pooling: Literal["avg", "max", "none"] = "avg"

    def model_post_init(self, context: object) -> None:
        if self.kernel % 2 == 0:
            raise ValueError(f"{self.name}: kernel must be odd, got {self.kernel}")

    def _w(self, info: PromptInfo) -> int:
        return min(self.window, info.num_tokens)

    def stats_request(self, info: PromptInfo) -> StatsRequest:
        return StatsRequest(window=self._w(info))

    def recent_window(self, info: PromptInfo, budget: int) -> int:
        return self._w(info)

    def scores(self, stats: Sequence[LayerStats | None], info: PromptInfo, layer: int) -> torch.Tensor:
        st = stats[layer]
        assert st is not None and st.window is not None
        n, w = info.num_tokens, self._w(info)
        # Pool over the scored region only, as SnapKV does (window keys are never candidates).
        out = torch.zeros_like(st.window)
        out[:, : n - w] = pool1d(st.window[:, : n - w], self.kernel, self.pooling)
        return out
