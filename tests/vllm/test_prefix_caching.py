"""Prefix caching with compression (docs/design.md, "Prefix caching"; issue 20, layer 1).

A compressing request's shared prefix (its prefix-cache hit, or what it marks with ``kv_shared_prefix``)
stays exact, keeps its hashes and is hit by later requests (the same block ids); no block after it ever
gets a hash; the rest of the prompt is compressed with statistics over the queries that ran, exactly as
the dense reference does with the same ``cached`` / ``shared`` prefix. ``full`` with prefix caching is
vanilla vLLM with prefix caching.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.vllm.conftest import BLOCK, greedy, make_llm, shutdown, token_ids
from tests.vllm.helpers import assert_same_kept_sets, block_pool, block_rows, plans_by_output_id
from vllm_kvmm.policies import make_policy, policy_names
from vllm_kvmm.reference import DenseReference, PromptInput

SYS = [(13 * j) % 3000 + 300 for j in range(64)]  # a 64-token "system prompt": 4 blocks
NEW = 8


def _ids(seed: int, n: int) -> list[int]:
    return [(31 * seed + 17 * j) % 3500 + 120 for j in range(n)]


PROMPTS = [{"prompt_token_ids": SYS + _ids(60 + i, 40 + 37 * i)} for i in range(4)]
PROMPTS += [{"prompt_token_ids": p["prompt_token_ids"] + _ids(70, 20)} for p in PROMPTS[:2]]


def _two_rounds(engine: Any, **extra: Any) -> list[tuple[list[int], int]]:
    """Prompts sharing prefixes, sent twice: each output's tokens and prefix-cache hit."""
    outs = []
    for _ in range(2):
        done = engine.generate(PROMPTS, greedy(NEW, **extra), use_tqdm=False)
        outs += [(list(o.outputs[0].token_ids), o.num_cached_tokens) for o in done]
    return outs


@pytest.fixture(scope="module")
def vanilla(tiny_llama_dir: Path) -> list[tuple[list[int], int]]:
    # Before the compressing engine: vLLM keeps one worker-side connector per process, which a vanilla
    # engine started after a compressing one would pick up.
    engine = make_llm(str(tiny_llama_dir), enable_prefix_caching=True, num_gpu_blocks_override=4 * 96)
    try:
        return _two_rounds(engine)
    finally:
        shutdown(engine)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path, vanilla: Any) -> Any:
    from vllm_kvmm.vllm_ext.worker import PlanRecorder, worker_state

    engine = make_llm(str(tiny_llama_dir), "full", enable_prefix_caching=True, num_gpu_blocks_override=4 * 96)
    worker_state().recorder = PlanRecorder()
    yield engine
    shutdown(engine)


def _run(llm: Any, rid: str, ids: list[int], params: Any, watch: bool = False) -> tuple[Any, list]:
    """Run one request alone to the end; with ``watch``, its block rows after its second step (the one
    that compresses the prompt prefilled in the first), as ``(block id, has a hash)`` then (``None`` for a
    null block): a finished request's blocks get entry keys (reuse.py), so their hashes must be read while
    it runs."""
    engine = llm.llm_engine
    engine.add_request(rid, {"prompt_token_ids": ids}, params)
    rows, out, steps = [], None, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out = o
        steps += 1
        if watch and steps == 2 and engine.has_unfinished_requests():
            null = block_pool(llm).null_block
            seen = block_rows(llm, rid)
            rows = [[None if b is null else (b.block_id, b.block_hash is not None) for b in r] for r in seen]
    return out, rows


def _kvmm(out: Any) -> dict[str, Any]:
    return (out.kv_transfer_params or {}).get("kvmm", {})


def test_shared_prefix_keeps_its_hashes_and_is_hit_by_the_next_request(
    llm: Any, reference: DenseReference
) -> None:
    from vllm_kvmm.vllm_ext.worker import worker_state

    params = greedy(NEW, kv_policy="snapkv", kv_budget=0.25, kv_shared_prefix=len(SYS))
    a_ids, b_ids = SYS + _ids(1, 300), SYS + _ids(2, 250)
    a, a_rows = _run(llm, "a", a_ids, params, watch=True)
    assert _kvmm(a)["compressed"] and _kvmm(a)["shared_prefix"] == 64 and a.num_cached_tokens == 0
    for row in a_rows:
        # Compacted: the shared prefix keeps its hashes, no block after it has one (compaction rewrote
        # them, or may rewrite them at a flush), and the evicted middle is back in the pool.
        assert all(x is not None and x[1] for x in row[:4])
        assert not any(x[1] for x in row[4:] if x is not None)
        assert None in row[4:]
    b, b_rows = _run(llm, "b", b_ids, params, watch=True)
    assert b.num_cached_tokens == 64 and _kvmm(b)["shared_prefix"] == 64
    for a_row, b_row in zip(a_rows, b_rows, strict=True):
        assert [x[0] for x in b_row[:4]] == [x[0] for x in a_row[:4]]
        # Past the prefix B computes its own (A's other blocks were freed without a hash and may be reused).
        assert not {x[0] for x in b_row[4:] if x is not None} & {x[0] for x in a_row[:4]}
    # Paged == dense: A computed every query and froze its first 64 tokens; B's statistics start after
    # the 64 tokens it found in the cache.
    policy = make_policy("snapkv", 0.25)
    recorder = worker_state().recorder
    for out, ids, cached in ((a, a_ids, 0), (b, b_ids, 64)):
        (ref,) = reference.generate(
            [PromptInput.from_ids(ids)], policy, NEW, BLOCK, cached=[cached], shared=[64]
        )
        assert list(out.outputs[0].token_ids) == ref.token_ids
        assert_same_kept_sets(plans_by_output_id(recorder.plans, out.request_id), ref.plans)
        assert all(
            torch.equal(p.keep[:, :64], torch.arange(64).expand(p.keep.shape[0], 64)) for p in ref.plans
        )


@pytest.mark.parametrize("name", [n for n in policy_names() if n != "full"])
def test_every_policy_on_a_prefix_hit_equals_the_dense_reference(
    llm: Any, reference: DenseReference, name: str
) -> None:
    """A request that finds the system prompt in the cache (put there by a marked request): kept sets and
    greedy tokens equal the dense reference with the hit's queries skipped and the prefix frozen; merging
    policies leave the frozen prefix as it was."""
    from vllm_kvmm.vllm_ext.worker import worker_state

    # The first request marks the system prompt and is compressed under the same policy: its compaction
    # (and merging) must leave the shared blocks as they were, or the next request reads other KV.
    seed = greedy(2, kv_policy=name, kv_budget=0.3, kv_shared_prefix=len(SYS))  # compressed in step 2
    _run(llm, f"seed-{name}", SYS + _ids(40, 150), seed)
    ids = SYS + _ids(sum(map(ord, name)) % 97, 260)
    out, _ = _run(llm, f"hit-{name}", ids, greedy(NEW, kv_policy=name, kv_budget=0.3))
    assert out.num_cached_tokens == 64 and _kvmm(out)["shared_prefix"] == 64
    (ref,) = reference.generate(
        [PromptInput.from_ids(ids)], make_policy(name, 0.3), NEW, BLOCK, cached=[64], shared=[64]
    )
    assert list(out.outputs[0].token_ids) == ref.token_ids
    assert_same_kept_sets(plans_by_output_id(worker_state().recorder.plans, out.request_id), ref.plans)


def test_unmarked_compressed_prompts_are_never_hit_but_full_ones_are(
    llm: Any, reference: DenseReference
) -> None:
    ids = _ids(7, 333)
    snap = greedy(NEW, kv_policy="snapkv", kv_budget=0.25)
    first, _ = _run(llm, "u1", ids, snap)
    again, _ = _run(llm, "u2", ids, snap)
    # Nothing of the first was cached: it marked no shared prefix and every block after it was compacted.
    assert again.num_cached_tokens == 0 and "shared_prefix" not in _kvmm(again)
    assert token_ids([again]) == token_ids([first])
    # A `full` request caches every block as vLLM does; a compressing request then hits them all (up to
    # the last whole block before its last token) and keeps that prefix exact.
    full, _ = _run(llm, "u3", ids, greedy(NEW, kv_policy="full"))
    hit, _ = _run(llm, "u4", ids, snap)
    assert full.num_cached_tokens == 0 and hit.num_cached_tokens == 320
    assert _kvmm(hit)["shared_prefix"] == 320
    (ref,) = reference.generate(
        [PromptInput.from_ids(ids)], make_policy("snapkv", 0.25), NEW, BLOCK, cached=[320], shared=[320]
    )
    assert token_ids([hit]) == [ref.token_ids]


def test_decode_flushes_never_evict_the_shared_prefix(llm: Any, reference: DenseReference) -> None:
    from vllm_kvmm.vllm_ext.worker import worker_state

    _run(llm, "h2o-seed", SYS + _ids(50, 10), greedy(1, kv_shared_prefix=len(SYS)))
    ids = SYS + _ids(51, 200)
    config = {"decode_interval": 8}
    params = greedy(40, kv_policy="h2o", kv_budget=0.3, kv_policy_config=json.dumps(config))
    out, _ = _run(llm, "h2o-hit", ids, params)
    assert out.num_cached_tokens == 64
    (ref,) = reference.generate(
        [PromptInput.from_ids(ids)], make_policy("h2o", 0.3, config), 40, BLOCK, cached=[64], shared=[64]
    )
    assert list(out.outputs[0].token_ids) == ref.token_ids
    mine = next(v for k, v in worker_state().recorder.flushes.items() if k.startswith("h2o-hit"))
    assert len(mine) == len(ref.flush_positions) == 4
    for a, b in zip(mine, ref.flush_positions, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        assert all(torch.equal(x[:, :64], torch.arange(64).expand(x.shape[0], 64)) for x in a)


def test_pool_is_full_after_the_drain(llm: Any) -> None:
    pool = block_pool(llm)
    assert not llm.llm_engine.has_unfinished_requests()
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


def test_full_with_prefix_caching_equals_vanilla_with_prefix_caching(llm: Any, vanilla: Any) -> None:
    """The same tokens and the same prefix-cache hits, request by request (from an empty cache)."""
    assert llm.reset_prefix_cache()
    assert _two_rounds(llm, kv_policy="full") == vanilla
    assert sum(hits for _, hits in vanilla) >= 10 * 64  # the rounds really hit the cache
