"""The text-prior family shared by LOOK-M and MEDA: scoring, recent split, protection and merging."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from vllm_kvmm.ops import LayerStats, StatsRequest
from vllm_kvmm.policies.base import KVPolicy, MergeSpec, PromptInfo, budget_tokens

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


class TextPriorPolicy(KVPolicy):
    """Accumulated attention with a text prior, a recent window, and nearest-key merging of the evicted.

    Subclasses set the defaults of their paper (LOOK-M: pivot merge, 1:1 split; MEDA: average, 3:1).
    """

    recent_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of a layer's budget for recent")
    text_prior: TextPrior = "bonus"
    merge: Literal["pivot", "average", "weighted", "none"] = "pivot"
    merge_keys: bool = Field(True, description="merge keys too (False is safer with M-RoPE models)")
    similarity_filter: bool = Field(False, description="released code's merge filter (mean best sim)")
    misaligned_source: bool = Field(False, description="reproduce the released MEDA code's merge index bug")
    sink_tokens: int = Field(
        0,
        ge=0,
        description="beyond the papers: the first tokens every layer keeps (attention sink); a layer whose "
        "budget has no room for them keeps one more block",
    )

    def model_post_init(self, context: object) -> None:
        if self.misaligned_source and not self.similarity_filter:
            msg = "misaligned_source reproduces a bug of the filtered merge; set similarity_filter"
            raise ValueError(f"{self.name}: {msg}")

    @property
    def over_budget(self) -> str | None:
        if self.text_prior == "keep_all":
            return (
                "text_prior='keep_all' keeps every text token (released code): more than ρ where text is many"
            )
        return None

    def stats_request(self, info: PromptInfo) -> StatsRequest:
        return StatsRequest(colsum=True)

    def recent_window(self, info: PromptInfo, budget: int) -> int:
        return budget_tokens(self.recent_fraction, budget)

    def protected(self, info: PromptInfo, layer: int) -> torch.Tensor | None:
        prot = info.text_mask if self.text_prior == "keep_all" else None
        if self.sink_tokens:
            # Protected rather than scored: under the paged layout a small layer's budget can round to its
            # recent blocks alone, where no score would save the sink (docs/notes/meda_review_2026-11-23.md).
            sink = torch.arange(info.num_tokens) < self.sink_tokens
            prot = sink if prot is None else prot | sink
        return prot

    def scores(self, stats: Sequence[LayerStats | None], info: PromptInfo, layer: int) -> torch.Tensor:
        st = stats[layer]
        assert st is not None and st.colsum is not None
        return text_prior_scores(st.colsum, info.text_mask, self.text_prior)

    def merge_spec(self, info: PromptInfo) -> MergeSpec | None:
        if self.merge == "none":
            return None
        return MergeSpec(
            self.merge,
            merge_keys=self.merge_keys,
            similarity_filter=self.similarity_filter,
            misaligned_source=self.misaligned_source,
        )
