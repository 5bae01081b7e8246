"""``lookm``: text-prior eviction with KV merging (LOOK-M, Wan et al., Findings of EMNLP 2024).

Scores are accumulated attention over all prompt queries with the text prior ``A_s[T] += max(A_s)``;
each KV head keeps the recent ``M = recent_fraction·B`` tokens plus the top ``B − M`` (paper
``α1 = α2``, so ``recent_fraction = 0.5``), and every evicted token is merged into its cosine-nearest
kept key (paper default: pivotal merging of keys and values). ``text_prior="keep_all"`` is the
released code's behaviour: every text token is kept, so the cache can exceed the budget.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from vllm_kvmm.policies.textprior import TextPriorPolicy


class LookM(TextPriorPolicy):
    name: ClassVar[str] = "lookm"
    summary: ClassVar[str] = "text-prior eviction + pivotal KV merging (LOOK-M)"

    recent_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="α1/(α1+α2): share of the budget for recent"
    )
