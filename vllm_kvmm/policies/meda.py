"""``meda``: entropy-guided per-layer budgets, text-prior selection, average merging (MEDA, NAACL 2025).

Paper method (default):

* per layer, the cross-modal entropy ``E_CM = H̄(A_TV) + H̄(A_VT)`` — mean row entropies of the
  head-averaged text→vision and vision→text attention maps (Eq. 4–6), computed causally in chunks;
* layer keep ratios ``α_l = softmax(E_CM)_l · L · ρ`` clamped to ``[min_ratio, 1]`` and re-scaled so
  they still sum to ``L·ρ`` (Eq. 7);
* inside a layer, the LOOK-M text prior ``A_s[T] += max(A_s)`` on accumulated attention, a recent
  window ``M`` and the top ``N`` with ``M:N = 3:1`` (§4.4);
* every evicted token is averaged into its cosine-nearest kept key, keys and values (Eq. 11–12).

A text-only prompt has no cross-modal map; MEDA then falls back to the full-attention entropy, which
is what the released code uses for every prompt. :meth:`MEDA.released_code` builds the code's
variant (full entropy, no re-scaling, 1:1 split, all text kept, filtered merge with its index bug).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field

from vllm_kvmm.ops import LayerStats, StatsRequest
from vllm_kvmm.policies.base import PromptInfo, budget_tokens
from vllm_kvmm.policies.budgets import clamped_softmax_ratios, round_preserving_sum
from vllm_kvmm.policies.textprior import TextPriorPolicy


class MEDA(TextPriorPolicy):
    name: ClassVar[str] = "meda"
    summary: ClassVar[str] = "cross-modal-entropy layer budgets + text prior + average merging (MEDA)"

    entropy: Literal["cross_modal", "full"] = "cross_modal"
    min_ratio: float = Field(0.01, gt=0.0, le=1.0, description="lowest keep ratio of any layer")
    renormalize: bool = Field(True, description="re-scale clamped budgets to sum to L·ρ (paper)")
    recent_fraction: float = Field(0.75, ge=0.0, le=1.0, description="share of a layer's budget for recent")
    merge: Literal["average", "pivot", "weighted", "none"] = "average"

    def model_post_init(self, context: object) -> None:
        if self.min_ratio > self.budget and self.renormalize:
            raise ValueError(f"meda: min_ratio={self.min_ratio} exceeds the budget {self.budget}")
        super().model_post_init(context)

    @classmethod
    def released_code(cls, budget: float = 0.2, **overrides: object) -> MEDA:
        """The behaviour of the released code (``AIoT-MLSys-Lab/MEDA`` @ 0e1a53b), for replication."""
        cfg: dict[str, object] = dict(
            budget=budget,
            entropy="full",
            renormalize=False,
            recent_fraction=0.5,
            text_prior="keep_all",
            similarity_filter=True,
            misaligned_source=True,
        )
        cfg.update(overrides)
        return cls.model_validate(cfg)

    def _entropy_kind(self, info: PromptInfo) -> str:
        return "cross_modal" if self.entropy == "cross_modal" and info.has_vision else "full"

    def stats_request(self, info: PromptInfo) -> StatsRequest:
        cm = self._entropy_kind(info) == "cross_modal"
        return StatsRequest(colsum=True, entropy=not cm, cross_entropy=cm)

    def layer_entropies(self, stats: Sequence[LayerStats | None]) -> torch.Tensor:
        """``[L]`` the per-layer entropy that drives the budgets (nan terms count as 0)."""
        out = []
        for st in stats:
            assert st is not None
            if st.entropy_tv is not None or st.entropy_vt is not None:
                terms = [t for t in (st.entropy_tv, st.entropy_vt) if t is not None]
                out.append(sum(0.0 if math.isnan(float(t)) else float(t) for t in terms))
            else:
                assert st.entropy is not None
                out.append(0.0 if math.isnan(float(st.entropy)) else float(st.entropy))
        return torch.tensor(out, dtype=torch.float64)

    def layer_budgets(self, stats: Sequence[LayerStats | None], info: PromptInfo) -> list[int]:
        n, layers = info.num_tokens, info.num_layers
        ratios = clamped_softmax_ratios(
            self.layer_entropies(stats), layers * self.budget, self.min_ratio, 1.0, self.renormalize
        )
        total = budget_tokens(self.budget, n) * layers if self.renormalize else None
        tokens = [float(r) * n for r in ratios]
        if total is None:
            return [min(n, max(0, math.floor(t + 0.5))) for t in tokens]
        return [min(n, t) for t in round_preserving_sum(tokens, total, cap=n)]
