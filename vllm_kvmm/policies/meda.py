"""The MEDA family: entropy-guided per-layer budgets, text-prior selection, merging (MEDA, NAACL 2025).

Three registered policies share one implementation and differ only in their defaults:

* ``meda-paper`` — the paper's equations exactly:

  * per layer, the cross-modal entropy ``E_CM = H̄(A_TV) + H̄(A_VT)`` — mean row entropies of the
    head-averaged text→vision and vision→text attention maps (Eq. 4–6), computed causally in chunks;
  * layer keep ratios ``α_l = softmax(E_CM)_l · L · ρ`` clamped to ``[min_ratio, 1]`` and re-scaled so
    they still sum to ``L·ρ`` (Eq. 7);
  * inside a layer, the LOOK-M text prior ``A_s[T] += max(A_s)`` on accumulated attention, a recent
    window ``M`` and the top ``N`` with ``M:N = 3:1`` (§4.4);
  * every evicted token is averaged into its cosine-nearest kept key, keys and values (Eq. 11–12).

* ``meda-released`` — the released code (``AIoT-MLSys-Lab/MEDA`` @ 0e1a53b): full-map entropy, no
  re-scaling, 1:1 split, all text kept, filtered merge with its index bug.

* ``meda`` — the product default: the paper's idea made robust in a paged cache (docs/policies.md gives
  every departure and the validation-split measurement behind it): standardised entropies with a
  temperature instead of a softmax over raw nats, a per-layer floor, attention sinks, question-aware
  (observation-window) scoring, a uniform allocation on text-only prompts, and layer entropies estimated
  from every 11th query row (``entropy_step``).

A text-only prompt has no cross-modal map; ``meda-paper`` then falls back to the full-attention entropy,
which is what the released code uses for every prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field

from vllm_kvmm.ops import LayerStats, StatsRequest, pool1d
from vllm_kvmm.policies.base import PromptInfo, budget_tokens
from vllm_kvmm.policies.budgets import clamped_softmax_ratios, round_preserving_sum
from vllm_kvmm.policies.textprior import TextPriorPolicy, text_prior_scores

__all__ = ["MEDA", "MEDABase", "MEDAPaper", "MEDAReleased"]


class MEDABase(TextPriorPolicy):
    """Fields and stages of every MEDA variant; the subclasses only choose defaults."""

    layer_local: ClassVar[bool] = False  # budgets from every layer's entropy

    entropy: Literal["cross_modal", "full"] = "cross_modal"
    allocation: Literal["softmax", "standardized", "uniform"] = Field(
        "softmax",
        description="layer weights: softmax of the raw entropies (paper Eq. 7), of the entropies "
        "standardised over layers times `temperature`, or uniform (ablation)",
    )
    temperature: float = Field(1.0, gt=0.0, description="standardized allocation: exp(temperature·z)")
    min_ratio: float = Field(0.01, gt=0.0, le=1.0, description="lowest keep ratio of any layer")
    floor: float = Field(
        0.0, ge=0.0, le=1.0, description="lowest layer budget as a fraction of the average budget ρ"
    )
    renormalize: bool = Field(True, description="re-scale clamped budgets to sum to L·ρ (paper)")
    recent_fraction: float = Field(0.75, ge=0.0, le=1.0, description="share of a layer's budget for recent")
    scoring: Literal["accumulated", "window"] = Field(
        "accumulated",
        description="token scores: attention accumulated over every prompt query (paper), or over the last "
        "`window` queries with SnapKV's pooling (the question's view)",
    )
    window: int = Field(32, ge=1, description="window scoring: observation queries, always kept")
    kernel: int = Field(5, ge=1, description="window scoring: pooling width (odd)")
    text_only: Literal["full_entropy", "uniform"] = Field(
        "full_entropy",
        description="allocation on a prompt with no image: budgets from the full-map entropy (paper mode's "
        "fallback) or uniform",
    )
    merge: Literal["average", "pivot", "weighted", "none"] = "average"
    entropy_step: int = Field(
        1,
        ge=1,
        description="layer entropies from the queries at every `entropy_step`-th position (a systematic "
        "sample of the rows whose mean they are; 1 = every row, the paper)",
    )

    def model_post_init(self, context: object) -> None:
        if self.min_ratio > self.budget and self.renormalize:
            raise ValueError(f"{self.name}: min_ratio={self.min_ratio} exceeds the budget {self.budget}")
        if self.kernel % 2 == 0:
            raise ValueError(f"{self.name}: kernel must be odd, got {self.kernel}")
        if self.score_step > 1 and self.scoring != "accumulated":
            # A silently ignored knob would promise a speed-up it cannot give.
            raise ValueError(
                f"{self.name}: score_step samples accumulated attention; with scoring={self.scoring!r} the "
                "scores come from the observation window (set scoring='accumulated' or leave score_step 1)"
            )
        super().model_post_init(context)

    @classmethod
    def released_code(cls, budget: float = 0.2, **overrides: object) -> MEDAReleased:
        """The behaviour of the released code (``AIoT-MLSys-Lab/MEDA`` @ 0e1a53b), for replication."""
        return MEDAReleased.model_validate({"budget": budget, **overrides})

    @property
    def over_budget(self) -> str | None:
        notes = [] if super().over_budget is None else [str(super().over_budget)]
        if not self.renormalize:
            notes.append("renormalize=False clamps the layer budgets once (released code): their sum drifts")
        return "; ".join(notes) or None

    # ---- statistics ---------------------------------------------------------------------------
    def _entropy_kind(self, info: PromptInfo) -> str | None:
        if not info.has_vision:
            return None if self.text_only == "uniform" or self.allocation == "uniform" else "full"
        if self.allocation == "uniform":
            return None
        return "cross_modal" if self.entropy == "cross_modal" else "full"

    def _w(self, info: PromptInfo) -> int:
        return min(self.window, info.num_tokens)

    def stats_request(self, info: PromptInfo) -> StatsRequest:
        kind = self._entropy_kind(info)
        window = self._w(info) if self.scoring == "window" else 0
        return StatsRequest(
            colsum=self.scoring == "accumulated",
            window=window,
            entropy=kind == "full",
            cross_entropy=kind == "cross_modal",
            entropy_step=self.entropy_step,
            colsum_step=self.score_step,
        )

    # ---- budgets ------------------------------------------------------------------------------
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

    def allocation_scores(self, stats: Sequence[LayerStats | None], info: PromptInfo) -> torch.Tensor | None:
        """``[L]`` the logits of the layer weights ``softmax(·)``, or ``None`` for a uniform allocation."""
        if self._entropy_kind(info) is None:
            return None
        e = self.layer_entropies(stats)
        if self.allocation == "softmax":
            return e
        # Standardised: budgets follow how a layer's entropy compares with the others', not its value in
        # nats; the raw softmax turned a 5-nat spread into a 159× budget ratio (docs/policies.md).
        std = float(e.std()) if e.numel() > 1 else 0.0
        return torch.zeros_like(e) if std < 1e-12 else self.temperature * (e - e.mean()) / std

    def layer_budgets(self, stats: Sequence[LayerStats | None], info: PromptInfo) -> list[int]:
        n, layers = info.num_tokens, info.num_layers
        logits = self.allocation_scores(stats, info)
        if logits is None:
            return super().layer_budgets(stats, info)
        lo = min(self.budget, max(self.min_ratio, self.floor * self.budget))
        ratios = clamped_softmax_ratios(logits, layers * self.budget, lo, 1.0, self.renormalize)
        tokens = [float(r) * n for r in ratios]
        if not self.renormalize:
            return [min(n, max(0, math.floor(t + 0.5))) for t in tokens]
        return round_preserving_sum(tokens, budget_tokens(self.budget, n) * layers, cap=n)

    # ---- selection ----------------------------------------------------------------------------
    def recent_window(self, info: PromptInfo, budget: int) -> int:
        recent = budget_tokens(self.recent_fraction, budget)
        return max(recent, self._w(info)) if self.scoring == "window" else recent

    def scores(self, stats: Sequence[LayerStats | None], info: PromptInfo, layer: int) -> torch.Tensor:
        if self.scoring == "accumulated":
            return super().scores(stats, info, layer)
        st = stats[layer]
        assert st is not None and st.window is not None
        n, w = info.num_tokens, self._w(info)
        # As SnapKV: pooled over the scored region only (the window's own keys are kept as the tail).
        out = torch.zeros_like(st.window)
        out[:, : n - w] = pool1d(st.window[:, : n - w], self.kernel, "avg")
        return text_prior_scores(out, info.text_mask, self.text_prior)


class MEDAPaper(MEDABase):
    name: ClassVar[str] = "meda-paper"
    summary: ClassVar[str] = "MEDA exactly as its paper: softmax of raw layer entropies, 3:1 split, merging"


class MEDAReleased(MEDABase):
    name: ClassVar[str] = "meda-released"
    summary: ClassVar[str] = "MEDA as its released code: full entropy, all text kept, filtered merge"

    entropy: Literal["cross_modal", "full"] = "full"
    renormalize: bool = False
    recent_fraction: float = Field(0.5, ge=0.0, le=1.0)
    text_prior: Literal["bonus", "keep_all", "none"] = "keep_all"
    similarity_filter: bool = True
    misaligned_source: bool = True


class MEDA(MEDABase):
    name: ClassVar[str] = "meda"
    summary: ClassVar[str] = (
        "cross-modal-entropy layer budgets (standardised, floored) + sinks + question-window selection (MEDA)"
    )

    allocation: Literal["softmax", "standardized", "uniform"] = "standardized"
    temperature: float = Field(1.0, gt=0.0)
    floor: float = Field(0.5, ge=0.0, le=1.0)
    recent_fraction: float = Field(0.0, ge=0.0, le=1.0)
    scoring: Literal["accumulated", "window"] = "window"
    sink_tokens: int = Field(4, ge=0)
    text_only: Literal["full_entropy", "uniform"] = "uniform"
    merge: Literal["average", "pivot", "weighted", "none"] = "none"
    # Every 11th query row: ~1/11 of the cross-modal statistics' cost; chosen on the validation split
    # (docs/policies.md; `vllm-kvmm bench entropy-sample`). A prime step does not alias image grids.
    entropy_step: int = Field(11, ge=1)
