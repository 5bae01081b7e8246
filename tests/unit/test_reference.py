"""The dense reference against Hugging Face ``generate`` and an independent masked-full-cache oracle.

Test policies are defined here (subclasses of :class:`KVPolicy`), so these tests depend only on the
policy base API. The oracle below is a separate implementation: it keeps the FULL prompt cache, hides
evicted (layer, KV head, token) entries with a mask, and computes attention with an explicit softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, AutoProcessor, AutoTokenizer

from vllm_kvmm.ops import LayerStats, StatsRequest
from vllm_kvmm.policies.base import KVPolicy, LayerPlan, MergeSpec, PromptInfo, budget_tokens
from vllm_kvmm.reference import DenseReference, PromptInput, prompt_from_messages, prompt_from_text

# ---------------------------------------------------------------------------------------------------
# test policies
# ---------------------------------------------------------------------------------------------------


class KeepAll(KVPolicy):
    name: ClassVar[str] = "test_keep_all"


class ColSum(KVPolicy):
    """H2O-like: keep the tokens with the largest attention column sums, per KV head."""

    name: ClassVar[str] = "test_colsum"
    recent: int = 0

    def stats_request(self, info: PromptInfo) -> StatsRequest:
        return StatsRequest(colsum=True)

    def recent_window(self, info: PromptInfo, budget: int) -> int:
        return min(self.recent, budget)

    def scores(self, stats: Sequence[LayerStats | None], info: PromptInfo, layer: int) -> torch.Tensor:
        return stats[layer].colsum


class PerLayer(ColSum):
    """Layer ``l`` keeps a different share of the prompt: 0.9, 0.7, 0.5, 0.3, ... (PyramidKV-like)."""

    name: ClassVar[str] = "test_per_layer"

    def layer_budgets(self, stats: Sequence[LayerStats | None], info: PromptInfo) -> list[int]:
        return [
            budget_tokens(max(0.9 - 0.2 * layer, 0.1), info.num_tokens) for layer in range(info.num_layers)
        ]


class WindowMerge(KVPolicy):
    """SnapKV-like scores from the last 8 queries, evicted tokens averaged into their nearest kept ones."""

    name: ClassVar[str] = "test_window_merge"

    def stats_request(self, info: PromptInfo) -> StatsRequest:
        return StatsRequest(window=8)

    def recent_window(self, info: PromptInfo, budget: int) -> int:
        return min(8, budget)

    def scores(self, stats: Sequence[LayerStats | None], info: PromptInfo, layer: int) -> torch.Tensor:
        return stats[layer].window

    def merge_spec(self, info: PromptInfo) -> MergeSpec | None:
        return MergeSpec(kind="average")


# ---------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path) -> tuple[DenseReference, Any]:
    return DenseReference(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def llava(tiny_llava_dir: Path) -> tuple[DenseReference, Any]:
    return DenseReference(tiny_llava_dir), AutoProcessor.from_pretrained(tiny_llava_dir)


@pytest.fixture(scope="module")
def qwen2vl(tiny_qwen2vl_dir: Path) -> tuple[DenseReference, Any]:
    return DenseReference(tiny_qwen2vl_dir), AutoProcessor.from_pretrained(tiny_qwen2vl_dir)


TEXTS = [
    "Tell me a story about a cat.",
    "List three prime numbers and explain why each one is prime, using short sentences that a child "
    "could follow. Then name a famous mathematician who studied primes.",
    "Hi",
]


def image_messages(n_images: int, text: str) -> list[dict[str, Any]]:
    content: list[dict[str, str]] = [{"type": "image"} for _ in range(n_images)]
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


def hf_greedy(model: torch.nn.Module, p: PromptInput, n: int) -> list[int]:
    """Stock ``model.generate`` (SDPA + DynamicCache), stopping at EOS."""
    kw: dict[str, Any] = dict(p.mm_inputs)
    if p.mm_token_type_ids is not None:
        kw["mm_token_type_ids"] = p.mm_token_type_ids[None]
    ids = p.input_ids[None]
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, **kw
    )
    return out[0, p.num_tokens :].tolist()


# ---------------------------------------------------------------------------------------------------
# the independent oracle: full cache + evicted entries masked, explicit softmax
# ---------------------------------------------------------------------------------------------------


class MaskedFullCache:
    """Attention function with a full per-layer cache; ``keep[l]`` ``[H_kv, N]`` hides evicted prompt keys."""

    NAME = "kvmm_test_masked_full"

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        self.layer_of = {id(m): i for i, m in enumerate(modules)}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.keep: list[torch.Tensor] | None = None

    def __call__(self, module: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, **kw: Any):
        layer = self.layer_of[id(module)]
        n_q = q.shape[2]
        if layer not in self.k:  # prefill of one prompt: plain causal
            allowed = torch.ones(n_q, n_q, dtype=torch.bool).tril()[None]
            self.k[layer], self.v[layer] = k, v
        else:
            n_prompt = self.keep[layer].shape[1]
            n_past = self.k[layer].shape[2]
            allowed = torch.ones(k.shape[1], n_q, n_past + n_q, dtype=torch.bool)
            allowed[:, :, :n_prompt] = self.keep[layer][:, None, :]
            allowed[:, :, n_past:] = torch.ones(n_q, n_q, dtype=torch.bool).tril()
            self.k[layer] = torch.cat([self.k[layer], k], 2)
            self.v[layer] = torch.cat([self.v[layer], v], 2)
        group = q.shape[1] // k.shape[1]
        kk = self.k[layer].repeat_interleave(group, 1).double()
        vv = self.v[layer].repeat_interleave(group, 1).double()
        allowed = allowed.repeat_interleave(group, 0) if allowed.shape[0] > 1 else allowed
        z = (q.double() @ kk.transpose(-1, -2)) * kw["scaling"]
        z = z.masked_fill(~allowed[None], float("-inf"))
        out = torch.softmax(z, -1) @ vv
        return out.to(q.dtype).transpose(1, 2).contiguous(), None


_ORACLE: list[MaskedFullCache] = []  # the instance the registered function forwards to
AttentionInterface.register(MaskedFullCache.NAME, lambda *a, **kw: _ORACLE[0](*a, **kw))


def oracle_decode(
    ref: DenseReference,
    p: PromptInput,
    plans: list[LayerPlan] | None,
    n: int,
    position_offset: int | None = None,
) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and ``[n, V]`` logits decoding from the full cache with evicted entries masked.

    ``position_offset``: text position of the first generated token (default ``N``, the true one).
    """
    model = ref.model
    decoder = model.get_decoder()
    oracle = MaskedFullCache([layer.self_attn for layer in decoder.layers])
    _ORACLE[:] = [oracle]
    mm: dict[str, Any] = dict(p.mm_inputs)
    base = model.base_model
    if hasattr(base, "get_rope_index"):  # M-RoPE: HF's own index, text tokens get + delta on all 3 axes
        tt = p.mm_token_type_ids if p.mm_token_type_ids is not None else torch.zeros_like(p.input_ids)
        grids = {k: v for k, v in mm.items() if k.endswith("grid_thw")}
        pos, delta = base.get_rope_index(p.input_ids[None], mm_token_type_ids=tt[None], **grids)
        delta = int(delta)

        def text_pos(t: int) -> torch.Tensor:
            return torch.full((3, 1, 1), t + delta)
    else:
        pos = torch.arange(p.num_tokens)[None]

        def text_pos(t: int) -> torch.Tensor:
            return torch.tensor([[t]])

    saved = decoder.config._attn_implementation_internal
    decoder.config._attn_implementation_internal = MaskedFullCache.NAME
    try:
        with torch.inference_mode():
            logits = model(input_ids=p.input_ids[None], position_ids=pos, use_cache=False, **mm).logits[0, -1]
            oracle.keep = []
            for layer in range(len(oracle.k)):
                keep = torch.zeros(ref.num_kv_heads, p.num_tokens, dtype=torch.bool)
                if plans is None:
                    keep[:] = True
                else:
                    keep.scatter_(1, plans[layer].keep, True)
                oracle.keep.append(keep)
            start = p.num_tokens if position_offset is None else position_offset
            steps, toks = [logits], [int(logits.argmax())]
            for t in range(1, n):
                ids = torch.tensor([[toks[-1]]])
                out = model(input_ids=ids, position_ids=text_pos(start + t - 1), use_cache=False)
                logits = out.logits[0, -1]
                steps.append(logits)
                toks.append(int(logits.argmax()))
    finally:
        decoder.config._attn_implementation_internal = saved
    return toks, torch.stack(steps).float()


# ---------------------------------------------------------------------------------------------------
# identity: keep-everything reproduces Hugging Face generate
# ---------------------------------------------------------------------------------------------------


def test_identity_tiny_llama(llama: tuple[DenseReference, Any]) -> None:
    ref, tok = llama
    for text in TEXTS:
        p = prompt_from_text(tok, text)
        out = ref.generate([p], KeepAll(), 24, stop_at_eos=True)[0]
        assert out.token_ids == hf_greedy(ref.model, p, 24)
        assert out.kept_tokens == [p.num_tokens] * 4 and out.kv_fraction == 1.0


def test_identity_tiny_llava(llava: tuple[DenseReference, Any], images: list) -> None:
    ref, proc = llava
    p = prompt_from_messages(proc, image_messages(1, "Describe the image."), images[:1])
    assert p.vision_mask.any()
    out = ref.generate([p], KeepAll(), 24, stop_at_eos=True)[0]
    assert out.token_ids == hf_greedy(ref.model, p, 24)


def test_identity_tiny_qwen2vl(qwen2vl: tuple[DenseReference, Any], images: list) -> None:
    ref, proc = qwen2vl
    for imgs in (images[:1], images[1:3]):
        p = prompt_from_messages(proc, image_messages(len(imgs), "Describe the image."), imgs)
        out = ref.generate([p], KeepAll(), 24, stop_at_eos=True)[0]
        assert out.token_ids == hf_greedy(ref.model, p, 24)


@pytest.mark.slow
def test_identity_smollm2(smollm2_dir: Path) -> None:
    ref = DenseReference(smollm2_dir)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    p = prompt_from_text(tok, "What is the capital of France?")
    out = ref.generate([p], KeepAll(), 20, stop_at_eos=True)[0]
    assert out.token_ids == hf_greedy(ref.model, p, 20)
    assert out.token_ids[-1] == tok.eos_token_id  # stopped at EOS
    assert "Paris" in tok.decode(out.token_ids)


# ---------------------------------------------------------------------------------------------------
# vision masks come from the processor
# ---------------------------------------------------------------------------------------------------


def test_vision_masks_from_processor(
    llava: tuple[DenseReference, Any], qwen2vl: tuple[DenseReference, Any], images: list
) -> None:
    for ref, proc in (llava, qwen2vl):
        image_id = ref.model.config.image_token_id
        for k in (1, 2):
            p = prompt_from_messages(proc, image_messages(k, "What is shown?"), images[:k])
            assert torch.equal(p.vision_mask, p.input_ids == image_id)
            if "image_grid_thw" in p.mm_inputs:  # Qwen2-VL: each image's merged 2×2 grid
                expected = int(p.mm_inputs["image_grid_thw"].prod(-1).sum()) // 4
            else:  # LLaVA: (112 / 14)² patches per image
                expected = k * 64
            assert int(p.vision_mask.sum()) == expected
        assert not prompt_from_text(proc, "no image here").vision_mask.any()


# ---------------------------------------------------------------------------------------------------
# batch invariance
# ---------------------------------------------------------------------------------------------------


def assert_batch_invariant(
    ref: DenseReference, prompts: list[PromptInput], policy: KVPolicy, n: int = 12
) -> None:
    batch = ref.generate(prompts, policy, n)
    assert len({p.num_tokens for p in prompts}) == len(prompts)  # really different lengths
    for p, got in zip(prompts, batch, strict=True):
        alone = ref.generate([p], policy, n)[0]
        assert got.token_ids == alone.token_ids
        assert len(got.plans) == len(alone.plans) == ref.num_layers
        for a, b in zip(got.plans, alone.plans, strict=True):
            assert torch.equal(a.keep, b.keep)
        assert got.kept_tokens == alone.kept_tokens


@pytest.mark.parametrize(
    "policy", [ColSum(budget=0.5), PerLayer(budget=0.5, recent=3)], ids=["colsum", "per_layer"]
)
def test_batch_invariance_text(llama: tuple[DenseReference, Any], policy: KVPolicy) -> None:
    ref, tok = llama
    prompts = [prompt_from_text(tok, t) for t in TEXTS]
    assert_batch_invariant(ref, prompts, policy)


def test_batch_invariance_llava(llava: tuple[DenseReference, Any], images: list) -> None:
    ref, proc = llava
    prompts = [
        prompt_from_messages(proc, image_messages(1, TEXTS[0]), images[:1]),
        prompt_from_messages(proc, image_messages(2, TEXTS[1]), images[1:3]),
        prompt_from_text(proc, TEXTS[2]),  # a text-only request in the same batch
    ]
    for policy in (ColSum(budget=0.5), PerLayer(budget=0.5, recent=3)):
        assert_batch_invariant(ref, prompts, policy)


def test_batch_invariance_qwen2vl(qwen2vl: tuple[DenseReference, Any], images: list) -> None:
    ref, proc = qwen2vl
    prompts = [
        prompt_from_messages(proc, image_messages(1, TEXTS[1]), images[:1]),
        prompt_from_messages(proc, image_messages(1, TEXTS[2]), images[1:2]),
        prompt_from_text(proc, TEXTS[0]),
    ]
    assert_batch_invariant(ref, prompts, PerLayer(budget=0.5, recent=3))


def test_per_layer_budgets_reach_the_cache(llama: tuple[DenseReference, Any]) -> None:
    ref, tok = llama
    p = prompt_from_text(tok, TEXTS[1])
    out = ref.generate([p], PerLayer(budget=0.5), 2)[0]
    n = p.num_tokens
    assert out.kept_tokens == [budget_tokens(r, n) for r in (0.9, 0.7, 0.5, 0.3)]
    per_token = 2 * 2 * 32 * 4  # K+V, 2 KV heads, head_dim 32, float32
    assert (out.kv_bytes_kept, out.kv_bytes_full) == (sum(out.kept_tokens) * per_token, 4 * n * per_token)


# ---------------------------------------------------------------------------------------------------
# compacted cache == full cache with evicted entries masked (independent oracle); true positions
# ---------------------------------------------------------------------------------------------------


def assert_matches_oracle(
    ref: DenseReference, p: PromptInput, policy: KVPolicy, n: int, granularity: int = 1
) -> None:
    out = ref.generate([p], policy, n, granularity, return_logits=True)[0]
    assert any(not plan.is_identity for plan in out.plans)
    # Per-head kept sets differ somewhere, so the oracle's per-head masks matter.
    assert any(not torch.equal(plan.keep[0], plan.keep[1]) for plan in out.plans)
    toks, logits = oracle_decode(ref, p, out.plans, n)
    assert out.token_ids == toks
    torch.testing.assert_close(out.logits, logits, atol=2e-4, rtol=1e-4)


def test_compacted_equals_masked_full_llama(llama: tuple[DenseReference, Any]) -> None:
    ref, tok = llama
    p = prompt_from_text(tok, TEXTS[1])
    assert_matches_oracle(ref, p, PerLayer(budget=0.5, recent=2), 16)
    assert_matches_oracle(ref, p, ColSum(budget=0.4), 16, granularity=4)


def test_compacted_equals_masked_full_qwen2vl(qwen2vl: tuple[DenseReference, Any], images: list) -> None:
    ref, proc = qwen2vl
    p = prompt_from_messages(proc, image_messages(1, TEXTS[0]), images[1:2])
    assert_matches_oracle(ref, p, PerLayer(budget=0.5, recent=2), 16)


def test_compacted_equals_masked_full_llava(llava: tuple[DenseReference, Any], images: list) -> None:
    ref, proc = llava
    p = prompt_from_messages(proc, image_messages(1, TEXTS[0]), images[:1])
    assert_matches_oracle(ref, p, ColSum(budget=0.3, recent=4), 16)


def test_true_positions(llama: tuple[DenseReference, Any]) -> None:
    """New tokens sit at ``N + t``; positions from the compacted length ``K + t`` give other tokens."""
    ref, tok = llama
    p = prompt_from_text(tok, TEXTS[1])
    policy = ColSum(budget=0.25, recent=2)
    out = ref.generate([p], policy, 16, return_logits=True)[0]
    kept = out.kept_tokens[0]
    assert out.kept_tokens == [kept] * ref.num_layers and kept < p.num_tokens
    true_toks, true_logits = oracle_decode(ref, p, out.plans, 16)
    wrong_toks, wrong_logits = oracle_decode(ref, p, out.plans, 16, position_offset=kept)
    assert out.token_ids == true_toks
    torch.testing.assert_close(out.logits, true_logits, atol=2e-4, rtol=1e-4)
    # The check has teeth: cache-length positions change the decode.
    assert wrong_toks != true_toks
    assert (out.logits[1:] - wrong_logits[1:]).abs().max() > 1e-2


@pytest.mark.slow
def test_compacted_equals_masked_full_smollm2(smollm2_dir: Path) -> None:
    ref = DenseReference(smollm2_dir)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    doc = " ".join(f"Box {i} holds a {['red', 'green', 'blue'][i % 3]} ball." for i in range(40))
    p = prompt_from_text(tok, doc + " What colour is the ball in box 7?")
    assert_matches_oracle(ref, p, PerLayer(budget=0.5, recent=16), 8, granularity=16)


# ---------------------------------------------------------------------------------------------------
# merging and teacher-forced log-probabilities
# ---------------------------------------------------------------------------------------------------


def test_merge_changes_cache_not_selection(llama: tuple[DenseReference, Any]) -> None:
    ref, tok = llama
    p = prompt_from_text(tok, TEXTS[1])

    class WindowDrop(WindowMerge):
        def merge_spec(self, info: PromptInfo) -> MergeSpec | None:
            return None

    merged = ref.generate([p], WindowMerge(budget=0.4), 8, return_logits=True)[0]
    dropped = ref.generate([p], WindowDrop(budget=0.4), 8, return_logits=True)[0]
    for a, b in zip(merged.plans, dropped.plans, strict=True):
        assert torch.equal(a.keep, b.keep)
    # The first token comes from the prefill (before compression); later ones see merged values.
    torch.testing.assert_close(merged.logits[0], dropped.logits[0])
    assert not torch.allclose(merged.logits[1:], dropped.logits[1:], atol=1e-3)


def test_continuation_logprobs(llama: tuple[DenseReference, Any]) -> None:
    ref, tok = llama
    p = prompt_from_text(tok, TEXTS[0])
    cont = tok("The cat sat on the mat.", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    # Keep-all: one plain forward over prompt + continuation.
    with torch.inference_mode():
        full = ref.model(input_ids=torch.cat([p.input_ids, cont])[None]).logits[0].float()
    expected = torch.log_softmax(full[p.num_tokens - 1 : -1], -1).gather(1, cont[:, None])[:, 0]
    torch.testing.assert_close(ref.continuation_logprobs(p, cont, KeepAll()), expected, atol=1e-4, rtol=1e-4)
    # Compressed: teacher forcing the oracle's own greedy continuation reproduces its log-probs.
    policy = PerLayer(budget=0.5, recent=2)
    out = ref.generate([p], policy, 6)[0]
    toks, logits = oracle_decode(ref, p, out.plans, 6)
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(toks)[:, None])[:, 0]
    torch.testing.assert_close(ref.continuation_logprobs(p, toks, policy), expected, atol=1e-4, rtol=1e-4)


def test_generate_variants_equals_generate_per_policy(
    llava: tuple[DenseReference, Any], images: list
) -> None:
    # One shared prefill with the union of the statistics gives each policy exactly what running it alone
    # gives: same kept sets, same tokens (the design sweep's premise, vllm_kvmm/bench/sweep.py).
    from vllm_kvmm.policies import make_policy, policy_names

    ref, proc = llava
    prompt = prompt_from_messages(proc, image_messages(2, TEXTS[1]), images[1:3])
    names = [n for n in policy_names() if n != "full"]
    policies = [make_policy("full")] + [make_policy(n, 0.3) for n in names]
    # Entropies from other row samples cannot share a prefill with the rest: a prefill of their own each.
    policies += [make_policy("meda", 0.3, {"entropy_step": s}) for s in (1, 3)]
    policies += [make_policy("h2o", 0.3, {"score_step": 3}), make_policy("lookm", 0.3, {"score_step": 3})]
    together = ref.generate_variants(prompt, policies, 5, granularity=4)
    assert len(together) == len(policies)
    for policy, got in zip(policies, together, strict=True):
        (alone,) = ref.generate([prompt], policy, 5, granularity=4)
        assert got.token_ids == alone.token_ids, policy.name
        assert got.kept_tokens == alone.kept_tokens, policy.name
        for a, b in zip(got.plans, alone.plans, strict=True):
            assert torch.equal(a.keep, b.keep), policy.name
    with pytest.raises(ValueError, match="decode-time eviction"):
        ref.generate_variants(prompt, [make_policy("h2o", 0.5, {"decode_interval": 4})], 3)


def test_collect_stats_feeds_each_request_its_own_accumulators(
    llava: tuple[DenseReference, Any], images: list
) -> None:
    from vllm_kvmm.ops import StatsRequest

    ref, proc = llava
    prompt = prompt_from_messages(proc, image_messages(2, TEXTS[1]), images[1:3])
    exact = StatsRequest(cross_entropy=True, window=4)
    sampled = StatsRequest(cross_entropy=True, entropy_step=3)
    (both_exact, both_sampled), seconds = ref.collect_stats(prompt, [exact, sampled])
    (alone_exact,), _ = ref.collect_stats(prompt, [exact])
    (alone_sampled,), _ = ref.collect_stats(prompt, [sampled])
    assert len(seconds) == 2 and all(t > 0 for t in seconds)
    assert len(both_exact) == ref.num_layers
    for a, b, c, d in zip(both_exact, alone_exact, both_sampled, alone_sampled, strict=True):
        assert torch.equal(a.window, b.window) and c.window is None
        for field in ("entropy_tv", "entropy_vt"):
            assert float(getattr(a, field)) == float(getattr(b, field))
            assert float(getattr(c, field)) == float(getattr(d, field))
    # The sample is another set of rows: another mean (both finite on an image prompt).
    pairs = zip(both_exact, both_sampled, strict=True)
    assert any(float(a.entropy_vt) != float(c.entropy_vt) for a, c in pairs)


def test_union_of_requests_refuses_different_row_samples() -> None:
    from vllm_kvmm.ops import StatsRequest
    from vllm_kvmm.reference.dense import union_request

    one = StatsRequest(cross_entropy=True, entropy_step=2)
    assert union_request([one, StatsRequest(window=3, entropy_step=5)]).entropy_step == 2  # no entropy
    with pytest.raises(ValueError, match="different row samples"):
        union_request([one, StatsRequest(entropy=True, entropy_step=4)])
    cols = StatsRequest(colsum=True, colsum_step=3)
    assert union_request([cols, StatsRequest(window=3, colsum_step=5)]).colsum_step == 3  # no colsum
    both = StatsRequest(colsum=True, cross_entropy=True, entropy_step=2, colsum_step=3)
    assert union_request([cols, one]) == both
    with pytest.raises(ValueError, match="column sums from different row samples"):
        union_request([cols, StatsRequest(colsum=True)])


def test_batch_invariance_across_tile_counts(tiny_llava_next_dir: Path) -> None:
    """LLaVA-NeXT pads ``pixel_values`` to a prompt's largest tile count; prompts whose images have
    different tile counts (a small square image: fewer tiles) still share one prefill, padded."""
    from PIL import Image

    ref, proc = DenseReference(tiny_llava_next_dir), AutoProcessor.from_pretrained(tiny_llava_next_dir)
    rgb = np.random.default_rng(5).integers(0, 256, (200, 150, 3), dtype=np.uint8)
    small, tall = Image.fromarray(rgb[:40, :40]), Image.fromarray(rgb)
    prompts = [
        prompt_from_messages(proc, image_messages(1, TEXTS[0]), [small]),
        prompt_from_messages(proc, image_messages(1, TEXTS[1]), [tall]),
    ]
    tiles = [p.mm_inputs["pixel_values"].shape[1] for p in prompts]
    assert tiles[0] < tiles[1], tiles
    assert_batch_invariant(ref, prompts, PerLayer(budget=0.5, recent=3))
