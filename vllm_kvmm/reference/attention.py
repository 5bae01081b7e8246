"""The ``kvmm`` attention function: a dense, per-layer cache with its own masks.

Registered in ``transformers.AttentionInterface``; a model whose text config says
``_attn_implementation = "kvmm"`` calls :func:`kvmm_attention` with post-RoPE ``query`` ``[B, H, q, d]``
and the ``key``/``value`` ``[B, H_kv, q, d]`` of the *current* tokens only (the model runs with
``use_cache=False``). The cache, the masks and the statistics live in the active :class:`DenseKVRun`,
so HF's cache length and attention mask never matter.

Cache layout of layer ``l`` during decoding, per sample ``b``::

    [ compacted prompt, K_l slots (first kept[b, l] valid) | generated tokens so far | current tokens ]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vllm_kvmm.ops import StatsAccumulator, StatsRequest
from vllm_kvmm.policies.decode import StoredSlots, flush_tail_start, plan_flush

__all__ = ["ATTN_IMPLEMENTATION", "DenseKVRun", "SlidingLayers", "activate", "kvmm_attention"]

ATTN_IMPLEMENTATION = "kvmm"
_ACTIVE: ContextVar[DenseKVRun | None] = ContextVar("vllm_kvmm_dense_run", default=None)


class DenseKVRun:
    """Per-layer dense cache of one right-padded batch.

    Args:
        modules: the text decoder's attention modules, by layer (others fall through to SDPA).
        lengths: ``[B]`` prompt lengths ``N_b`` (valid tokens of each padded row).
        requests: per sample, the statistics its policy needs.
        vision_masks: per sample, ``[N_b]`` bool.
        stats_chunk: queries per block in :class:`StatsAccumulator`.
        sliding: the sliding-window layers (never compressed), see :class:`SlidingLayers`.
    """

    def __init__(
        self,
        modules: Sequence[torch.nn.Module],
        lengths: torch.Tensor,
        requests: Sequence[StatsRequest],
        vision_masks: Sequence[torch.Tensor],
        stats_chunk: int = 256,
        sliding: SlidingLayers | None = None,
    ) -> None:
        self.layer_of = {id(m): i for i, m in enumerate(modules)}
        self.sliding = sliding
        self.num_layers = len(modules)
        self.lengths = lengths
        self.requests = list(requests)
        self.vision_masks = list(vision_masks)
        self.stats_chunk = stats_chunk
        self.prefilled = False
        self.stats: list[dict[int, StatsAccumulator]] = [{} for _ in requests]
        # Per sample: the first query whose statistics count (a prefix-cache hit's queries never run on
        # the vLLM path), and the shared prefix kept exact (LayerPlan.frozen).
        self.starts = [0] * len(self.requests)
        self.frozen = [0] * len(self.requests)
        # Prefill: the full prompt K/V per layer, [B, H_kv, n_max, d].
        self.prompt_k: list[torch.Tensor | None] = [None] * self.num_layers
        self.prompt_v: list[torch.Tensor | None] = [None] * self.num_layers
        # Decode: compacted prompt cache per layer [B, H_kv, K_l, d] and valid counts [B, L].
        self.cache_k: list[torch.Tensor] = []
        self.cache_v: list[torch.Tensor] = []
        self.cache_len: torch.Tensor | None = None
        self.gen_k: list[torch.Tensor | None] = [None] * self.num_layers
        self.gen_v: list[torch.Tensor | None] = [None] * self.num_layers
        # Decode-time eviction (docs/decode-eviction.md): true positions and accumulated scores of the
        # cache slots [B, H_kv, K_l], the decode queries since the last flush, and the layers' scales.
        self.cache_pos: list[torch.Tensor] = []
        self.cache_score: list[torch.Tensor] = []
        self.gen_q: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        self.scales: list[float] = [1.0] * self.num_layers
        self.generated = 0  # generated tokens whose K/V are stored (all samples decode in lockstep)
        self.flushed_at = 0  # ``generated`` at the last flush
        self.flush_history: list[list[list[torch.Tensor]]] = []  # [flush][layer][b] -> [H_kv, K] positions
        # Recycle bin per (layer, sample): keys, values, positions, scores of binned slots [H_kv, n, ...].
        self.bins: dict[tuple[int, int], StoredSlots] = {}  # (layer, row) -> HAE's recycle bin
        self.bin_history: list[list[list[torch.Tensor]]] = []  # [flush][layer][b] -> [H_kv, n] positions

    # ---- phases ------------------------------------------------------------------------------
    def set_cache(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        kept: torch.Tensor,
        positions: list[torch.Tensor] | None = None,
        scores: list[torch.Tensor] | None = None,
    ) -> None:
        """Install the compacted prompt cache (``kept``: ``[B, L]`` valid slots) and drop the full one.

        ``positions`` / ``scores``: per layer ``[B, H_kv, K_l]`` true positions and accumulated attention
        of the slots (needed only by decode-time eviction).
        """
        self.cache_k, self.cache_v, self.cache_len = keys, values, kept
        if positions is not None:
            self.cache_pos = positions
            self.cache_score = (
                scores
                if scores is not None
                else [torch.zeros_like(p, dtype=torch.float64) for p in positions]
            )
        self.prompt_k = [None] * self.num_layers
        self.prompt_v = [None] * self.num_layers
        self.prefilled = True

    # ---- attention ---------------------------------------------------------------------------
    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """``q``: ``[B, H, n_q, d]``; ``k``/``v``: ``[B, H_kv, n_q, d]`` → output ``[B, n_q, H, d]``."""
        if self.prefilled:
            return self._decode(layer, q, k, v, scale)
        return self._prefill(layer, q, k, v, scale)

    def _prefill(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        # Right padding makes the causal mask enough: a valid query i < N_b only sees keys j <= i < N_b,
        # so no sample ever sees another's padding (pad queries see garbage, and nobody reads them).
        # Without an explicit mask, torch picks its fused causal kernel (no [n, n] matrix in memory).
        out = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), is_causal=True, scale=scale, enable_gqa=True
        )
        out = out.to(q.dtype).transpose(1, 2).contiguous()
        self.prompt_k[layer], self.prompt_v[layer] = k, v
        for b, req in enumerate(self.requests):
            if not req.wants_layer(layer):
                continue
            nb, s = int(self.lengths[b]), self.starts[b]
            acc = StatsAccumulator(
                req, nb, q.shape[1], k.shape[1], self.vision_masks[b], scale, chunk=self.stats_chunk, start=s
            )
            acc.update(q[b, :, s:nb].transpose(0, 1), k[b, :, :nb].transpose(0, 1), s)
            self.stats[b][layer] = acc
        return out

    def _decode(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        assert self.cache_len is not None
        bsz, _, n_q, _ = q.shape
        dev = q.device
        ck, cv = self.cache_k[layer], self.cache_v[layer]
        gk, gv = self.gen_k[layer], self.gen_v[layer]
        n_gen = 0 if gk is None else gk.shape[2]
        slots = torch.arange(ck.shape[2], device=dev)
        in_cache = slots[None, :] < self.cache_len[:, layer].to(dev)[:, None]  # [B, K_l]
        new = torch.ones(n_q, n_q, dtype=torch.bool, device=dev).tril()
        mask = torch.cat(
            [
                in_cache[:, None, :].expand(bsz, n_q, -1),
                torch.ones(bsz, n_q, n_gen, dtype=torch.bool, device=dev),
                new[None].expand(bsz, -1, -1),
            ],
            dim=-1,
        )
        parts_k = [ck] + ([gk] if gk is not None else []) + [k]
        parts_v = [cv] + ([gv] if gv is not None else []) + [v]
        out = _sdpa(q, torch.cat(parts_k, 2), torch.cat(parts_v, 2), mask, scale)
        self.gen_k[layer] = k if gk is None else torch.cat([gk, k], 2)
        self.gen_v[layer] = v if gv is None else torch.cat([gv, v], 2)
        if n_q == 1 and self.cache_pos:
            self.gen_q[layer].append(q)
            self.scales[layer] = scale
        return out

    # ---- decode-time eviction ----------------------------------------------------------------------
    def flush(
        self, specs: Sequence[Any], capacity: torch.Tensor, tails: torch.Tensor, granularity: int
    ) -> None:
        """Re-select every layer's stored tokens (docs/decode-eviction.md); ``capacity``: ``[B, L]``;
        ``tails``: ``[B, L]`` where each layer's kept tail starts (prefill's layout, then the last flush's),
        updated in place."""

        new_gen = self.generated - self.flushed_at
        record: list[list[torch.Tensor]] = []
        bins: list[list[torch.Tensor]] = []
        for layer in range(self.num_layers):
            gk, gv = self.gen_k[layer], self.gen_v[layer]
            assert gk is not None and gv is not None and gk.shape[2] == new_gen
            queries = torch.cat(self.gen_q[layer], 2)  # [B, H, W, d]
            per_b = []
            for b, spec in enumerate(specs):
                valid = int(self.cache_len[b, layer])  # type: ignore[index]
                first = int(self.lengths[b]) + self.flushed_at
                length = first + new_gen
                k = torch.cat([self.cache_k[layer][b, :, :valid], gk[b]], 1)  # [H_kv, S, d]
                v = torch.cat([self.cache_v[layer][b, :, :valid], gv[b]], 1)
                new_pos = torch.arange(first, length).expand(k.shape[0], -1)
                pos = torch.cat([self.cache_pos[layer][b, :, :valid], new_pos], 1)
                fresh = torch.zeros(k.shape[0], new_gen, dtype=torch.float64)
                score = torch.cat([self.cache_score[layer][b, :, :valid], fresh], 1)
                # The same assembly as the vLLM worker's: the recycle bin between the slots older than the
                # new tail and the tail, then the decayed scores of this interval's queries.
                slots = StoredSlots(k, v, pos, score)
                floor = int(tails[b, layer])
                tail_start = flush_tail_start(length, spec.recent, granularity, floor)
                slots = slots.with_bin(self.bins.get((layer, b)), tail_start)
                slots = slots.rescored(spec, queries[b], new_pos[0], self.scales[layer])
                cap = spec.capacity if spec.capacity is not None else int(capacity[b, layer])
                plan = plan_flush(
                    spec, slots.pos, slots.score, length, cap, granularity, floor, self.frozen[b]
                )
                tails[b, layer] = plan.tail_start
                if plan.binned is not None:
                    self.bins[(layer, b)] = slots.take(plan.binned)
                kept = slots.take(plan.keep)
                per_b.append((kept.k, kept.v, kept.pos, kept.score))
            width = max(x[0].shape[1] for x in per_b)
            ck = per_b[0][0].new_zeros(len(specs), per_b[0][0].shape[0], width, per_b[0][0].shape[2])
            cv = torch.zeros_like(ck)
            cp = torch.zeros(len(specs), ck.shape[1], width, dtype=torch.long)
            cs = torch.zeros(len(specs), ck.shape[1], width, dtype=torch.float64)
            for b, (k, v, pos, score) in enumerate(per_b):
                n = k.shape[1]
                ck[b, :, :n], cv[b, :, :n], cp[b, :, :n], cs[b, :, :n] = k, v, pos, score
                self.cache_len[b, layer] = n  # type: ignore[index]
            self.cache_k[layer], self.cache_v[layer] = ck, cv
            self.cache_pos[layer], self.cache_score[layer] = cp, cs
            self.gen_k[layer] = self.gen_v[layer] = None
            self.gen_q[layer] = []
            record.append([x[2] for x in per_b])
            bins.append(
                [
                    self.bins[(layer, b)].pos if (layer, b) in self.bins else per_b[b][2][:, :0]
                    for b in range(len(specs))
                ]
            )
        self.flush_history.append(record)
        self.bin_history.append(bins)
        self.flushed_at = self.generated


class SlidingLayers:
    """The sliding-window layers of a run (Gemma 3's local layers): never compressed, as in vLLM, where
    they keep vLLM's own sliding-window spec. Each keeps every key of its samples and attends to the last
    ``window`` positions (query ``i`` sees keys ``j`` with ``i - window < j <= i``, vLLM's and HF's rule).

    Args:
        windows: ``(attention module, window)`` per sliding layer.
        lengths: ``[B]`` prompt lengths of the right-padded batch.
        chunk: queries per block at prefill (masks are ``[B, chunk, n]``, never ``[n, n]``).
    """

    def __init__(
        self, windows: Sequence[tuple[torch.nn.Module, int]], lengths: torch.Tensor, chunk: int = 256
    ) -> None:
        self.index = {id(m): j for j, (m, _) in enumerate(windows)}
        self.windows = [w for _, w in windows]
        self.lengths = lengths
        self.chunk = chunk
        self.k: list[torch.Tensor | None] = [None] * len(windows)  # [B, H_kv, n_max + generated, d]
        self.v: list[torch.Tensor | None] = [None] * len(windows)
        self.n_max = 0

    def has(self, module: torch.nn.Module) -> bool:
        return id(module) in self.index

    def fork(self) -> SlidingLayers:
        """A copy that shares the prompt's keys (a new run decodes on from the same prefill)."""
        out = SlidingLayers([], self.lengths, self.chunk)
        out.index, out.windows, out.n_max = self.index, self.windows, self.n_max
        out.k, out.v = list(self.k), list(self.v)
        return out

    def attend(
        self,
        module: torch.nn.Module,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        prefilled: bool,
    ) -> torch.Tensor:
        """``q``: ``[B, H, n_q, d]``; ``k``/``v``: ``[B, H_kv, n_q, d]`` → ``[B, n_q, H, d]``."""
        j = self.index[id(module)]
        window, dev = self.windows[j], q.device
        bsz, n_q = q.shape[0], q.shape[2]
        if not prefilled:
            # Right padding: the causal window keeps a valid query away from its row's padding.
            self.n_max = n_q
            self.k[j], self.v[j] = k, v
            pos = torch.arange(n_q, device=dev)
            parts = []
            for s in range(0, n_q, self.chunk):
                qp = pos[s : s + self.chunk, None]
                mask = (pos[None, :] <= qp) & (qp - pos[None, :] < window)
                parts.append(_sdpa(q[:, :, s : s + self.chunk], k, v, mask[None].expand(bsz, -1, -1), scale))
            return torch.cat(parts, 1)
        prev_k, prev_v = self.k[j], self.v[j]
        assert prev_k is not None and prev_v is not None
        keys, values = torch.cat([prev_k, k], 2), torch.cat([prev_v, v], 2)
        self.k[j], self.v[j] = keys, values
        n_gen = prev_k.shape[2] - self.n_max  # generated tokens stored before this step
        lens = self.lengths.to(dev)[:, None]  # [B, 1]
        slots = torch.arange(keys.shape[2], device=dev)[None, :]  # prompt slots, then generated ones
        kpos = torch.where(slots < self.n_max, slots, lens + slots - self.n_max)  # [B, S]
        valid = (slots >= self.n_max) | (slots < lens)
        qpos = lens + n_gen + torch.arange(n_q, device=dev)[None, :]  # [B, n_q]
        diff = qpos[:, :, None] - kpos[:, None, :]
        mask = valid[:, None, :] & (diff >= 0) & (diff < window)
        return _sdpa(q, keys, values, mask, scale)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Float32 SDPA with a boolean ``mask`` ``[B, n_q, n_k]`` shared by heads; returns ``[B, n_q, H, d]``."""
    out = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask[:, None], scale=scale, enable_gqa=True
    )
    return out.to(q.dtype).transpose(1, 2).contiguous()


def kvmm_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` entry; HF's ``attention_mask`` is ignored inside a run."""
    run = _ACTIVE.get()
    layer = None if run is None else run.layer_of.get(id(module))
    if run is not None and layer is None and run.sliding is not None and run.sliding.has(module):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return run.sliding.attend(module, query, key, value, scale, run.prefilled), None
    if layer is None:
        # Not a text-decoder layer of the active run (or no run): behave like stock SDPA.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return run.attend(layer, query, key, value, scale), None


AttentionInterface.register(ATTN_IMPLEMENTATION, kvmm_attention)


@contextmanager
def activate(run: DenseKVRun, text_configs: Sequence[Any]) -> Iterator[DenseKVRun]:
    """Route the text decoder's attention to ``run`` for the duration of the block.

    ``text_configs``: the config objects the decoder and its attention modules read
    ``_attn_implementation`` from (the vision tower keeps its own implementation).
    """
    saved = [c._attn_implementation_internal for c in text_configs]
    token = _ACTIVE.set(run)
    try:
        for c in text_configs:
            c._attn_implementation_internal = ATTN_IMPLEMENTATION
        yield run
    finally:
        for c, s in zip(text_configs, saved, strict=True):
            c._attn_implementation_internal = s
        _ACTIVE.reset(token)
