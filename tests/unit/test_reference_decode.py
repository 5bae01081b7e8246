"""Decode-time eviction in the dense reference, against an independent oracle.

The oracle keeps the whole cache and hides evicted (layer, KV head, token) entries with a mask; it
computes every attention row itself (float64), accumulates H2O's scores per step from those rows (and
from the prompt's rows), and decides each flush with the shared ``plan_flush``. The reference instead
compacts its cache and scores from buffered decode queries at the flush. They must keep the same tokens
and generate the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AttentionInterface

from vllm_kvmm.ops import LayerStats
from vllm_kvmm.policies import PromptInfo, make_policy, plan_compression, plan_flush
from vllm_kvmm.reference import DenseReference, PromptInput

IDS = [(13 * j) % 3000 + 200 for j in range(150)]


@pytest.fixture(scope="module")
def ref(tiny_llama_dir: Path) -> DenseReference:
    return DenseReference(tiny_llama_dir)


class H2OOracle:
    NAME = "kvmm_test_h2o_oracle"

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        self.layer_of = {id(m): i for i, m in enumerate(modules)}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.alive: dict[int, torch.Tensor] = {}  # [H_kv, T] bool
        self.score: dict[int, torch.Tensor] = {}  # [H_kv, T] float64
        self.colsum: dict[int, torch.Tensor] = {}

    def __call__(self, module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, **kw: Any):
        layer = self.layer_of[id(module)]
        n_q, h, h_kv = q.shape[2], q.shape[1], k.shape[1]
        g = h // h_kv
        if layer not in self.k:
            self.k[layer], self.v[layer] = k[0], v[0]
            allowed = torch.ones(h_kv, n_q, n_q, dtype=torch.bool).tril()
        else:
            self.k[layer] = torch.cat([self.k[layer], k[0]], 1)
            self.v[layer] = torch.cat([self.v[layer], v[0]], 1)
            self.alive[layer] = torch.cat([self.alive[layer], torch.ones(h_kv, n_q, dtype=torch.bool)], 1)
            self.score[layer] = torch.cat([self.score[layer], torch.zeros(h_kv, n_q, dtype=torch.float64)], 1)
            allowed = self.alive[layer][:, None, :].expand(-1, n_q, -1)
        kk = self.k[layer].repeat_interleave(g, 0).double()
        vv = self.v[layer].repeat_interleave(g, 0).double()
        z = (q[0].double() @ kk.transpose(-1, -2)) * kw["scaling"]
        p = torch.softmax(z.masked_fill(~allowed.repeat_interleave(g, 0), float("-inf")), -1)  # [H, n_q, T]
        per_kv = p.sum(1).view(h_kv, g, -1).mean(1)
        if layer not in self.colsum:
            self.colsum[layer] = per_kv
        else:
            self.score[layer] += per_kv
        out = p @ vv
        return out[None].to(q.dtype).transpose(1, 2).contiguous(), None


_ORACLE: list[H2OOracle] = []
AttentionInterface.register(H2OOracle.NAME, lambda *a, **kw: _ORACLE[0](*a, **kw))


def oracle_h2o(
    ref: DenseReference, ids: list[int], budget: float, interval: int, n: int
) -> tuple[list[int], list]:
    model = ref.model
    decoder = model.get_decoder()
    oracle = H2OOracle([layer.self_attn for layer in decoder.layers])
    _ORACLE[:] = [oracle]
    policy = make_policy("h2o", budget, {"decode_interval": interval})
    info = PromptInfo.text_only(len(ids), ref.num_layers, ref.num_kv_heads)
    spec = policy.decode_spec(info)
    saved = decoder.config._attn_implementation_internal
    decoder.config._attn_implementation_internal = H2OOracle.NAME
    flushes = []
    try:
        with torch.inference_mode():
            x = torch.tensor([ids])
            logits = model(input_ids=x, position_ids=torch.arange(len(ids))[None], use_cache=False).logits[
                0, -1
            ]
            stats = [LayerStats(colsum=oracle.colsum[i].float()) for i in range(ref.num_layers)]
            plans = plan_compression(policy, stats, info)
            capacity = [p.num_kept for p in plans]
            for layer, plan in enumerate(plans):
                alive = torch.zeros(ref.num_kv_heads, len(ids), dtype=torch.bool)
                alive.scatter_(1, plan.keep, True)
                oracle.alive[layer] = alive
                oracle.score[layer] = oracle.colsum[layer].clone()
            toks = [int(logits.argmax())]
            for t in range(1, n):
                out = model(
                    input_ids=torch.tensor([[toks[-1]]]),
                    position_ids=torch.tensor([[len(ids) + t - 1]]),
                    use_cache=False,
                )
                if t % interval == 0:
                    record = []
                    for layer in range(ref.num_layers):
                        alive = oracle.alive[layer]
                        pos = torch.stack([torch.nonzero(a).flatten() for a in alive])
                        score = torch.gather(oracle.score[layer], 1, pos)
                        plan = plan_flush(spec, pos, score, len(ids) + t, capacity[layer])
                        kept = torch.gather(pos, 1, plan.keep)
                        new = torch.zeros_like(alive)
                        new.scatter_(1, kept, True)
                        oracle.alive[layer] = new
                        record.append(kept)
                    flushes.append(record)
                toks.append(int(out.logits[0, -1].argmax()))
    finally:
        decoder.config._attn_implementation_internal = saved
    return toks, flushes


def test_h2o_decode_eviction_equals_the_masked_oracle(ref: DenseReference) -> None:
    out = ref.generate([PromptInput.from_ids(IDS)], make_policy("h2o", 0.3, {"decode_interval": 5}), 26)[0]
    toks, flushes = oracle_h2o(ref, IDS, 0.3, 5, 26)
    assert len(out.flush_positions) == len(flushes) == 5
    for mine, theirs in zip(out.flush_positions, flushes, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            assert torch.equal(a, b)
    assert out.token_ids == toks


def test_capacity_holds_after_every_flush(ref: DenseReference) -> None:
    out = ref.generate([PromptInput.from_ids(IDS)], make_policy("h2o", 0.3, {"decode_interval": 4}), 30)[0]
    for flush in out.flush_positions:
        assert [p.shape[1] for p in flush] == out.kept_tokens


def test_streaming_window_slides(ref: DenseReference) -> None:
    out = ref.generate(
        [PromptInput.from_ids(IDS)], make_policy("streamingllm", 0.2, {"decode_interval": 8}), 33
    )[0]
    cap = out.kept_tokens[0]
    for i, flush in enumerate(out.flush_positions):
        length = len(IDS) + 8 * (i + 1)
        expected = [0, 1, 2, 3, *range(length - (cap - 4), length)]
        for layer in flush:
            assert layer[0].tolist() == expected and bool((layer == layer[0]).all())


def test_long_interval_is_prefill_only(ref: DenseReference) -> None:
    p = PromptInput.from_ids(IDS)
    static = ref.generate([p], make_policy("h2o", 0.3), 12)[0]
    late = ref.generate([p], make_policy("h2o", 0.3, {"decode_interval": 100}), 12)[0]
    assert late.token_ids == static.token_ids and late.flush_positions == []


def test_decode_eviction_is_batch_invariant(ref: DenseReference) -> None:
    prompts = [PromptInput.from_ids(IDS), PromptInput.from_ids(IDS[:97])]
    policy = make_policy("h2o", 0.3, {"decode_interval": 6})
    together = ref.generate(prompts, policy, 20)
    for p, both in zip(prompts, together, strict=True):
        alone = ref.generate([p], policy, 20)[0]
        assert both.token_ids == alone.token_ids
        for x, y in zip(both.flush_positions, alone.flush_positions, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(x, y, strict=True))
