"""``hae``: Hierarchical Adaptive Eviction (Ma et al., arXiv 2602.02197) — reconstructed.

No code is public and the full paper text was not available; this follows ALGORITHMS.md §3.2 [R]
(see docs/policies.md for every open question).

**Prefill: dual-attention pruning (DAP) with index broadcasting.** In the first decoder layer only,
the text queries after the last vision token attend to the vision keys; with ``Ā`` the head-averaged
attention, vision token ``j`` receives ``g_j = Σ_i Ā[i, j]`` (global) and ``m_j = max_i Ā[i, j]``
(individual). Text is never evicted at prefill. The kept set is decided once and broadcast to every
layer and KV head. Two modes:

* budget mode (default): keep all text and the vision tokens with the largest ``g`` so that the
  prompt keeps ``round(ρ·N)`` tokens (more if the text alone exceeds it);
* threshold mode (``threshold=r``, paper ``r = 0.0015``): evict ``j`` iff ``g_j < r·Σ g`` (and, if
  ``individual_threshold`` is set, ``m_j < individual_threshold``), MustDrop's dual filter.

**Decode: the recycle bin (DDES).** :class:`RecycleBin` is the pure state machine: when more than
``capacity`` tokens are active, the lowest-scoring unprotected token of each KV head moves to a bin
(logically deleted, still stored); a binned token whose score recovers above the lowest active score
is restored (swapped back); when the bin holds ``bin_size`` tokens it is purged (physically removed).
With ``bin_size = 0`` it is H2O's greedy eviction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import Field

from vllm_kvmm.ops import LayerStats, StatsRequest
from vllm_kvmm.policies.base import KVPolicy, PromptInfo, budget_tokens
from vllm_kvmm.policies.decode import DecodeSpec
from vllm_kvmm.policies.parts import DecodeCadence

__all__ = ["HAE", "BinEvent", "RecycleBin"]


class HAE(DecodeCadence, KVPolicy):
    name: ClassVar[str] = "hae"
    layer_local: ClassVar[bool] = False  # one scoring layer's pruning for every layer
    summary: ClassVar[str] = (
        "first-layer text→vision pruning broadcast to all layers + decode recycle bin (HAE)"
    )

    threshold: float | None = Field(None, gt=0.0, lt=1.0, description="DAP global threshold r (paper 0.0015)")
    individual_threshold: float | None = Field(
        None, gt=0.0, lt=1.0, description="MustDrop individual threshold"
    )
    score_layer: int = Field(0, ge=0, description="layer whose attention decides (index broadcasting)")
    bin_size: int = Field(64, ge=0, description="decode recycle-bin size d (tokens per purge)")
    decode_budget: float | None = Field(
        None, gt=0.0, le=1.0, description="decode: active tokens allowed, as a fraction of the prompt"
    )
    protect_recent: int = Field(16, ge=0, description="decode: most recent tokens never binned")
    decay: float = Field(1.0, gt=0.0, le=1.0, description="decode: score decay per step")

    def model_post_init(self, context: object) -> None:
        if self.threshold is not None and self.budget != 1.0:
            raise ValueError(
                "hae: set either a budget (budget mode) or a threshold (threshold mode), not both"
            )
        if self.individual_threshold is not None and self.threshold is None:
            raise ValueError("hae: individual_threshold needs threshold")

    @property
    def compresses(self) -> bool:
        return self.threshold is not None or self.budget < 1.0

    def stats_request(self, info: PromptInfo) -> StatsRequest:
        if self.score_layer >= info.num_layers:
            raise ValueError(
                f"hae: score_layer={self.score_layer} but the model has {info.num_layers} layers"
            )
        if not info.has_vision:
            return StatsRequest()
        return StatsRequest(t2v=True, layers=(self.score_layer,))

    def _dap_keep(self, st: LayerStats, info: PromptInfo) -> torch.Tensor:
        """``[N]`` bool: tokens kept by the threshold rule."""
        assert st.t2v_sum is not None and st.t2v_max is not None and self.threshold is not None
        vis = info.vision_mask
        g = st.t2v_sum.cpu()
        drop = vis & (g < self.threshold * g[vis].sum())
        if self.individual_threshold is not None:
            drop &= st.t2v_max.cpu() < self.individual_threshold
        return ~drop

    def layer_budgets(self, stats: Sequence[LayerStats | None], info: PromptInfo) -> list[int]:
        if self.threshold is None or not info.has_vision:
            return super().layer_budgets(stats, info)
        st = stats[self.score_layer]
        assert st is not None
        return [int(self._dap_keep(st, info).sum())] * info.num_layers

    def protected(self, info: PromptInfo, layer: int) -> torch.Tensor:
        return info.text_mask

    def scores(self, stats: Sequence[LayerStats | None], info: PromptInfo, layer: int) -> torch.Tensor:
        st = stats[self.score_layer]
        if st is None or st.t2v_sum is None:  # text-only prompt: nothing is evictable (text is protected)
            return torch.zeros(info.num_kv_heads, info.num_tokens)
        s = st.t2v_sum.cpu().float()
        if self.threshold is not None:
            # Kept-by-threshold tokens outrank the rest, so top-k with k = their count selects them.
            s = s + self._dap_keep(st, info).float() * (1.0 + float(s.max()))
        return s.expand(info.num_kv_heads, -1)

    def decodes(self) -> bool:
        # The recycle bin has its own budget (``decode_budget``): it runs even when prefill keeps all.
        return True

    def decode_rule(self, info: PromptInfo, interval: int) -> DecodeSpec:
        capacity = None if self.decode_budget is None else self.decode_capacity(0, info.num_tokens)
        return DecodeSpec("bin", interval, self.protect_recent, capacity=capacity, bin_size=self.bin_size)

    def decode_capacity(self, num_prompt_kept: int, num_prompt: int) -> int:
        """Active tokens a request may hold while decoding (default: what prefill kept)."""
        if self.decode_budget is None:
            return num_prompt_kept
        return max(self.protect_recent + 1, budget_tokens(self.decode_budget, num_prompt))

    def recycle_bin(self, num_kv_heads: int, capacity: int) -> RecycleBin:
        return RecycleBin(num_kv_heads, capacity, self.bin_size, self.protect_recent, self.decay)


@dataclass(frozen=True, slots=True)
class BinEvent:
    """What one :meth:`RecycleBin.step` did. Masks are over the stored slots before any purge.

    ``binned``/``restored``: ``[H_kv, n]`` bool, slots that left / re-entered the active set this step.
    ``active``: ``[H_kv, n]`` bool, the active set after the step (attention must skip the others).
    ``keep``: ``None``, or ``[H_kv, n − bin]`` the stored slots that survive a purge, ascending; the
    caller compacts storage to exactly these slots, and slot indices are renumbered accordingly.
    """

    binned: torch.Tensor
    restored: torch.Tensor
    active: torch.Tensor
    keep: torch.Tensor | None = None

    @property
    def purged(self) -> bool:
        return self.keep is not None


@dataclass
class RecycleBin:
    """Decode-time eviction state of one (request, layer): per-KV-head scores and active slots.

    Slots are positions in the layer's stored cache (the prompt's kept tokens, then generated ones).
    Each step the caller passes the attention the new query gives every stored slot — binned slots
    included, scored as if active: they are still stored, so ``q·k`` is at hand — and applies the
    event: attention skips inactive slots, and a purge compacts storage to ``event.keep``.

    Rule: the active set is always the ``protect_recent`` newest slots plus the best-scoring others,
    ``capacity`` in all. So a token falling out of that set is binned, a binned token whose score
    recovers is restored, and once ``bin_size`` tokens wait in the bin they are purged. Every head
    holds the same number of active and binned slots, as paged storage requires.

    Args:
        num_kv_heads: ``H_kv``. capacity: active slots per head. bin_size: ``d`` (0 = greedy H2O).
        protect_recent: newest slots never binned. decay: scores evolve as ``s ← decay·s + a``.
    """

    num_kv_heads: int
    capacity: int
    bin_size: int
    protect_recent: int = 16
    decay: float = 1.0
    scores: torch.Tensor = field(init=False)
    active: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if self.capacity <= self.protect_recent:
            raise ValueError(f"capacity {self.capacity} must exceed protect_recent {self.protect_recent}")
        self.scores = torch.zeros(self.num_kv_heads, 0, dtype=torch.float64)
        self.active = torch.zeros(self.num_kv_heads, 0, dtype=torch.bool)

    @property
    def num_slots(self) -> int:
        return self.scores.shape[1]

    @property
    def bin_count(self) -> int:
        """Binned slots per head (equal for every head)."""
        return self.num_slots - int(self.active[0].sum()) if self.num_slots else 0

    def start(self, prompt_scores: torch.Tensor) -> None:
        """Begin with the prompt's kept slots and their prefill scores, ``[H_kv, n]``."""
        self.scores = prompt_scores.double().clone()
        self.active = self._select()

    def step(self, attn: torch.Tensor) -> BinEvent:
        """Append one generated token; ``attn``: ``[H_kv, n + 1]`` over all stored slots incl. the new one."""
        h, n = self.num_kv_heads, self.num_slots + 1
        if attn.shape != (h, n):
            raise ValueError(f"attention row has shape {tuple(attn.shape)}, expected ({h}, {n})")
        # Fix: the state follows the attention rows' device (decode rows come from the GPU); the new
        # slot's entries used to be made on the CPU, so torch.cat failed for CUDA inputs.
        dev = attn.device
        before = torch.cat([self.active.to(dev), torch.ones(h, 1, dtype=torch.bool, device=dev)], 1)
        new = torch.zeros(h, 1, dtype=torch.float64, device=dev)
        self.scores = torch.cat([self.scores.to(dev) * self.decay, new], 1)
        self.scores += attn.double()
        self.active = self._select()
        ev = BinEvent(
            binned=before & ~self.active, restored=~before & self.active, active=self.active.clone()
        )
        if self.bin_count == 0 or self.bin_count < max(1, self.bin_size):
            return ev
        keep = torch.nonzero(self.active)[:, 1].view(h, -1)
        self.scores = torch.gather(self.scores, 1, keep)
        self.active = torch.ones_like(self.scores, dtype=torch.bool)
        return BinEvent(binned=ev.binned, restored=ev.restored, active=ev.active, keep=keep)

    def _select(self) -> torch.Tensor:
        h, n = self.scores.shape
        dev = self.scores.device  # same device as the scores (see step)
        if n <= self.capacity:
            return torch.ones(h, n, dtype=torch.bool, device=dev)
        recent = torch.zeros(n, dtype=torch.bool, device=dev)
        recent[n - self.protect_recent :] = True
        ranked = torch.where(recent, torch.tensor(float("inf"), dtype=torch.float64, device=dev), self.scores)
        # Stable sort: on equal scores the older slot stays active.
        order = torch.argsort(ranked, dim=1, descending=True, stable=True)
        active = torch.zeros(h, n, dtype=torch.bool, device=dev)
        active.scatter_(1, order[:, : self.capacity], True)
        return active
