"""The text-prior family shared by LOOK-M and MEDA: scoring, recent split, protection and merging."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from vllm_kvmm.ops import LayerStats
from vllm_kvmm.policies.base import PromptInfo, budget_tokens
from vllm_kvmm.policies.parts import Merging, SampledScores, Sinks, union

TextPrior = Literal["bonus", "keep_all", "none"]


def text_prior_scores(colsum: torch.Tensor, text_mask: torch.Tensor, prior: TextPrior) -> torch.Tensor:
    """Accumulated attention with the paper's text prior.

    ``bonus`` (LOOK-M Eq. 5, MEDA Eq. 9): ``A_s[T] += max(A_s)`` per KV head, so text outranks vision
    but still competes for the budget. ``keep_all`` is enforced through ``protected`` instead (released
    code), and ``none`` leaves the scores alone. ``colsum``: ``[H_kv, N]``; ``text_mask``: ``[N]``; the
    bonus scores are float64.
    """
    if prior != "bonus":
        return colsum
    # Fix: in float32 the bonus (O(N) for a column sum) swallowed the low bits of close text scores, which
    # then tied and fell to index order (on a text-only prompt LOOK-M did not keep H2O's set). Float64 keeps
    # the two-tier order exact for any score the float32 statistics can hold.
    scores = colsum.double()
    bonus = scores.amax(dim=1, keepdim=True)
    # Fix: move the (CPU) prompt mask to the statistics' device; stats collected on the GPU crashed here.
    return scores + bonus * text_mask.to(device=scores.device, dtype=scores.dtype).unsqueeze(0)


class TextPriorPolicy(Sinks, Merging, SampledScores):
    """Accumulated attention with a text prior, a recent window, and nearest-key merging of the evicted.

    Subclasses set the defaults of their paper (LOOK-M: pivot merge, 1:1 split; MEDA: average, 3:1).
    Attention sinks (:class:`Sinks`, 0 by default) are beyond the papers.
    """

    recent_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of a layer's budget for recent")
    text_prior: TextPrior = "bonus"
    merge: Literal["pivot", "average", "weighted", "none"] = "pivot"

    @property
    def over_budget(self) -> str | None:
        if self.text_prior == "keep_all":
            return (
                "text_prior='keep_all' keeps every text token (released code): more than ρ where text is many"
            )
        return None

    def recent_window(self, info: PromptInfo, budget: int) -> int:
        return budget_tokens(self.recent_fraction, budget)

    def protected(self, info: PromptInfo, layer: int) -> torch.Tensor | None:
        keep_text = info.text_mask if self.text_prior == "keep_all" else None
        return union(keep_text, super().protected(info, layer))

    def scores(self, stats: Sequence[LayerStats | None], info: PromptInfo, layer: int) -> torch.Tensor:
        st = stats[layer]
        assert st is not None and st.colsum is not None
        return text_prior_scores(st.colsum, info.text_mask, self.text_prior)
