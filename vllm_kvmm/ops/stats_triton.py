"""Triton kernels for the prefill attention statistics of :mod:`vllm_kvmm.ops.stats` (flash-style).

The torch path forms a ``[H, chunk, N]`` probability block per query chunk and reduces it; on an 8k
prompt with 32 heads that is gigabytes of memory traffic per layer, several times the attention itself.
These kernels recompute ``q·k`` tile by tile instead and keep only the reductions, so memory stays
``O(H·N)`` and the cost is a few passes of attention-like arithmetic:

1. ``_row_stats``: per (query tile, head), an online softmax over the visible keys gives each row's
   log-sum-exp, its entropy ``lse − Σ p·z`` and its probability mass on vision and on text keys.
2. ``_col_stats``: per (key tile, head), ``p = exp(z − lse)`` summed over the queries at or after three
   row thresholds: all rows (``colsum``), the observation window, and the text after the last image (HAE).
3. ``_t2v_max``: per key tile, the head-summed map of HAE's text rows, maximised over rows.
4. ``_cross_entropy``: per (query tile, share of the key tiles), MEDA's head-averaged map renormalised
   over the other modality (``Σ_h p_h / (m_h·H)``) and its rows' partial entropies.

:func:`block_stats` is the one entry point; :class:`~vllm_kvmm.ops.stats.StatsAccumulator` calls it in
place of its torch block when the tensors live on a GPU (``kernels="auto"``). On CPU tensors the same
kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), which is how the tests check them against
the torch path without a GPU (slowly: it is numpy underneath).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None

__all__ = ["BlockStats", "block_stats", "triton_available"]

_NEVER = 2**31 - 1  # a row threshold no position reaches (int32: kernels take it as i32)


def triton_available() -> bool:
    """Whether the kernels can run at all (on a GPU, or interpreted on CPU tensors)."""
    return triton is not None


@dataclass(frozen=True, slots=True)
class BlockStats:
    """Statistics of the queries at positions ``start + row_step·i`` (``[start, start + n_q)`` unless
    sampled); ``n_vis`` (the last position + 1) keys.

    Per query head, before any GQA or head reduction: ``entropy`` ``[H, n_q]`` row entropies of the
    causal map; ``colsum``, ``window``: ``[H, n_vis]`` probability each key received from the rows at or
    after the colsum / window thresholds. Head-summed: ``t2v_sum``, ``t2v_max`` ``[n_vis]`` the sum and
    the row-maximum of ``Σ_h p_h`` over the rows at or after the HAE threshold (all keys; the caller
    masks vision keys). ``cross``: ``[n_q]`` entropy of each row's head-averaged map renormalised over the
    other modality's keys (text rows → vision keys, vision rows → text keys; 0 with no such key).
    """

    entropy: torch.Tensor | None = None
    colsum: torch.Tensor | None = None
    window: torch.Tensor | None = None
    t2v_sum: torch.Tensor | None = None
    t2v_max: torch.Tensor | None = None
    cross: torch.Tensor | None = None


def block_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    start: int,
    scale: float,
    vision: torch.Tensor,
    *,
    entropy: bool = False,
    colsum_from: int | None = None,
    window_from: int | None = None,
    t2v_from: int | None = None,
    cross: bool = False,
    row_step: int = 1,
    block_m: int = 64,
    block_n: int = 64,
    cross_splits: int = 8,
) -> BlockStats:
    """Attention statistics of one block of prompt queries, without materialising the attention map.

    Args:
        q: ``[n_q, H, d]`` post-RoPE queries of positions ``start + row_step·i`` (``[start, start + n_q)``
            by default; a strided view is not copied).
        k: ``[n_k, H_kv, d]`` post-RoPE keys of positions ``[0, n_k)``, ``n_k`` ≥ the last position + 1.
        vision: ``[≥ n_vis]`` bool, ``True`` at vision positions (on ``q``'s device).
        colsum_from / window_from / t2v_from: absolute positions; queries at or after them count
            towards ``colsum`` / ``window`` / ``t2v_*`` (``None``: not computed; the last two only with
            ``row_step`` 1).
        entropy, cross: compute the row entropies / MEDA's cross-modal entropies.
        row_step: sampled rows (:class:`~vllm_kvmm.ops.StatsRequest`'s ``entropy_step`` and
            ``colsum_step``); ``colsum`` is then the plain sum over the given rows (the caller scales it).
    """
    if triton is None:
        raise RuntimeError("the Triton statistics kernels need the `triton` package")
    n_q, h, d = q.shape
    if row_step < 1 or (row_step > 1 and not (window_from is None and t2v_from is None)):
        raise ValueError(f"row_step {row_step}: the window and text→vision sums need every row (row_step 1)")
    n_vis = start + (n_q - 1) * row_step + 1
    h_kv = k.shape[1]
    if h % h_kv or k.shape[0] < n_vis or k.shape[2] != d or vision.shape[0] < n_vis:
        raise ValueError(
            f"q {tuple(q.shape)} at {start}, k {tuple(k.shape)}, vision {tuple(vision.shape)} do not fit"
        )
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k[:n_vis]
    k = k if k.stride(-1) == 1 else k.contiguous()
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    dev = q.device
    vis = vision[:n_vis].to(torch.int8)
    kern = _kernels(dev)
    common: dict[str, Any] = dict(
        GROUP=h // h_kv,
        D=d,
        BD=max(16, triton.next_power_of_2(d)),
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )
    f32 = torch.float32
    lse = torch.empty(h, n_q, dtype=f32, device=dev)
    ent = torch.empty(h, n_q, dtype=f32, device=dev)
    mass = torch.empty(2, h, n_q, dtype=f32, device=dev)  # vision, text
    kern["row"][(triton.cdiv(n_q, block_m), h)](
        q, k, vis, lse, ent, mass, n_q, start, row_step, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), h * n_q,
        BM=block_m, BN=block_n, **common,
    )  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    if entropy:
        out["entropy"] = ent
    thresholds = (colsum_from, window_from, t2v_from)
    if any(t is not None for t in thresholds):
        c, w, t = (_NEVER if x is None else max(x, start) for x in thresholds)
        cols = torch.zeros(3, h, n_vis, dtype=f32, device=dev)
        kern["col"][(triton.cdiv(n_vis, block_n), h)](
            q, k, lse, cols, n_q, start, row_step, scale, c, w, t,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), h * n_vis,
            BM=block_m, BN=block_n, **common,
        )  # fmt: skip
        if colsum_from is not None:
            out["colsum"] = cols[0]
        if window_from is not None:
            out["window"] = cols[1]
        if t2v_from is not None:
            out["t2v_sum"] = cols[2].sum(0)
            t2v_max = torch.zeros(n_vis, dtype=f32, device=dev)
            if t < n_vis:
                kern["t2v"][(triton.cdiv(n_vis, block_n),)](
                    q, k, lse, t2v_max, n_q, start, scale, t, h,
                    q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                    BM=block_m, BN=block_n, **common,
                )  # fmt: skip
            out["t2v_max"] = t2v_max
    if cross:
        # Each row's entropy is a sum over key tiles: split them over programs (the causal triangle
        # would otherwise leave the last row tile's program doing all of them alone) and add the
        # partial sums here, in a fixed order, rather than with atomics.
        splits = max(1, min(cross_splits, triton.cdiv(n_vis, block_n)))
        ce = torch.empty(splits, n_q, dtype=f32, device=dev)
        kern["cross"][(triton.cdiv(n_q, block_m), splits)](
            q, k, vis, lse, mass, ce, n_q, start, row_step, scale, h, h * n_q,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            BM=block_m, BN=block_n, **common,
        )  # fmt: skip
        out["cross"] = ce.sum(0)
    return BlockStats(**out)


if triton is not None:
    # Positions and lengths change with every prompt and chunk: they are not specialised on (value 1 or a
    # multiple of 16), so each kernel compiles once per head size and dtype, not once per prompt shape.
    @triton.jit(do_not_specialize=["n_q", "start", "step"])
    def _row_stats(
        q_ptr, k_ptr, vis_ptr, lse_ptr, ent_ptr, mass_ptr, n_q, start, step, scale,
        sq_t, sq_h, sk_t, sk_h, mass_stride,
        GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
        PREC: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        h = tl.program_id(1)
        rows = pid * BM + tl.arange(0, BM)
        row_ok = rows < n_q
        qpos = start + rows * step
        dd = tl.arange(0, BD)
        q = tl.load(
            q_ptr + rows[:, None] * sq_t + h * sq_h + dd[None, :],
            mask=row_ok[:, None] & (dd[None, :] < D),
            other=0.0,
        )
        # A finite start keeps exp(m − m_new) at 0, not nan, for rows that have seen no key yet.
        m = tl.full([BM], -1.0e30, tl.float32)
        l_sum = tl.zeros([BM], tl.float32)
        pz = tl.zeros([BM], tl.float32)
        m_vis = tl.zeros([BM], tl.float32)
        m_txt = tl.zeros([BM], tl.float32)
        hi = start + (tl.minimum((pid + 1) * BM, n_q) - 1) * step + 1  # keys visible to the tile's last row
        for j0 in range(0, hi, BN):
            cols = j0 + tl.arange(0, BN)
            kt = tl.load(
                k_ptr + cols[None, :] * sk_t + (h // GROUP) * sk_h + dd[:, None],
                mask=(cols[None, :] < hi) & (dd[:, None] < D),
                other=0.0,
            )
            z = tl.dot(q, kt, input_precision=PREC) * scale
            ok = row_ok[:, None] & (cols[None, :] <= qpos[:, None])
            z = tl.where(ok, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, 1))
            alpha = tl.exp(m - m_new)
            e = tl.exp(z - m_new[:, None])
            vis = tl.load(vis_ptr + cols, mask=cols < hi, other=0).to(tl.float32)
            l_sum = l_sum * alpha + tl.sum(e, 1)
            pz = pz * alpha + tl.sum(e * tl.where(ok, z, 0.0), 1)  # e is 0 where masked, z −inf
            m_vis = m_vis * alpha + tl.sum(e * vis[None, :], 1)
            m_txt = m_txt * alpha + tl.sum(e * (1.0 - vis[None, :]), 1)
            m = m_new
        l_safe = tl.where(l_sum > 0, l_sum, 1.0)
        lse = m + tl.log(l_safe)
        off = h * n_q + rows
        tl.store(lse_ptr + off, lse, mask=row_ok)
        tl.store(ent_ptr + off, lse - pz / l_safe, mask=row_ok)
        tl.store(mass_ptr + off, m_vis / l_safe, mask=row_ok)
        tl.store(mass_ptr + mass_stride + off, m_txt / l_safe, mask=row_ok)

    @triton.jit(do_not_specialize=["n_q", "start", "step", "c_from", "w_from", "t_from"])
    def _col_stats(
        q_ptr, k_ptr, lse_ptr, out_ptr, n_q, start, step, scale, c_from, w_from, t_from,
        sq_t, sq_h, sk_t, sk_h, out_stride,
        GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
        PREC: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        h = tl.program_id(1)
        n_vis = start + (n_q - 1) * step + 1
        cols = pid * BN + tl.arange(0, BN)
        col_ok = cols < n_vis
        dd = tl.arange(0, BD)
        kt = tl.load(
            k_ptr + cols[None, :] * sk_t + (h // GROUP) * sk_h + dd[:, None],
            mask=col_ok[None, :] & (dd[:, None] < D),
            other=0.0,
        )
        acc_c = tl.zeros([BN], tl.float32)
        acc_w = tl.zeros([BN], tl.float32)
        acc_t = tl.zeros([BN], tl.float32)
        # The first row that counts at all and can see this key tile (causal: position ≥ key).
        first = tl.maximum(tl.minimum(tl.minimum(c_from, w_from), t_from), pid * BN) - start
        first = (tl.maximum(first, 0) + step - 1) // step
        for r0 in range(first, n_q, BM):
            rows = r0 + tl.arange(0, BM)
            row_ok = rows < n_q
            qpos = start + rows * step
            q = tl.load(
                q_ptr + rows[:, None] * sq_t + h * sq_h + dd[None, :],
                mask=row_ok[:, None] & (dd[None, :] < D),
                other=0.0,
            )
            lse = tl.load(lse_ptr + h * n_q + rows, mask=row_ok, other=0.0)
            z = tl.dot(q, kt, input_precision=PREC) * scale
            ok = row_ok[:, None] & col_ok[None, :] & (cols[None, :] <= qpos[:, None])
            p = tl.where(ok, tl.exp(tl.where(ok, z, 0.0) - lse[:, None]), 0.0)
            acc_c += tl.sum(tl.where(qpos[:, None] >= c_from, p, 0.0), 0)
            acc_w += tl.sum(tl.where(qpos[:, None] >= w_from, p, 0.0), 0)
            acc_t += tl.sum(tl.where(qpos[:, None] >= t_from, p, 0.0), 0)
        off = h * n_vis + cols
        tl.store(out_ptr + off, acc_c, mask=col_ok)
        tl.store(out_ptr + out_stride + off, acc_w, mask=col_ok)
        tl.store(out_ptr + 2 * out_stride + off, acc_t, mask=col_ok)

    @triton.jit
    def _head_probs(
        q_ptr, k_ptr, lse_ptr, rows, cols, ok, h, n_q, n_k, scale, sq_t, sq_h, sk_t, sk_h,
        GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """Head ``h``'s attention probabilities ``[BM, BN]`` of ``rows`` over ``cols`` (keys below ``n_k``
        are loaded), 0 outside ``ok``."""
        dd = tl.arange(0, BD)
        row_ok = rows < n_q
        q = tl.load(
            q_ptr + rows[:, None] * sq_t + h * sq_h + dd[None, :],
            mask=row_ok[:, None] & (dd[None, :] < D),
            other=0.0,
        )
        kt = tl.load(
            k_ptr + cols[None, :] * sk_t + (h // GROUP) * sk_h + dd[:, None],
            mask=(cols[None, :] < n_k) & (dd[:, None] < D),
            other=0.0,
        )
        lse = tl.load(lse_ptr + h * n_q + rows, mask=row_ok, other=0.0)
        z = tl.dot(q, kt, input_precision=PREC) * scale
        return tl.where(ok, tl.exp(tl.where(ok, z, 0.0) - lse[:, None]), 0.0)

    @triton.jit(do_not_specialize=["n_q", "start", "t_from"])
    def _t2v_max(
        q_ptr, k_ptr, lse_ptr, out_ptr, n_q, start, scale, t_from, n_heads,
        sq_t, sq_h, sk_t, sk_h,
        GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
        PREC: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        n_vis = start + n_q
        cols = pid * BN + tl.arange(0, BN)
        col_ok = cols < n_vis
        best = tl.zeros([BN], tl.float32)
        first = tl.maximum(tl.maximum(t_from, pid * BN) - start, 0)
        for r0 in range(first, n_q, BM):
            rows = r0 + tl.arange(0, BM)
            row_ok = rows < n_q
            qpos = start + rows
            ok = row_ok[:, None] & col_ok[None, :] & (cols[None, :] <= qpos[:, None])
            ok = ok & (qpos[:, None] >= t_from)
            acc = tl.zeros([BM, BN], tl.float32)
            for h in range(n_heads):
                acc += _head_probs(
                    q_ptr, k_ptr, lse_ptr, rows, cols, ok, h, n_q, n_vis, scale, sq_t, sq_h, sk_t, sk_h,
                    GROUP, D, BD, PREC,
                )  # fmt: skip
            best = tl.maximum(best, tl.max(acc, 0))
        tl.store(out_ptr + cols, best, mask=col_ok)

    @triton.jit(do_not_specialize=["n_q", "start", "step"])
    def _cross_entropy(
        q_ptr, k_ptr, vis_ptr, lse_ptr, mass_ptr, out_ptr, n_q, start, step, scale, n_heads, mass_stride,
        sq_t, sq_h, sk_t, sk_h,
        GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
        PREC: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        split = tl.program_id(1)
        n_split = tl.num_programs(1)
        rows = pid * BM + tl.arange(0, BM)
        row_ok = rows < n_q
        qpos = start + rows * step
        vis_q = tl.load(vis_ptr + qpos, mask=row_ok, other=0)
        ent = tl.zeros([BM], tl.float32)
        hi = start + (tl.minimum((pid + 1) * BM, n_q) - 1) * step + 1
        for jt in range(split, tl.cdiv(hi, BN), n_split):  # key tiles split, n_split, 2·n_split, …
            cols = jt * BN + tl.arange(0, BN)
            vis_k = tl.load(vis_ptr + cols, mask=cols < hi, other=0)
            causal = row_ok[:, None] & (cols[None, :] <= qpos[:, None])
            want = causal & (vis_q[:, None] != vis_k[None, :])  # the other modality's keys
            acc = tl.zeros([BM, BN], tl.float32)
            for h in range(n_heads):
                p = _head_probs(
                    q_ptr, k_ptr, lse_ptr, rows, cols, want, h, n_q, hi, scale, sq_t, sq_h, sk_t, sk_h,
                    GROUP, D, BD, PREC,
                )  # fmt: skip
                # Text rows renormalise over their mass on vision keys, vision rows over text keys.
                m_vis = tl.load(mass_ptr + h * n_q + rows, mask=row_ok, other=1.0)
                m_txt = tl.load(mass_ptr + mass_stride + h * n_q + rows, mask=row_ok, other=1.0)
                mass = tl.where(vis_q != 0, m_txt, m_vis)
                # (a bare 1e-38 literal is below float32's normal range and would promote to float64)
                mass = tl.maximum(mass, tl.full([BM], 1.0e-38, tl.float32)) * n_heads
                acc += p / mass[:, None]
            ent -= tl.sum(tl.where(acc > 0, acc * tl.log(tl.where(acc > 0, acc, 1.0)), 0.0), 1)
        tl.store(out_ptr + split * n_q + rows, ent, mask=row_ok)


def _kernels(device: torch.device) -> dict[str, Any]:
    # Triton decides at import whether ``@triton.jit`` compiles or interprets (its own standard library
    # included), so CPU tensors work only in a process that set TRITON_INTERPRET=1 before importing it.
    if device.type == "cpu" and not triton.knobs.runtime.interpret:
        raise RuntimeError(
            "the Triton statistics kernels run on CPU tensors only in Triton's interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported (the torch path is the CPU default)"
        )
    return {"row": _row_stats, "col": _col_stats, "t2v": _t2v_max, "cross": _cross_entropy}
