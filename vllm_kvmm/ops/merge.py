"""LOOK-M / MEDA KV merging: evicted tokens are folded into their cosine-nearest kept key (pure torch).

For kept token ``j`` with assigned evicted set ``N_j`` (``i → argmax_j cos(k_i, k_j)``, per KV head,
similarity on keys only; values follow the keys' assignment):

* ``average``:  ``x_j ← (x_j + Σ_{i∈N_j} x_i) / (1 + |N_j|)``               (LOOK-M Eq. 10, MEDA Eq. 12)
* ``pivot``:    ``x_j ← (x_j + Σ_{i∈N_j} (x_i + x_j)/2) / (1 + |N_j|)``     (LOOK-M Eq. 11)
* ``weighted``: ``x_j ← (x_j + Σ_{i∈N_j} s_ij x_i) / (1 + |N_j|)``           (LOOK-M Eq. 12, raw cosine)
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["MergeKind", "merge_kv", "nearest_kept"]

MergeKind = Literal["average", "pivot", "weighted"]


def nearest_kept(
    keys: torch.Tensor, keep: torch.Tensor, evict: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine-nearest kept token for every evicted token, per KV head.

    Args:
        keys: ``[H_kv, N, d]``; ``keep``: ``[H_kv, K]``; ``evict``: ``[H_kv, E]`` (indices into ``N``).
        chunk: evicted rows per similarity block (the largest temporary is ``[H_kv, chunk, K]``).
    Returns:
        ``(target, sim)``: ``[H_kv, E]`` positions in ``keep`` (0..K-1) and the cosine similarities.
    """
    h, e = evict.shape
    kn = torch.nn.functional.normalize(keys.float(), dim=-1)
    kept = torch.gather(kn, 1, keep.unsqueeze(-1).expand(-1, -1, kn.shape[-1]))  # [H, K, d]
    target = torch.empty(h, e, dtype=torch.long, device=keys.device)
    sim = torch.empty(h, e, dtype=torch.float32, device=keys.device)
    for s in range(0, e, chunk):
        idx = evict[:, s : s + chunk]
        ev = torch.gather(kn, 1, idx.unsqueeze(-1).expand(-1, -1, kn.shape[-1]))  # [H, c, d]
        best = torch.einsum("hcd,hkd->hck", ev, kept).max(-1)
        target[:, s : s + chunk] = best.indices
        sim[:, s : s + chunk] = best.values
    return target, sim


def merge_kv(
    keys: torch.Tensor,
    values: torch.Tensor,
    keep: torch.Tensor,
    evict: torch.Tensor,
    kind: MergeKind,
    *,
    merge_keys: bool = True,
    similarity_filter: bool = False,
    misaligned_source: bool = False,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the kept tokens and merge the evicted ones into them.

    Args:
        keys, values: ``[H_kv, N, d]``.
        keep: ``[H_kv, K]`` kept indices; ``evict``: ``[H_kv, E]`` evicted indices (disjoint from ``keep``).
        kind: merge rule (module docstring).
        merge_keys: merge keys as well as values (``False`` is safer with M-RoPE, where averaging
            post-RoPE keys of different positions corrupts attention).
        similarity_filter: LOOK-M A/W-merge and MEDA code: merge only evicted slot ``i`` whose head-mean
            best similarity ``mean_h max_j s[h, i, j]`` is at least the mean over all ``(h, i)``. Slot
            ``i`` is the i-th evicted token of each head (as in the released code).
        misaligned_source: reproduce MEDA's released-code bug: the filtered slots' targets are paired with
            the *first* ``|F|`` evicted tokens instead of the filtered ones (needs ``similarity_filter``).
    Returns:
        ``(keys_kept, values_kept)``, each ``[H_kv, K, d]`` in the order of ``keep``.
    """
    d = keys.shape[-1]
    gk = keep.unsqueeze(-1).expand(-1, -1, d)
    k_out = torch.gather(keys, 1, gk)
    v_out = torch.gather(values, 1, gk)
    if evict.shape[1] == 0 or keep.shape[1] == 0:
        return k_out, v_out
    target, sim = nearest_kept(keys, keep, evict, chunk)
    src = evict
    if similarity_filter:
        best = sim.mean(0)  # [E] head-mean best similarity of evicted slot i
        slots = torch.nonzero(best >= sim.mean()).flatten()
        target, sim = target[:, slots], sim[:, slots]
        src = evict[:, : slots.numel()] if misaligned_source else evict[:, slots]
    elif misaligned_source:
        raise ValueError("misaligned_source reproduces a bug of the filtered merge; set similarity_filter")
    k_out = _merge_one(keys, k_out, src, target, sim, kind) if merge_keys else k_out
    v_out = _merge_one(values, v_out, src, target, sim, kind)
    return k_out, v_out


def _merge_one(
    x: torch.Tensor, kept: torch.Tensor, src: torch.Tensor, target: torch.Tensor, sim: torch.Tensor, kind: str
) -> torch.Tensor:
    h, k, d = kept.shape
    xs = torch.gather(x, 1, src.unsqueeze(-1).expand(-1, -1, d)).float()  # [H, E, d]
    if kind == "weighted":
        xs = xs * sim.unsqueeze(-1)
    elif kind == "pivot":
        xs = xs * 0.5
    elif kind != "average":
        raise ValueError(f"unknown merge kind {kind!r}")
    acc = torch.zeros(h, k, d, dtype=torch.float32, device=x.device)
    acc.scatter_add_(1, target.unsqueeze(-1).expand(-1, -1, d), xs)
    cnt = torch.zeros(h, k, dtype=torch.float32, device=x.device)
    cnt.scatter_add_(1, target, torch.ones_like(target, dtype=torch.float32))
    base = kept.float()
    self_w = 1.0 + 0.5 * cnt if kind == "pivot" else torch.ones_like(cnt)
    out = (base * self_w.unsqueeze(-1) + acc) / (1.0 + cnt).unsqueeze(-1)
    return out.to(kept.dtype)
