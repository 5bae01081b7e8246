"""Budget arithmetic shared by the per-layer policies."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["clamped_softmax_ratios", "round_preserving_sum"]


def round_preserving_sum(values: Sequence[float], total: int, cap: int | None = None) -> list[int]:
    """Round non-negative ``values`` to integers summing exactly to ``total`` (largest remainder).

    Units go to the largest remainders first and, when the floors already exceed ``total`` (the values sum
    to more than ``total``), come off the smallest remainders first; ties go to the lower index, so the
    result is deterministic. With ``cap`` (values ``≤ cap``, ``total ≤ len·cap``) no result exceeds
    ``cap``: a unit that would push a value past it goes to the next value in remainder order instead
    (cycling if needed), so the sum stays exact. No result goes below 0.
    """
    if total < 0 or (cap is not None and total > len(values) * cap):
        raise ValueError(f"cannot share {total} among {len(values)} values within [0, {cap}]")
    floors = [math.floor(v) for v in values]
    rest = total - sum(floors)
    order = sorted(range(len(values)), key=lambda i: (-(values[i] - floors[i]), i))
    # Fix: without the cap, MEDA gave a spare unit to a layer already at N tokens, and the caller's
    # min(N, ·) then silently dropped it (e.g. [5, 5, 0.5] → 12 became [5, 5, 1]).
    while rest > 0:
        room = [i for i in order if cap is None or floors[i] < cap][:rest]
        if not room:
            break
        for i in room:
            floors[i] += 1
        rest -= len(room)
    # Fix: this function used to only add units, so values summing past ``total`` (MEDA's ratios sum to
    # L·ρ, the token total is L·round(ρN)) rounded to more than ``total``: [100.1, 100.1, 21.2, 20.2]
    # with total 240 gave 241.
    down = sorted(range(len(values)), key=lambda i: (values[i] - floors[i], i))
    while rest < 0:
        room = [i for i in down if floors[i] > 0][:-rest]
        for i in room:
            floors[i] -= 1
        rest += len(room)
    return floors


def clamped_softmax_ratios(
    scores: torch.Tensor, total: float, lo: float, hi: float, renormalize: bool = True
) -> torch.Tensor:
    """Per-layer keep ratios ``softmax(scores)·total`` clamped to ``[lo, hi]``.

    With ``renormalize`` (MEDA paper: budgets sum to ``L·ρ``) the ratios are ``clamp(c·w_l, lo, hi)``
    with the one scale ``c`` that makes them sum to ``total`` (found by bisection; the sum is monotone
    in ``c``), so unclamped layers keep the softmax proportions. Without it, this is the released MEDA
    code: ``clamp(w_l·total, lo, hi)`` once, and the sum may drift from ``total``.

    ``scores``: ``[L]``; returns ``[L]`` float64 ratios.
    """
    w = torch.softmax(scores.double(), dim=0)
    if not renormalize:
        return (w * total).clamp(lo, hi)
    n = w.numel()
    if not n * lo - 1e-9 <= total <= n * hi + 1e-9:
        raise ValueError(f"cannot share {total:.4f} among {n} layers within [{lo}, {hi}]")
    c_lo, c_hi = 0.0, hi / max(float(w.min()), 1e-300)
    for _ in range(200):
        c = 0.5 * (c_lo + c_hi)
        if float((c * w).clamp(lo, hi).sum()) < total:
            c_lo = c
        else:
            c_hi = c
    return (c_hi * w).clamp(lo, hi)
