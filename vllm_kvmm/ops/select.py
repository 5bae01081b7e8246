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
    # Stable lexicographic order: (protected desc, score desc, index asc).
    # Float64 scores stay float64 (the text prior's two-tier scores need the low bits); others sort in fp32.
    keyed = scores if scores.dtype == torch.float64 else scores.float()
    order = torch.argsort(keyed, dim=-1, descending=True, stable=True)
    if protected is not None:
        prot = protected.expand(h, n) if protected.dim() == 1 else protected
        prot_sorted = torch.gather(prot.to(torch.int8), 1, order)
        order = torch.gather(order, 1, torch.argsort(prot_sorted, dim=-1, descending=True, stable=True))
    return order[:, :k].sort(dim=-1).values


def complement(keep: torch.Tensor, n: int) -> torch.Tensor:
    """Indices in ``[0, n)`` not in ``keep``, per head: ``[H_kv, K]`` → ``[H_kv, n − K]``, ascending."""
    h, kk = keep.shape
    mask = torch.ones(h, n, dtype=torch.bool, device=keep.device)
    mask.scatter_(1, keep, False)
    return torch.nonzero(mask)[:, 1].view(h, n - kk)
