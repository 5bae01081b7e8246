"""The policy abstraction shared by the dense reference and the vLLM path.

A policy is a small frozen pydantic model whose fields are its hyper-parameters. It answers, for one
prompt of ``N`` tokens, five questions (ALGORITHMS.md §8):

1. :meth:`KVPolicy.stats_request`  which attention statistics to collect during prefill;
2. :meth:`KVPolicy.layer_budgets`  how many tokens each layer keeps;
3. :meth:`KVPolicy.recent_window`  how many trailing tokens each layer always keeps;
4. :meth:`KVPolicy.protected` / :meth:`KVPolicy.scores`  which of the other tokens to keep, per KV head;
5. :meth:`KVPolicy.merge_spec`  whether and how evicted tokens are merged into kept ones.

:func:`plan_compression` turns the answers into a per-layer :class:`LayerPlan` (kept indices per KV
head), and :func:`apply_plan` gathers/merges one layer's keys and values. Both are used unchanged by
the dense reference (``granularity=1`` or the block size) and by vLLM (``granularity = block size``).

Paged layout constraint (``granularity = g``): the tokens of ``[tail_start, N)`` with
``tail_start = g·⌊(N − recent)/g⌋`` are always kept in place, and exactly ``K = g·k`` tokens are kept
from the compressible prefix ``[0, tail_start)``, so the compacted prefix fills whole blocks.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from vllm_kvmm.ops import LayerStats, MergeKind, StatsRequest, complement, merge_kv, select_topk

if TYPE_CHECKING:
    from vllm_kvmm.policies.decode import DecodeSpec

__all__ = [
    "BUDGET_TOLERANCE",
    "KVPolicy",
    "LayerPlan",
    "MergeSpec",
    "PromptInfo",
    "apply_plan",
    "block_tail_start",
    "layout",
    "plan_compression",
]


# How far above ρ a default configuration may keep (relative) on prompts of 512 tokens or more.
BUDGET_TOLERANCE = 0.10


@dataclass(frozen=True, slots=True)
class PromptInfo:
    """What a policy knows about one prompt.

    ``vision_mask``: ``[N]`` bool, ``True`` at image/video placeholder positions (from the processor or
    vLLM's multimodal placeholder ranges; never hard-coded counts).
    """

    num_tokens: int
    vision_mask: torch.Tensor
    num_layers: int
    num_kv_heads: int

    @classmethod
    def text_only(cls, num_tokens: int, num_layers: int, num_kv_heads: int) -> PromptInfo:
        return cls(num_tokens, torch.zeros(num_tokens, dtype=torch.bool), num_layers, num_kv_heads)

    @property
    def text_mask(self) -> torch.Tensor:
        return ~self.vision_mask

    @property
    def has_vision(self) -> bool:
        return bool(self.vision_mask.any())


@dataclass(frozen=True, slots=True)
class MergeSpec:
    """How evicted tokens are folded into kept ones (see :mod:`vllm_kvmm.ops.merge`)."""

    kind: MergeKind
    merge_keys: bool = True
    similarity_filter: bool = False
    misaligned_source: bool = False


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """The decision for one layer of one prompt.

    ``keep``: ``[H_kv, K_total]`` ascending kept positions per KV head; the first ``prefix_keep`` of each
    row lie in ``[0, tail_start)``, the rest are exactly ``[tail_start, N)``.
    ``frozen``: positions ``[0, frozen)`` are kept in place and unchanged (a shared prefix in the prefix
    cache: its blocks are read by other requests and keep their hashes), so they are the first slots of
    every row and no evicted token is merged into them.
    """

    keep: torch.Tensor
    tail_start: int
    prefix_keep: int
    num_tokens: int
    frozen: int = 0

    @property
    def num_kept(self) -> int:
        return self.keep.shape[1]

    @property
    def num_evicted(self) -> int:
        return self.num_tokens - self.num_kept

    @property
    def is_identity(self) -> bool:
        return self.num_kept == self.num_tokens


class KVPolicy(BaseModel):
    """Base class of every policy. Subclasses set :attr:`name` and :attr:`summary` and override hooks.

    ``budget`` is the fraction of the prompt's KV entries kept, averaged over layers (``ρ``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: ClassVar[str] = "base"
    summary: ClassVar[str] = ""
    # Whether a layer's plan needs that layer's statistics only (its budget from the prompt alone): such a
    # policy runs under pipeline parallelism, each stage planning its own layers. MEDA (budgets from every
    # layer's entropy) and HAE (one scoring layer for all) need the whole model's statistics.
    layer_local: ClassVar[bool] = True

    budget: float = Field(1.0, gt=0.0, le=1.0, description="fraction of the prompt KV kept, in (0, 1]")

    @field_validator("budget", mode="before")
    @classmethod
    def _no_bool_budget(cls, v: object) -> object:
        # pydantic would read True as 1.0; a boolean budget is always a caller's mistake.
        if isinstance(v, bool):
            raise ValueError("budget must be a number in (0, 1], not a boolean")
        return v

    # ---- declarative requirements ------------------------------------------------------------
    @property
    def compresses(self) -> bool:
        """False when the policy can never evict a prompt token (``full``, or budget 1)."""
        return self.budget < 1.0

    @property
    def over_budget(self) -> str | None:
        """Why this configuration keeps other than ``ρ`` of a prompt's KV by design, or ``None``.

        Every default configuration keeps ``ρ`` (within 10 % on prompts of 512 tokens or more) unless its
        hard-protected tokens alone exceed the budget; replication variants of released code may not.
        """
        return None

    def stats_request(self, info: PromptInfo) -> StatsRequest:
        """Statistics the attention hook must collect for this prompt (default: none)."""
        return StatsRequest()

    # ---- stages -------------------------------------------------------------------------------
    def layer_budgets(self, stats: Sequence[LayerStats | None], info: PromptInfo) -> list[int]:
        """Tokens kept per layer (including the recent window). Default: ``round(ρ·N)`` everywhere."""
        b = budget_tokens(self.budget, info.num_tokens)
        return [b] * info.num_layers

    def recent_window(self, info: PromptInfo, budget: int) -> int:
        """Trailing prompt tokens always kept by a layer whose token budget is ``budget``."""
        return 0

    def protected(self, info: PromptInfo, layer: int) -> torch.Tensor | None:
        """``[N]`` bool: tokens that must be kept whatever their score (the budget grows if needed)."""
        return None

    def scores(self, stats: Sequence[LayerStats | None], info: PromptInfo, layer: int) -> torch.Tensor:
        """``[H_kv, N]`` importance of every prompt token for ``layer`` (higher = keep)."""
        raise NotImplementedError

    def merge_spec(self, info: PromptInfo) -> MergeSpec | None:
        """Merge rule for evicted tokens, or ``None`` to drop them."""
        return None

    def decode_spec(self, info: PromptInfo) -> DecodeSpec | None:
        """Decode-time eviction (``None``: the cache only grows after prefill)."""
        return None


def budget_tokens(ratio: float, n: int) -> int:
    """``round(ratio·n)`` clamped to ``[0, n]`` (half away from zero, so 0.5·3 → 2)."""
    return min(n, max(0, math.floor(ratio * n + 0.5)))


def block_tail_start(length: int, recent: int, granularity: int = 1) -> int:
    """Where a kept tail starts: the block boundary at or below ``length − recent``.

    The one formula prefill's :func:`layout`, decode flushes, the dense reference and the vLLM worker
    share (the tail is never evicted, so all of them must agree on where it begins).
    """
    g = max(1, granularity)
    return g * ((length - min(max(recent, 0), length)) // g)


def layout(
    n: int,
    recent: int,
    budget: float,
    granularity: int,
    protected: torch.Tensor | None = None,
) -> tuple[int, int]:
    """Where the kept tail starts and how many prefix tokens are kept, so that the layer keeps ``budget``.

    The recent window, the protected tokens and the block rounding all live *inside* the budget (ρ means
    ρ): the tail ``[tail_start, N)`` starts at a block boundary and holds at least ``min(recent, budget)``
    tokens; the prefix keeps a whole number of blocks, the protected ones included, nearest to what the
    budget leaves. Where that is impossible the layer keeps more, never silently less:

    * a tail plus protected blocks that overshoot the budget by more than half a block shorten the tail
      (whole blocks: the recent window gives way to protected tokens, never the reverse);
    * a prefix that rounds to nothing while a tail one block shorter leaves room for a block takes that
      block: a small layer keeps its best tokens (the attention sink) instead of its recent tail alone;
    * the last partial block always stays (decoding appends to it); protected tokens beyond the budget
      are all kept (e.g. ``text_prior="keep_all"``).

    Args:
        n: prompt length. ``recent``: trailing tokens the policy wants kept. ``budget``: tokens to keep,
            possibly fractional (the caller carries the block-rounding residual from layer to layer, so
            the totals over layers match the budgets within half a block: :func:`plan_compression`).
        granularity: the prefix keep count and ``tail_start`` are multiples of it (vLLM's block size, or 1).
        protected: ``[n + 1]`` cumulative count of hard-protected tokens (``protected[t]`` = those before
            ``t``), or ``None``.
    Returns:
        ``(tail_start, prefix_keep)``.
    """
    g = max(1, granularity)
    target = min(max(float(budget), 0.0), float(n))
    recent = min(max(recent, 0), n, math.floor(target))
    last = n if n % g == 0 else g * (n // g)  # shortest tail: the partial last block

    def fit(tail_start: int) -> tuple[int, float]:
        tail = n - tail_start
        n_prot = int(protected[tail_start]) if protected is not None else 0
        lo = min(tail_start, g * math.ceil(n_prot / g))
        prefix = min(tail_start, max(lo, g * math.floor((target - tail) / g + 0.5)))
        return prefix, tail + prefix - target

    tail_start = block_tail_start(n, recent, g)
    prefix, over = fit(tail_start)
    while over > g / 2 and tail_start + g <= last:
        shorter, over2 = fit(tail_start + g)
        if over2 >= over:  # the tokens that left the tail are protected ones: nothing to gain
            break
        tail_start, prefix, over = tail_start + g, shorter, over2
    if prefix == 0 and recent < target and tail_start > 0 and tail_start + g <= last:
        shorter, over2 = fit(tail_start + g)
        if shorter > 0 and abs(over2) <= abs(over):
            tail_start, prefix = tail_start + g, shorter
    return tail_start, prefix


def _protected_counts(masks: Sequence[torch.Tensor | None], n: int) -> torch.Tensor | None:
    """``[n + 1]``: the most protected tokens any of ``masks`` has before each position."""
    cums = [torch.cat([torch.zeros(1, dtype=torch.long), m.long().cumsum(0)]) for m in masks if m is not None]
    if not cums:
        return None
    return torch.stack(cums).amax(0)


def plan_compression(
    policy: KVPolicy,
    stats: Sequence[LayerStats | None],
    info: PromptInfo,
    granularity: int = 1,
    groups: Sequence[Sequence[int]] | None = None,
    layers: Collection[int] | None = None,
    frozen: int = 0,
) -> list[LayerPlan]:
    """Decide the kept tokens of every layer and KV head for one prompt.

    Args:
        stats: one entry per layer (``None`` where the policy collected nothing).
        granularity: see :func:`layout`. Block rounding is carried from one group to the next (error
            diffusion), so the kept total over all layers is within half a block of the budgets' sum
            wherever no protected set or partial last block forces more.
        groups: layers that share one block table (vLLM's ``--kv-groups``): they keep the same number of
            tokens and the same tail — the mean of their budgets — while each still selects its own
            tokens. ``None``: every layer on its own (the policy's budgets exactly).
        layers: the layers to select for (a pipeline stage's; their statistics are the only ones given);
            every layer's layout is still computed, as the carried rounding runs in layer order, and the
            other layers' plans keep everything. Only for :attr:`KVPolicy.layer_local` policies.
        frozen: the prompt's first ``frozen`` tokens are a shared prefix (docs/design.md, "Prefix caching"):
            kept in place unmerged in every layer (:attr:`LayerPlan.frozen`), while the budget applies to the
            rest of the prompt: a layer whose policy budget is ``b`` of ``N`` keeps ``frozen + b·(N −
            frozen)/N``, and at least ``frozen`` plus its recent window (a prefix far above ``ρ·N`` would
            otherwise leave no room for the question at the end of the prompt).
    """
    n, h = info.num_tokens, info.num_kv_heads
    frozen = min(max(frozen, 0), n)
    if len(stats) != info.num_layers:
        raise ValueError(f"got statistics for {len(stats)} layers, expected {info.num_layers}")
    if layers is not None and not policy.layer_local:
        raise ValueError(f"policy {policy.name!r} needs every layer's statistics to plan any layer")
    budgets = policy.layer_budgets(stats, info) if policy.compresses else [n] * info.num_layers
    groups = [[layer] for layer in range(info.num_layers)] if groups is None else groups
    if sorted(x for g in groups for x in g) != list(range(info.num_layers)):
        raise ValueError(f"groups must partition the {info.num_layers} layers, got {groups}")
    prot = [_with_frozen(policy.protected(info, layer), frozen, n) for layer in range(info.num_layers)]
    shape: dict[int, tuple[int, int]] = {}
    carry = 0.0  # token-layers the groups so far kept below (+) or above (−) their budgets by rounding
    # In layer order, whatever order the caller lists the groups in: the carried rounding must give the
    # same layouts on the vLLM path (groups in KV-cache-group order) as in the dense reference.
    for members in sorted(groups, key=min):
        b = min(n, math.floor(sum(budgets[m] for m in members) / len(members) + 0.5))
        if frozen:
            b = min(n, frozen + math.floor(b * (n - frozen) / n + 0.5))
        recent = policy.recent_window(info, b)
        if frozen:
            b = min(n, max(b, frozen + recent))
        target = b + carry / len(members)
        counts = _protected_counts([prot[m] for m in members], n)
        tail_start, prefix = layout(n, recent, target, granularity, counts)
        # Only a rounding residual (within half a block) travels on; an overshoot forced by protected
        # tokens or the partial last block is not taken back from later layers.
        residual = target - (n - tail_start) - prefix
        carry = len(members) * residual if abs(residual) <= max(1, granularity) / 2 else 0.0
        for m in members:
            shape[m] = (tail_start, prefix)
    # Select where the scores are: a GPU ranks [H, 8k] scores in microseconds, a CPU takes milliseconds
    # per layer. Layers of one layout (most of them: uniform budgets, or one group) are selected in one
    # call, their heads stacked — selection is per row, so the sets are the same as layer by layer. One
    # copy brings every layer's choice back.
    classes: dict[tuple[int, int], list[tuple[int, torch.Tensor, torch.Tensor | None]]] = {}
    for layer in range(info.num_layers):
        tail_start, k = shape[layer]
        if k == tail_start or (layers is not None and layer not in layers):
            continue
        sc = policy.scores(stats, info, layer)
        if sc.shape != (h, n):
            raise ValueError(f"{policy.name}.scores returned {tuple(sc.shape)}, expected ({h}, {n})")
        p = prot[layer][:tail_start].to(sc.device) if prot[layer] is not None else None
        classes.setdefault((tail_start, k), []).append((layer, sc[:, :tail_start], p))
    heads: dict[int, torch.Tensor] = {}
    for (tail_start, k), members in classes.items():
        scores, protected = _stacked(members, h, tail_start)
        chosen = select_topk(scores, k, protected)  # [m·H_kv, k]
        heads.update(zip([m[0] for m in members], chosen.view(len(members), h * k), strict=True))
    if heads:
        flat = torch.cat(list(heads.values())).cpu()
        heads = dict(zip(heads, flat.split([x.numel() for x in heads.values()]), strict=True))
    plans = []
    for layer in range(info.num_layers):
        tail_start, k = shape[layer]
        if layer in heads:
            tail = torch.arange(tail_start, n).expand(h, n - tail_start)
            keep = torch.cat([heads[layer].view(h, k), tail], dim=1)
        else:
            keep = torch.arange(n).expand(h, n).clone()
        plans.append(LayerPlan(keep=keep, tail_start=tail_start, prefix_keep=k, num_tokens=n, frozen=frozen))
    return plans


def _stacked(
    members: list[tuple[int, torch.Tensor, torch.Tensor | None]], h: int, n: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores ``[m·H_kv, n]`` and protected masks (or ``None``) of ``m`` layers, for one selection.

    Float64 scores anywhere stack as float64 (float32 values are exact in it: the order is unchanged)."""
    wide = any(sc.dtype == torch.float64 for _, sc, _ in members)
    scores = torch.cat([sc.double() if wide else sc.float() for _, sc, _ in members])
    if all(p is None for _, _, p in members):
        return scores, None
    masks = [
        torch.zeros(h, n, dtype=torch.bool, device=sc.device) if p is None else p.expand(h, n)
        for _, sc, p in members
    ]
    return scores, torch.cat(masks)


def _with_frozen(mask: torch.Tensor | None, frozen: int, n: int) -> torch.Tensor | None:
    """The policy's protected mask ``[N]`` with the frozen prefix ``[0, frozen)`` added."""
    if not frozen:
        return mask
    out = torch.zeros(n, dtype=torch.bool) if mask is None else mask.clone()
    out[:frozen] = True
    return out


def apply_plan(
    plan: LayerPlan, keys: torch.Tensor, values: torch.Tensor, merge: MergeSpec | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact one layer: ``keys``/``values`` ``[H_kv, N, d]`` → ``[H_kv, K_total, d]`` (merged if asked).

    The frozen prefix (:attr:`LayerPlan.frozen`) comes out as it went in: an evicted token whose merge
    target lies there is dropped instead (those blocks are shared and must match their hashes).
    """
    keep = plan.keep.to(keys.device)
    if plan.is_identity:
        return keys, values
    evict = complement(keep, plan.num_tokens)
    if merge is None:
        evict = evict[:, :0]
        return merge_kv(keys, values, keep, evict, "average")
    k2, v2 = merge_kv(
        keys,
        values,
        keep,
        evict,
        merge.kind,
        merge_keys=merge.merge_keys,
        similarity_filter=merge.similarity_filter,
        misaligned_source=merge.misaligned_source,
    )
    if plan.frozen:
        # Every head keeps [0, frozen) first (ascending, all protected): the first slots of each row.
        f = min(plan.frozen, plan.num_kept)
        k2[:, :f], v2[:, :f] = keys[:, :f], values[:, :f]
    return k2, v2
