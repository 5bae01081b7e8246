"""``lookm``: text-prior eviction with KV merging (LOOK-M, Wan et al., Findings of EMNLP 2024).

Scores are accumulated attention over all prompt queries with the text prior ``A_s[T] += max(A_s)``;
each KV head keeps the recent ``M = recent_fraction·B`` tokens plus the top ``B − M`` (paper
``α1 = α2``, so ``recent_fraction = 0.5``), and every evicted token is merged into its cosine-nearest
kept key (paper default: pivotal merging of keys and values). ``text_prior="keep_all"`` is the
released code's behaviour: every text token is kept, so the cache can exceed the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field

from vllm_kvmm.ops import LayerStats, StatsRequest
from vllm_kvmm.policies.base import KVPolicy, MergeSpec, PromptInfo, budget_tokens
from vllm_kvmm.policies.textprior import TextPrior, text_prior_scores


class LookM(KVPolicy):
    name: ClassVar[str] = "lookm"
    summary: ClassVar[str] = "text-prior eviction + pivotal KV merging (LOOK-M)"

    recent_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="α1/(α1+α2): share of the budget for recent"
    )
    text_prior: TextPrior = "bonus"
    merge: Literal["pivot", "average", "weighted", "none"] = "pivot"
    merge_keys: bool = Field(True, description="merge keys too (False is safer with M-RoPE models)")
    similarity_filter: bool = Field(False, description="released code's A/W-merge filter (mean best sim)")

    def stats_request(self, info: PromptInfo) -> StatsRequest:
        return StatsRequest(colsum=True)

    def recent_window(self, info: PromptInfo, budget: int) -> int:
        return budget_tokens(self.recent_fraction, budget)

    def protected(self, info: PromptInfo, layer: int) -> torch.Tensor | None:
        return info.text_mask if self.text_prior == "keep_all" else None

    def scores(self, stats: Sequence[LayerStats | None], info: PromptInfo, layer: int) -> torch.Tensor:
        st = stats[layer]
        assert st is not None and st.colsum is not None
        return text_prior_scores(st.colsum, info.text_mask, self.text_prior)

    def merge_spec(self, info: PromptInfo) -> MergeSpec | None:
        if self.merge == "none":
            return None
        return MergeSpec(self.merge, merge_keys=self.merge_keys, similarity_filter=self.similarity_filter)
