"""Text-prior scoring shared by LOOK-M and MEDA."""

from __future__ import annotations

from typing import Literal

import torch

TextPrior = Literal["bonus", "keep_all", "none"]


def text_prior_scores(colsum: torch.Tensor, text_mask: torch.Tensor, prior: TextPrior) -> torch.Tensor:
    """Accumulated attention with the paper's text prior.

    ``bonus`` (LOOK-M Eq. 5, MEDA Eq. 9): ``A_s[T] += max(A_s)`` per KV head, so text outranks vision
    but still competes for the budget. ``keep_all`` is enforced through ``protected`` instead (released
    code), and ``none`` leaves the scores alone. ``colsum``: ``[H_kv, N]``; ``text_mask``: ``[N]``.
    """
    if prior != "bonus":
        return colsum
    bonus = colsum.amax(dim=1, keepdim=True)
    # Fix: move the (CPU) prompt mask to the statistics' device; stats collected on the GPU crashed here.
    return colsum + bonus * text_mask.to(device=colsum.device, dtype=colsum.dtype).unsqueeze(0)
