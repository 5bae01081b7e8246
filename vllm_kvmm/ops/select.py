"""Score reduction, pooling and per-head top-k selection with protected sets (pure torch)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["complement", "pool1d", "reduce_heads", "select_topk"]


def reduce_heads(x: torch.Tensor, num_kv_heads: int, how: Literal["mean", "max"] = "mean") -> torch.Tensor:
    """Reduce query-head scores ``[H, ...]`` to KV heads ``[H_kv, ...]`` over each GQA group."""
    h = x.shape[0]
    if h % num_kv_heads:
        raise ValueError(f"{h} query heads are not a multiple of {num_kv_heads} KV heads")
    grouped = x.reshape(num_kv_heads, h // num_kv_heads, *x.shape[1:])
    return grouped.mean(1) if how == "mean" else grouped.amax(1)


def pool1d(scores: torch.Tensor, kernel: int, kind: Literal["avg", "max", "none"] = "avg") -> torch.Tensor:
    """SnapKV's smoothing: 1-D pooling along tokens, stride 1, padding ``kernel // 2``.

    ``scores``: ``[H_kv, n]`` → ``[H_kv, n]``. Average pooling counts the zero padding (as SnapKV does).
    """
    if kind == "none" or kernel <= 1 or scores.shape[-1] == 0:
        return scores
    if kernel % 2 == 0:
        raise ValueError(f"pooling kernel must be odd, got {kernel}")
    x = scores.unsqueeze(0)
    pad = kernel // 2
    y = F.avg_pool1d(x, kernel, 1, pad) if kind == "avg" else F.max_pool1d(x, kernel, 1, pad)
    return y.squeeze(0)


def select_topk(scores: torch.Tensor, k: int, protected: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head top-``k`` token indices, protected tokens first, returned in ascending order.

    Args:
        scores: ``[H_kv, n]`` (higher = more important).
        k: tokens to keep per head, ``0 ≤ k ≤ n``.
        protected: ``[n]`` or ``[H_kv, n]`` bool; protected tokens outrank all others. If more than ``k``
            are protected, the ``k`` best-scoring protected ones are kept.
    Returns:
        ``[H_kv, k]`` int64, sorted ascending. Ties go to the lower index.
    """
    h, n = scores.shape
    if not 0 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} tokens")
    if k == n:
        return torch.arange(n, device=scores.device).expand(h, n).clone()
    if k == 0:
        return torch.empty(h, 0, dtype=torch.int64, device=scores.device)
    # Float64 scores stay float64 (the text prior's two-tier scores need the low bits); others rank in fp32.
    # NaN ranks above everything, as in torch.sort (scores never hold NaN; this keeps the count exact).
    keyed = scores if scores.dtype == torch.float64 else scores.float()
    keyed = keyed.nan_to_num(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    if protected is None:
        mask = _top_mask(keyed, torch.full((h, 1), k, device=keyed.device), None, k)
    else:
        prot = (protected.expand(h, n) if protected.dim() == 1 else protected).bool()
        k_prot = prot.sum(-1, keepdim=True).clamp(max=k)
        mask = _top_mask(keyed, k_prot, prot, k) | _top_mask(keyed, k - k_prot, ~prot, k)
    # Exactly k per head: each kept token's rank among the kept is its column (ascending by index).
    col = torch.where(mask, mask.cumsum(-1) - 1, k)
    out = torch.empty(h, k + 1, dtype=torch.int64, device=keyed.device)
    out.scatter_(1, col, torch.arange(n, device=keyed.device).expand(h, n))
    return out[:, :k].contiguous()


def _top_mask(keyed: torch.Tensor, count: torch.Tensor, allowed: torch.Tensor | None, k: int) -> torch.Tensor:
    """``[H, n]`` bool: per head the ``count`` best of the ``allowed`` tokens, ties to the lower index.

    Exact stable top-k without a full sort (a sort of every head's scores took ~40 % of SnapKV's
    compression step on a CPU): the ``count``-th largest value is the threshold; every token above it is
    kept, and of those equal to it the first ones until ``count`` are reached. No host synchronisation.

    Args:
        keyed: ``[H, n]`` float scores, no NaN.
        count: ``[H, 1]`` int64, ``0 ≤ count ≤ min(k, allowed per head)``.
        allowed: ``[H, n]`` bool, or ``None`` for every token.
        k: an upper bound of ``count`` (``topk`` takes one ``k`` for all heads), ``1 ≤ k ≤ n``.
    """
    pool = keyed if allowed is None else keyed.masked_fill(~allowed, float("-inf"))
    best = pool.topk(k, dim=-1).values  # [H, k], descending
    threshold = best.gather(1, (count - 1).clamp(min=0))
    above = pool > threshold
    equal = pool == threshold
    if allowed is not None:  # a disallowed token is -inf, equal to a threshold of -inf
        above &= allowed
        equal &= allowed
    need = count - above.sum(-1, keepdim=True)
    return (above | (equal & (equal.cumsum(-1) <= need))) & (count > 0)


def complement(keep: torch.Tensor, n: int) -> torch.Tensor:
    """Indices in ``[0, n)`` not in ``keep``, per head: ``[H_kv, K]`` → ``[H_kv, n − K]``, ascending."""
    h, kk = keep.shape
    mask = torch.ones(h, n, dtype=torch.bool, device=keep.device)
    mask.scatter_(1, keep, False)
    return torch.nonzero(mask)[:, 1].view(h, n - kk)
