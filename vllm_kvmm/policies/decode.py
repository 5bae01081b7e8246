"""Decode-time eviction at flush points (pure torch), shared by the dense reference and the vLLM path.

See docs/decode-eviction.md. Between flushes a layer's cache only grows; at a flush the policy re-selects
the stored tokens. The stored tokens of one layer differ per KV head (prefill selected per head), so the
state is per head: ``positions[h, s]`` is the true position of stored slot ``s`` of head ``h``.

Layout (as after prefill): the tokens from ``tail_start = g·⌊(L − recent)/g⌋`` to ``L − 1`` are all kept in
place; exactly ``K = g·k`` older tokens are kept per head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from vllm_kvmm.ops import complement, decode_scores, select_topk
from vllm_kvmm.policies.base import block_tail_start

__all__ = [
    "DecodeSpec",
    "FlushInput",
    "FlushPlan",
    "StoredSlots",
    "bin_offset",
    "flush_tail_start",
    "insert_bin",
    "plan_flush",
    "plan_flushes",
    "query_weights",
    "rescore",
]


@dataclass(frozen=True, slots=True)
class DecodeSpec:
    """How a policy evicts while decoding.

    ``kind``: ``"score"`` keeps the best accumulated attention (H2O), ``"window"`` the first ``sinks`` and
    the most recent tokens (StreamingLLM), ``"bin"`` is HAE's recycle bin: like ``"score"``, but the
    tokens that fall out wait in a bin (stored, outside attention) where a recovered score can bring them
    back, until ``bin_size`` of them wait and the bin is purged. ``interval``: generated tokens between
    flushes. ``recent``: newest tokens always kept. ``capacity``: tokens a layer may hold right after a
    flush (``None``: what prefill kept for that layer).
    """

    kind: Literal["score", "window", "bin"]
    interval: int
    recent: int
    sinks: int = 0
    capacity: int | None = None
    bin_size: int = 0
    decay: float = 1.0  # scores evolve as s ← decay·s + a per generated token


@dataclass(frozen=True, slots=True)
class FlushPlan:
    """``keep``: ``[H_kv, K_total]`` stored slots kept per head (prefix in slot order, then the tail);
    ``binned``: ``[H_kv, B]`` slots that wait in the recycle bin (``"bin"`` only; empty after a purge)."""

    keep: torch.Tensor
    tail_start: int
    prefix_keep: int
    binned: torch.Tensor | None = None

    @property
    def num_kept(self) -> int:
        return self.keep.shape[1]


def flush_tail_start(length: int, recent: int, granularity: int, tail_floor: int) -> int:
    """Where a flush's kept tail starts: at least ``recent`` newest tokens, never before ``tail_floor``.

    ``tail_floor`` is where the current tail starts (prefill's layout, or the last flush): tokens before
    it were compacted, so a tail may not reach back into them — prefill's layout can start the tail later
    than ``length − recent`` (protected tokens, HAE's text, a shortened recent window), and a decode
    ``recent`` may exceed prefill's.
    """
    return max(block_tail_start(length, recent, granularity), tail_floor)


def plan_flush(
    spec: DecodeSpec,
    positions: torch.Tensor,
    scores: torch.Tensor,
    length: int,
    capacity: int,
    granularity: int = 1,
    tail_floor: int = 0,
    frozen: int = 0,
) -> FlushPlan:
    """Choose the stored slots to keep at a flush.

    Args:
        positions: ``[H_kv, S]`` true positions of the stored slots: first every slot older than the
            new tail (any order: kept prefix, then the bin for ``"bin"``), then the tail, ascending; every
            position from the previous tail start to ``length − 1`` is stored (the tail is never evicted).
        scores: ``[H_kv, S]`` accumulated attention of the stored slots (``"score"`` policies).
        length: tokens in the sequence so far (the next token's position).
        capacity: tokens to keep per head; granularity: the block size (prefix kept in whole blocks).
        tail_floor: where the current tail starts (:func:`flush_tail_start`).
        frozen: positions ``[0, frozen)`` are a shared prefix (:attr:`~vllm_kvmm.policies.LayerPlan.frozen`):
            always kept, whatever their score and the capacity, and first in slot order as they were.
    """
    h, s = positions.shape
    g = max(1, granularity)
    tail_start = flush_tail_start(length, spec.recent, g, tail_floor)
    in_prefix = positions < tail_start  # [H, S]
    n_prefix = int(in_prefix[0].sum())
    if not bool((in_prefix.sum(1) == n_prefix).all()):
        raise ValueError("heads disagree on how many stored tokens precede the tail")
    n_tail = s - n_prefix
    if n_tail != length - tail_start:
        raise ValueError(
            f"stored tail holds {n_tail} tokens, expected {length - tail_start}: a tail was evicted"
        )
    k = g * (max(0, capacity - n_tail) // g)
    sinks = min(spec.sinks, n_prefix)
    if sinks > k:
        k = g * math.ceil(sinks / g)
    frozen_mask = positions[:, :n_prefix] < frozen if frozen else None
    n_frozen = int(frozen_mask[0].sum()) if frozen_mask is not None else 0
    if n_frozen > k:
        k = g * math.ceil(n_frozen / g)
    k = min(k, n_prefix)
    prefix_slots = torch.arange(n_prefix)
    if k == n_prefix:
        head = prefix_slots.expand(h, n_prefix)
    elif spec.kind in ("score", "bin"):
        head = select_topk(scores[:, :n_prefix].double(), k, frozen_mask)
    else:  # window: sinks (and the frozen prefix) first, then the most recent of the prefix
        rank = positions[:, :n_prefix].double()
        protected = positions[:, :n_prefix] < max(spec.sinks, frozen)
        head = select_topk(rank, k, protected)
    keep = torch.cat([head, torch.arange(n_prefix, s).expand(h, n_tail)], dim=1)
    binned = None
    if spec.kind == "bin":
        rest = complement(head, n_prefix) if k < n_prefix else head[:, :0]
        binned = rest if rest.shape[1] < max(1, spec.bin_size) else rest[:, :0]  # full bin: purge it
    return FlushPlan(keep=keep, tail_start=tail_start, prefix_keep=k, binned=binned)


@dataclass(frozen=True, slots=True)
class FlushInput:
    """One layer of one request at a flush, as :func:`plan_flush` takes it (``positions``, ``scores``:
    ``[H_kv, S]``; ``tail_floor``: :func:`flush_tail_start`; ``frozen``: the shared prefix)."""

    spec: DecodeSpec
    positions: torch.Tensor
    scores: torch.Tensor
    length: int
    capacity: int
    tail_floor: int = 0
    frozen: int = 0


def plan_flushes(inputs: Sequence[FlushInput], granularity: int = 1) -> list[FlushPlan]:
    """:func:`plan_flush` for many layers (of one request or of many) at once, equal to planning each alone.

    Inputs whose plans share every number :func:`plan_flush` derives per layer (spec, length, frozen
    prefix, stored slots, slots older than the new tail, frozen slots, capacity, tail floor) are planned as
    one stack of rows: :func:`plan_flush` treats rows (heads) independently given those numbers, so a stack
    of ``L`` layers is one top-k over ``[L·H_kv, S]`` instead of ``L`` calls (the flush's cost was per-layer
    call overhead, docs/benchmarks.md).
    """
    g = max(1, granularity)
    classes: dict[tuple, list[int]] = {}
    for i, x in enumerate(inputs):
        pos = x.positions
        tail_start = flush_tail_start(x.length, x.spec.recent, g, x.tail_floor)
        n_prefix = int((pos[0] < tail_start).sum())
        n_frozen = int((pos[0, :n_prefix] < x.frozen).sum()) if x.frozen else 0
        key = (x.spec, x.length, x.frozen, *pos.shape, n_prefix, n_frozen, x.capacity, x.tail_floor)
        classes.setdefault(key, []).append(i)
    plans: dict[int, FlushPlan] = {}
    for members in classes.values():
        first = inputs[members[0]]
        h = first.positions.shape[0]
        pos = torch.cat([inputs[i].positions for i in members])
        score = torch.cat([inputs[i].scores for i in members])
        plan = plan_flush(
            first.spec, pos, score, first.length, first.capacity, granularity, first.tail_floor, first.frozen
        )
        keep = plan.keep.split(h)
        binned = plan.binned.split(h) if plan.binned is not None else [None] * len(members)
        for i, kp, bn in zip(members, keep, binned, strict=True):
            plans[i] = FlushPlan(kp, plan.tail_start, plan.prefix_keep, bn)
    return [plans[i] for i in range(len(inputs))]


def bin_offset(positions: torch.Tensor, tail_start: int) -> int:
    """Where the recycle bin goes in the stored slot order: after the slots older than the new tail
    (``tail_start``: :func:`flush_tail_start`); ``positions``: ``[H_kv, S]`` (heads agree on the count)."""
    return int((positions[0] < tail_start).sum())


def insert_bin(a: torch.Tensor, b: torch.Tensor, m: int) -> torch.Tensor:
    """``a`` ``[H_kv, S, ...]`` with the bin's ``b`` ``[H_kv, B, ...]`` inserted before slot ``m``."""
    return torch.cat([a[:, :m], b.to(a.device), a[:, m:]], 1)


def query_weights(spec: DecodeSpec, w: int) -> torch.Tensor:
    """``[W]`` float64: the weight of each of the ``W`` decode queries since the last flush, oldest first
    (``decay^(W−1−w)``), for :func:`~vllm_kvmm.ops.decode_scores`."""
    return spec.decay ** torch.arange(w - 1, -1, -1, dtype=torch.float64)


def rescore(spec: DecodeSpec, score: torch.Tensor, fresh: torch.Tensor, w: int) -> torch.Tensor:
    """Accumulated scores after ``W`` decode queries: ``s ← decay^W·s + fresh`` (float64, CPU)."""
    return score * spec.decay**w + fresh


@dataclass(frozen=True, slots=True)
class StoredSlots:
    """One layer's stored tokens of one request at a flush, in the slot order :func:`plan_flush` expects.

    ``k``, ``v``: ``[H_kv, S, d]``; ``pos``: ``[H_kv, S]`` true positions; ``score``: ``[H_kv, S]`` float64
    (CPU). Built the same way by the dense reference and the vLLM worker (:meth:`with_bin`,
    :meth:`rescored`), so that both plan from identical inputs.
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    score: torch.Tensor

    def with_bin(self, binned: StoredSlots | None, tail_start: int) -> StoredSlots:
        """The recycle bin's slots (stored outside attention) inserted between the slots older than the
        new tail (``tail_start``: :func:`flush_tail_start`) and the tail."""
        if binned is None or binned.pos.shape[1] == 0:
            return self
        m = bin_offset(self.pos, tail_start)
        b = binned
        return StoredSlots(
            insert_bin(self.k, b.k, m), insert_bin(self.v, b.v, m), insert_bin(self.pos, b.pos, m),
            insert_bin(self.score, b.score, m),
        )  # fmt: skip

    def rescored(
        self, spec: DecodeSpec, queries: torch.Tensor, q_positions: torch.Tensor, scale: float
    ) -> StoredSlots:
        """Scores after the ``W`` decode queries ``[H, W, d]`` since the last flush: ``s ← decay^W·s + Σ_w
        decay^(W−1−w)·a_w`` (binned slots are scored as if active: they are stored, so q·k is at hand)."""
        fresh = decode_scores(
            queries, self.k, self.pos, q_positions, scale, query_weights(spec, queries.shape[1])
        )
        return StoredSlots(self.k, self.v, self.pos, rescore(spec, self.score, fresh.cpu(), queries.shape[1]))

    def take(self, idx: torch.Tensor) -> StoredSlots:
        """The slots ``idx`` ``[H_kv, n]`` of every head."""
        kv_idx = idx.to(self.k.device)[..., None].expand(-1, -1, self.k.shape[2])
        return StoredSlots(
            torch.gather(self.k, 1, kv_idx),
            torch.gather(self.v, 1, kv_idx),
            torch.gather(self.pos, 1, idx),
            torch.gather(self.score, 1, idx),
        )
