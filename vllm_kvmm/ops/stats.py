"""Chunked attention statistics for KV-cache scoring (pure torch, never N×N).

Every policy scores prompt tokens from a handful of statistics of the prefill attention map
``A[h, i, j] = softmax_j(q_i·k_j·scale)`` (causal, ``j ≤ i``). They are accumulated one *query chunk*
at a time, so the same code serves a whole prompt (dense reference) and a prompt that vLLM prefills
in several chunks: each call sees the queries of positions ``[q_start, q_start + n_q)`` and the keys
of positions ``[0, q_start + n_q)``. Extra memory is ``O(chunk · N)`` per call.

Statistics (all float32, all reduced to KV heads by the mean over each GQA group):

* ``colsum``   ``Σ_i A[i, j]`` over all queries (H2O, LOOK-M, MEDA).
* ``window``   ``Σ_i A[i, j]`` over the last ``window`` queries (SnapKV, PyramidKV).
* ``entropy``  mean row entropy of the full causal map, averaged over query heads (MEDA code).
* ``entropy_tv`` / ``entropy_vt``  mean row entropy of the head-averaged cross-modal maps
  text→vision and vision→text, each renormalised over its key modality (MEDA paper, Eq. 4–6).
  Causal: a text query sees only earlier vision keys (see docs/policies.md for why).
* ``t2v_sum`` / ``t2v_max``  head-averaged attention that vision keys receive from the text queries
  after the last vision token: sum and max over those queries (HAE dual-attention pruning).

The entropies are means over query rows, so they can be estimated from a systematic sample of the rows:
with ``entropy_step = s`` only the queries at positions ``0, s, 2s, …`` (of the whole prompt, so the sample
does not depend on how the prefill is chunked) contribute, at ``1/s`` of the cost (every sampled row still
sees every key). ``colsum_step = s`` estimates ``colsum`` the same way, as ``s · Σ_{i ≡ 0 (mod s)} A[i, j]``
(the sum scaled back to every row's, so decode-time scores still add to it). The window and HAE's
text→vision statistics always use every row they name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch

from vllm_kvmm.ops import stats_triton
from vllm_kvmm.ops.select import reduce_heads

Kernels = Literal["auto", "torch", "triton"]

__all__ = [
    "LayerStats",
    "StatsAccumulator",
    "StatsRequest",
    "attention_stats",
    "decode_scores",
    "row_entropy",
]


@dataclass(frozen=True, slots=True)
class StatsRequest:
    """Which statistics a policy needs for one prompt (drives what the attention hook computes).

    ``window`` is a number of queries (0 = none); ``layers`` the layers to collect (``None`` = all);
    ``entropy_step`` / ``colsum_step``: the entropies' / the column sums' rows are the queries at positions
    that are multiples of it (module docstring; 1 = every row, exact).
    """

    colsum: bool = False
    window: int = 0
    entropy: bool = False
    cross_entropy: bool = False
    t2v: bool = False
    layers: tuple[int, ...] | None = None
    entropy_step: int = 1
    colsum_step: int = 1

    def __post_init__(self) -> None:
        for name in ("entropy_step", "colsum_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def sampled(self) -> bool:
        """Whether entropies come from sampled rows (computed apart from the every-row statistics)."""
        return self.entropy_step > 1 and (self.entropy or self.cross_entropy)

    @property
    def sampled_colsum(self) -> bool:
        """Whether ``colsum`` comes from sampled rows (computed apart from the every-row statistics)."""
        return self.colsum_step > 1 and self.colsum

    @property
    def samples(self) -> dict[int, StatsRequest]:
        """``step → the statistics computed from the rows at multiples of step`` (steps above 1; one pass
        over those rows each: entropies and column sums of the same step share it)."""
        out: dict[int, StatsRequest] = {}
        if self.sampled:
            out[self.entropy_step] = StatsRequest(entropy=self.entropy, cross_entropy=self.cross_entropy)
        if self.sampled_colsum:
            out[self.colsum_step] = replace(out.get(self.colsum_step, StatsRequest()), colsum=True)
        return out

    @property
    def every_row(self) -> StatsRequest:
        """The statistics computed from every row (those not sampled)."""
        return replace(
            self,
            colsum=self.colsum and not self.sampled_colsum,
            entropy=self.entropy and not self.sampled,
            cross_entropy=self.cross_entropy and not self.sampled,
            entropy_step=1,
            colsum_step=1,
        )

    @property
    def empty(self) -> bool:
        return not (self.colsum or self.window or self.entropy or self.cross_entropy or self.t2v)

    def wants_layer(self, layer: int) -> bool:
        return not self.empty and (self.layers is None or layer in self.layers)


@dataclass(slots=True)
class LayerStats:
    """Statistics of one layer for one prompt of ``N`` tokens (see module docstring).

    Shapes: ``colsum``, ``window``: ``[H_kv, N]``; ``t2v_sum``, ``t2v_max``: ``[N]`` (zero outside vision
    keys); entropies: 0-d tensors (``nan`` when the map has no rows, e.g. no vision tokens).
    """

    colsum: torch.Tensor | None = None
    window: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    entropy_tv: torch.Tensor | None = None
    entropy_vt: torch.Tensor | None = None
    t2v_sum: torch.Tensor | None = None
    t2v_max: torch.Tensor | None = None


def row_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the ``True`` entries of ``mask``, per row.

    Uses ``H = lse − Σ_j p_j z_j`` so no ``log p`` is formed. ``logits``/``mask``: ``[..., n]``;
    returns ``[...]`` (``nan`` for rows with no ``True`` entry).
    """
    z = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(z, dim=-1)
    p = torch.exp(z - lse.unsqueeze(-1))
    pz = torch.where(mask, p * logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    # An empty row has lse = -inf and Σ p·z = 0, so ``lse - Σ`` would be -inf; the contract is nan.
    nan = torch.full((), float("nan"), dtype=lse.dtype, device=lse.device)
    return torch.where(mask.any(-1), lse - pz.sum(-1), nan)


@dataclass(slots=True)
class _Acc:
    colsum: torch.Tensor | None = None
    window: torch.Tensor | None = None
    ent_sum: torch.Tensor | float = 0.0  # device sums: read once, in result()
    ent_rows: int = 0
    tv_sum: torch.Tensor | float = 0.0
    tv_rows: int = 0
    vt_sum: torch.Tensor | float = 0.0
    vt_rows: int = 0
    t2v_sum: torch.Tensor | None = None
    t2v_max: torch.Tensor | None = None
    seen: int = 0


class StatsAccumulator:
    """Accumulates :class:`LayerStats` of one layer of one prompt over query chunks.

    Args:
        request: which statistics to collect.
        num_tokens: prompt length ``N``.
        num_heads: query heads ``H``; ``num_kv_heads``: KV heads ``H_kv`` (``H % H_kv == 0``).
        vision_mask: ``[N]`` bool, ``True`` at vision (image/video) token positions.
        scale: softmax scale (``1/sqrt(d)`` unless the model says otherwise).
        chunk: queries per internal block of the torch path; its largest temporary is ``[H, chunk, N]``.
        kernels: ``"torch"`` (chunked torch ops), ``"triton"`` (the flash-style kernels of
            :mod:`vllm_kvmm.ops.stats_triton`; on CPU tensors only under ``TRITON_INTERPRET=1``) or
            ``"auto"``: Triton for CUDA tensors when it is installed, torch otherwise. Tensor parallelism
            with cross-modal or HAE statistics stays on torch: those reduce over every rank's heads
            inside the map, before the nonlinearity.
        start: the first query that runs (a prefix-cache hit computes none before it); the statistics are
            sums over the queries ``[start, N)`` (column sums, entropies and text→vision rows alike).
    """

    def __init__(
        self,
        request: StatsRequest,
        num_tokens: int,
        num_heads: int,
        num_kv_heads: int,
        vision_mask: torch.Tensor,
        scale: float,
        chunk: int = 256,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        world: int = 1,
        kernels: Kernels = "auto",
        start: int = 0,
    ) -> None:
        if kernels not in ("auto", "torch", "triton"):
            raise ValueError(f"kernels must be 'auto', 'torch' or 'triton', got {kernels!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        if vision_mask.shape != (num_tokens,):
            raise ValueError(f"vision_mask has shape {tuple(vision_mask.shape)}, expected ({num_tokens},)")
        self.request = request
        self.n = num_tokens
        self.h = num_heads
        self.h_kv = num_kv_heads
        self.scale = scale
        self.chunk = chunk
        self.vision = vision_mask.to(torch.bool)
        vis_pos = torch.nonzero(self.vision).flatten()
        # HAE's text queries are those after the last vision token (the instruction / question).
        self.t2v_from = int(vis_pos[-1].item()) + 1 if vis_pos.numel() else num_tokens
        self.window_from = num_tokens - request.window if request.window else num_tokens
        self._acc = _Acc()
        # Sampled statistics are computed apart from those that need every row.
        self._rows = request.every_row
        # Queries before ``start`` never run (a prefix-cache hit): the statistics cover [start, N).
        if not 0 <= start <= num_tokens:
            raise ValueError(f"start {start} is outside a prompt of {num_tokens} tokens")
        self._acc.seen = start
        # Tensor parallelism: this process holds ``num_heads`` of ``world × num_heads`` query heads.
        # Head-averaged statistics (entropies, HAE's text→vision attention) are summed over every rank's
        # heads through ``all_reduce`` so all ranks see the single-device numbers and agree on budgets;
        # per-KV-head statistics (colsum, window) stay local, as each rank selects for its own heads.
        self.all_reduce = all_reduce
        self.world = world
        self._vision_dev: torch.Tensor | None = None
        self._vision_cumsum = torch.cumsum(self.vision.to(torch.long), 0)  # vision keys at or before i
        cross_rank = world > 1 and (request.cross_entropy or request.t2v)
        if kernels == "triton" and (cross_rank or not stats_triton.triton_available()):
            raise ValueError(
                "kernels='triton' needs the triton package and, under tensor parallelism, no "
                "cross-modal or HAE statistics"
            )
        self.kernels: Kernels = "torch" if cross_rank or not stats_triton.triton_available() else kernels

    @property
    def done(self) -> bool:
        """True once every prompt query has been seen."""
        return self._acc.seen >= self.n

    @property
    def first_query(self) -> int:
        """The first prompt position whose query counts: window-only and text→vision statistics read just
        the last rows (``N``: none counts)."""
        return self._first_row(self.request)

    def _first_row(self, req: StatsRequest) -> int:
        first = 0 if (req.colsum or req.entropy or req.cross_entropy) else self.n
        if req.window:
            first = min(first, self.window_from)
        if req.t2v:
            first = min(first, self.t2v_from)
        return first

    def skip(self, q_start: int, n_q: int) -> None:
        """Pass over the queries ``[q_start, q_start + n_q)``, which must all lie before :attr:`first_query`:
        the caller need not read their keys (a chunked prefill's early chunks under window statistics)."""
        if q_start != self._acc.seen or q_start + n_q > self.first_query:
            raise ValueError(
                f"cannot skip queries [{q_start}, {q_start + n_q}): expected start {self._acc.seen}, "
                f"and statistics count queries from {self.first_query}"
            )
        self._acc.seen += n_q

    def update(self, q: torch.Tensor, k: torch.Tensor, q_start: int) -> None:
        """Add the queries of positions ``[q_start, q_start + n_q)``.

        Args:
            q: ``[n_q, H, d]`` post-RoPE queries.
            k: ``[n_k, H_kv, d]`` post-RoPE keys of positions ``[0, n_k)``, ``n_k ≥ q_start + n_q``.
            q_start: absolute position of ``q[0]``.
        """
        n_q = q.shape[0]
        if q_start != self._acc.seen:
            raise ValueError(
                f"query chunks must arrive in order: expected start {self._acc.seen}, got {q_start}"
            )
        if q_start + n_q > self.n or k.shape[0] < q_start + n_q:
            raise ValueError(
                f"chunk [{q_start}, {q_start + n_q}) with {k.shape[0]} keys does not fit a prompt of {self.n}"
            )
        k = k[: self.n]
        triton = self.kernels == "triton" or (self.kernels == "auto" and q.is_cuda)
        skip = max(0, self._first_row(self._rows) - q_start)
        if triton:
            if skip < n_q:
                self._update_triton(self._rows, q[skip:], k, q_start + skip)
        else:
            for s in range(skip, n_q, self.chunk):
                e = min(n_q, s + self.chunk)
                self._update_block(self._rows, q[s:e], k, q_start + s)
        for step, req in self.request.samples.items():
            self._update_sampled(req, step, q, k, q_start, triton)
        self._acc.seen += n_q

    def _vision_on(self, dev: torch.device) -> torch.Tensor:
        if self._vision_dev is None or self._vision_dev.device != dev:
            self._vision_dev = self.vision.to(dev)
        return self._vision_dev

    def _update_triton(
        self, req: StatsRequest, q: torch.Tensor, k: torch.Tensor, start: int, step: int = 1
    ) -> None:
        """The same sums as :meth:`_update_block`, from the flash-style kernels (all queries at once)."""
        n_q, dev = q.shape[0], q.device
        pos = torch.arange(start, start + n_q * step, step)
        n_vis = int(pos[-1]) + 1
        heads = self.h * self.world
        cross = req.cross_entropy and bool(self.vision.any())
        t2v = req.t2v and n_vis > self.t2v_from
        window = req.window and n_vis > self.window_from
        out = stats_triton.block_stats(
            q,
            k,
            start,
            self.scale,
            self._vision_on(dev),
            entropy=req.entropy,
            colsum_from=start if req.colsum else None,
            window_from=self.window_from if window else None,
            t2v_from=self.t2v_from if t2v else None,
            cross=cross,
            row_step=step,
        )
        if out.colsum is not None:
            self._add_keys("colsum", out.colsum, step)
        if out.window is not None:
            self._add_keys("window", out.window)
        if out.entropy is not None:
            self._add_entropy(out.entropy)
        if out.cross is not None:
            self._add_cross(out.cross, pos)
        if out.t2v_sum is not None and out.t2v_max is not None:
            self._add_t2v(out.t2v_sum / heads, out.t2v_max / heads)

    def _add_keys(self, name: str, x: torch.Tensor, weight: int = 1) -> None:
        """Add ``weight · x`` (``x`` ``[H, n_vis]``, per query head) to the per-KV-head key statistic ``name``
        (``weight``: the rows each sampled row stands for)."""
        total = getattr(self._acc, name)
        if total is None:
            total = torch.zeros(self.h_kv, self.n, device=x.device)
            setattr(self._acc, name, total)
        x = reduce_heads(x, self.h_kv)
        total[:, : x.shape[-1]] += x if weight == 1 else x.mul_(weight)

    def _add_entropy(self, ent: torch.Tensor) -> None:
        """Add the row entropies ``[H, n_q]`` of this rank's heads (summed with the other ranks')."""
        self._acc.ent_sum = self._acc.ent_sum + self._head_sum(ent).sum().double()
        self._acc.ent_rows += ent.shape[1] * self.h * self.world

    def _add_t2v(self, total: torch.Tensor, best: torch.Tensor) -> None:
        """Add HAE's head-averaged text→vision attention ``[n_vis]``: its sum and maximum over the block's
        text rows (counted at vision keys only)."""
        acc, n_vis = self._acc, total.shape[0]
        vis = self._vision_on(total.device)[:n_vis]
        if acc.t2v_sum is None or acc.t2v_max is None:
            acc.t2v_sum = torch.zeros(self.n, device=total.device)
            acc.t2v_max = torch.zeros(self.n, device=total.device)
        acc.t2v_sum[:n_vis] += total * vis
        acc.t2v_max[:n_vis] = torch.maximum(acc.t2v_max[:n_vis], best * vis)

    def _head_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``[H, ...]`` → ``[...]``, summed over all ranks' heads."""
        total = x.sum(0)
        return self.all_reduce(total) if self.all_reduce is not None else total

    def _probs(
        self, q: torch.Tensor, k: torch.Tensor, start: int, pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[H, n_q, n_vis]`` causal attention probabilities of ``q`` ``[n_q, H, d]`` (exact zeros on
        future keys): the queries of positions ``[start, start + n_q)``, or of ``pos`` (ascending, on the
        CPU, starting at ``start``) when given; ``n_vis`` is the last position + 1 (later keys are never
        visible)."""
        n_q = q.shape[0]
        dev = q.device
        g = self.h // self.h_kv
        n_vis = start + n_q if pos is None else int(pos[-1]) + 1
        kk = k[:n_vis].float()
        # [H, n_q, n_vis] logits; query head h reads KV head h // g (grouped, no repeated keys).
        qq = q.float().view(n_q, self.h_kv, g, -1)
        z = torch.einsum("qcgd,kcd->cgqk", qq, kk).reshape(self.h, n_q, n_vis)
        z.mul_(self.scale)
        # Masked in place with the most negative finite value (exp gives exact zeros). Contiguous rows:
        # only the block's last n_q keys lie after some of its queries, a square.
        lowest = torch.finfo(z.dtype).min
        if pos is None:
            future = torch.ones(n_q, n_q, dtype=torch.bool, device=dev).triu_(1)
            z[:, :, start:].masked_fill_(future, lowest)
        else:
            future = torch.arange(start, n_vis, device=dev)[None, :] > pos.to(dev)[:, None]
            z[:, :, start:].masked_fill_(future, lowest)
        # The softmax in place: one fused kernel writing over the logits (each element is read before it
        # is written, by the same thread, in the CPU and CUDA kernels). On a CPU 1.3-2.8x faster than the
        # max/exp/sum/divide passes it replaces, and no second copy of the map.
        return torch.softmax(z, -1, out=z)

    def _update_sampled(
        self, req: StatsRequest, step: int, q: torch.Tensor, k: torch.Tensor, q_start: int, triton: bool
    ) -> None:
        """``req``'s statistics (:attr:`StatsRequest.samples`: column sums and entropies only) from the rows
        at multiples of ``step`` among ``q`` (positions ``[q_start, q_start + n_q)``)."""
        offset = (-q_start) % step
        if offset >= q.shape[0]:  # no sampled row in this chunk
            return
        qs, first = q[offset::step], q_start + offset
        if triton:
            self._update_triton(req, qs, k, first, step)
            return
        # Blocks of ~`chunk` positions (chunk/step rows): a block's keys end at its last row, so wider blocks
        # would compute more of the causal triangle's masked half.
        rows_per = max(1, self.chunk // step)
        for s in range(0, qs.shape[0], rows_per):
            self._update_block(req, qs[s : s + rows_per], k, first + s * step, step)

    def _update_block(
        self, req: StatsRequest, q: torch.Tensor, k: torch.Tensor, start: int, step: int = 1
    ) -> None:
        """``req``'s sums over the queries at positions ``start + step·i``; the window and HAE's rows read
        contiguous positions, so a sampled block (``step`` > 1) carries neither."""
        # No device synchronisation in here: which rows count is decided from positions on the CPU, and
        # sums stay on the device until ``result``.
        n_q = q.shape[0]
        heads = self.h * self.world
        pos = torch.arange(start, start + n_q * step, step)
        p = self._probs(q, k, start, None if step == 1 else pos)

        if req.colsum:
            self._add_keys("colsum", p.sum(1), step)
        if req.window and start + n_q > self.window_from:
            self._add_keys("window", p[:, max(0, self.window_from - start) :].sum(1))
        if req.entropy:
            self._add_entropy(-torch.special.xlogy(p, p).sum(-1))  # −Σ p log p; 0 where p is 0
        if req.cross_entropy and bool(self.vision.any()):
            self._cross_entropy(p, pos)
        if req.t2v and start + n_q > self.t2v_from:
            # The text rows: every row after the last vision token, a suffix of this (contiguous) block —
            # a view, not a gathered copy of the map.
            assert step == 1, "HAE's rows are never sampled"
            pm = self._head_sum(p[:, max(0, self.t2v_from - start) :]) / heads  # [r, n_vis] head-averaged
            self._add_t2v(pm.sum(0), pm.max(0).values)

    def _cross_entropy(self, p: torch.Tensor, pos: torch.Tensor) -> None:
        """MEDA's text→vision and vision→text entropies from the full map ``p`` ``[H, n_q, n_vis]`` of the
        queries at positions ``pos`` ``[n_q]`` (CPU).

        A head's map restricted to the other modality's keys and renormalised is ``p_h / m_h`` there, with
        ``m_h`` the row's mass on those keys; so the head-averaged renormalised map is one weighted head sum
        of ``p`` — no second softmax, no gathered copies. (Exact unless a head's mass on a modality
        underflows float32, i.e. logit gaps beyond ~87.)
        """
        heads = self.h * self.world
        vision = self._vision_on(p.device)
        vis_k, vis_q = vision[: p.shape[-1]], vision[pos.to(p.device)]
        cols = torch.stack([vis_k, ~vis_k], dim=-1).to(p.dtype)  # [n_vis, 2]: vision, text
        masses = torch.matmul(p, cols)  # [H, n_q, 2]
        # Text rows look at vision keys (tv); vision rows at text keys (vt).
        mass = torch.where(vis_q.unsqueeze(0), masses[..., 1], masses[..., 0])
        pm = torch.einsum("hqk,hq->qk", p, 1.0 / (mass.clamp_min(1e-38) * heads))  # [n_q, n_vis]
        if self.all_reduce is not None:
            pm = self.all_reduce(pm)  # the other ranks' heads
        # Each row's other-modality keys; the future ones need no mask: p, hence pm, is exactly 0 there.
        pm.mul_(vis_q.unsqueeze(1) != vis_k.unsqueeze(0))
        self._add_cross(-torch.special.xlogy(pm, pm).sum(-1), pos)

    def _add_cross(self, ent: torch.Tensor, pos: torch.Tensor) -> None:
        """Add the cross-modal row entropies ``[n_q]`` of the queries at positions ``pos`` (CPU)."""
        acc = self._acc
        vis_cpu = self.vision[pos]
        # Rows with at least one visible key of the other modality (decided on the CPU, from positions).
        vis_before = self._vision_cumsum[pos]
        tv = ~vis_cpu & (vis_before > 0)
        vt = vis_cpu & (pos + 1 - vis_before > 0)
        if bool(tv.any()):
            acc.tv_sum = acc.tv_sum + (ent * tv.to(ent.device)).sum().double()
            acc.tv_rows += int(tv.sum())
        if bool(vt.any()):
            acc.vt_sum = acc.vt_sum + (ent * vt.to(ent.device)).sum().double()
            acc.vt_rows += int(vt.sum())

    def result(self) -> LayerStats:
        """The statistics so far (complete once :attr:`done`)."""
        acc, req = self._acc, self.request
        out = LayerStats()
        if req.colsum:
            out.colsum = acc.colsum if acc.colsum is not None else torch.zeros(self.h_kv, self.n)
        if req.window:
            out.window = acc.window if acc.window is not None else torch.zeros(self.h_kv, self.n)
        if req.entropy:
            out.entropy = _mean(acc.ent_sum, acc.ent_rows)
        if req.cross_entropy:
            out.entropy_tv = _mean(acc.tv_sum, acc.tv_rows)
            out.entropy_vt = _mean(acc.vt_sum, acc.vt_rows)
        if req.t2v:
            out.t2v_sum = acc.t2v_sum if acc.t2v_sum is not None else torch.zeros(self.n)
            out.t2v_max = acc.t2v_max if acc.t2v_max is not None else torch.zeros(self.n)
        return out


def _mean(total: torch.Tensor | float, rows: int) -> torch.Tensor:
    """0-d CPU float32 mean (``nan`` without rows)."""
    if not rows:
        return torch.tensor(math.nan)
    return (torch.as_tensor(total, dtype=torch.float64).cpu() / rows).float()


def attention_stats(
    request: StatsRequest,
    q: torch.Tensor,
    k: torch.Tensor,
    vision_mask: torch.Tensor,
    scale: float,
    chunk: int = 256,
) -> LayerStats:
    """One-shot :class:`StatsAccumulator` over a prompt; ``q``: ``[N, H, d]``, ``k``: ``[N, H_kv, d]``."""
    acc = StatsAccumulator(request, q.shape[0], q.shape[1], k.shape[1], vision_mask, scale, chunk)
    acc.update(q, k, 0)
    return acc.result()


def decode_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    q_positions: torch.Tensor,
    scale: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention that buffered decode queries gave the stored slots, summed over queries, per KV head.

    Args:
        q: ``[H, W, d]`` decode queries at true positions ``q_positions``: ``[W]``, or ``[H_kv, W]`` when
            the rows are a stack of several requests' layers (each KV head's row with its queries' own).
        k: ``[H_kv, S, d]`` stored keys at true positions ``positions`` ``[H_kv, S]`` (differ per head).
    Each query saw exactly the stored slots at or before its own position (later ones were not written
    yet). ``weights`` ``[W]`` scale each query's row (score decay). Returns ``[H_kv, S]`` float64, mean
    over each GQA group (as every other score here).
    """
    h, w, d = q.shape
    h_kv = k.shape[0]
    g = h // h_kv
    # Query heads grouped under their KV head: the keys are never repeated per query head (a stack of many
    # layers' or requests' rows would otherwise copy every key g times, in float64).
    z = torch.einsum("hgwd,hsd->hgws", q.double().view(h_kv, g, w, d), k.double()) * scale
    pos = positions.to(q.device)
    qp = q_positions.to(q.device).expand(h_kv, -1)  # [H_kv, W]
    visible = pos[:, None, None, :] <= qp[:, None, :, None]  # [H_kv, 1, W, S]
    p = torch.softmax(z.masked_fill(~visible, float("-inf")), -1)
    if weights is not None:
        p = p * weights.to(p.device, torch.float64)[None, None, :, None]
    return p.sum(2).mean(1)
