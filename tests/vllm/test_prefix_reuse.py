"""Compressed reuse across turns (vllm_ext/reuse.py; docs/design.md, "Prefix caching", layer 2).

A follow-up whose prompt extends a finished request's tokens, under the same policy and with ``kv_reuse``,
takes that request's compressed blocks (the same block ids, nulls where its middle was freed) and
prefills only what follows: its greedy tokens equal the dense reference's follow-up mode (the first turn
compressed, everything after it appended exact). Another policy, no opt-in, a decode-evicting policy or a
reset prefix cache never reuse; entries hold no memory (the pool is full when nothing runs), and an
aborted follow-up leaves the entry usable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.vllm.conftest import BLOCK, greedy, make_llm, shutdown
from tests.vllm.helpers import block_pool, block_rows
from vllm_kvmm.policies import make_policy
from vllm_kvmm.reference import DenseReference, PromptInput

SYS = [(13 * j) % 3000 + 300 for j in range(64)]  # a 64-token shared prefix: 4 blocks
NEW = 8
# Text-evicting policies (HAE and MEDA-released evict vision tokens only; every policy runs on images in
# test_prefix_reuse_vlm.py).
TEXT = ["snapkv", "pyramidkv", "meda", "lookm"]


def _ids(seed: int, n: int) -> list[int]:
    return [(31 * seed + 17 * j) % 3500 + 120 for j in range(n)]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> Any:
    engine = make_llm(
        str(tiny_llama_dir), "full", enable_prefix_caching=True, num_gpu_blocks_override=4 * 160
    )
    yield engine
    shutdown(engine)


def _run(llm: Any, rid: str, ids: list[int], params: Any, abort_after: int | None = None) -> tuple[Any, list]:
    """Run one request alone; returns its final output and its block rows just before it finished."""
    engine = llm.llm_engine
    engine.add_request(rid, {"prompt_token_ids": ids}, params)
    rows: list = []
    out = None
    steps = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps += 1
        for o in outs:
            if o.finished:
                out = o
        if engine.has_unfinished_requests():
            rows = block_rows(llm, rid)
            if abort_after is not None and steps >= abort_after:
                engine.abort_request([next(r for r in engine.output_processor.request_states)])
    return out, rows


def _kvmm(out: Any) -> dict[str, Any]:
    return (out.kv_transfer_params or {}).get("kvmm", {})


def _ids_of(rows: list[list[Any]], n: int, null: Any) -> list[list[int | None]]:
    return [[None if b is null else b.block_id for b in row[:n]] for row in rows]


def _assert_pool_full(llm: Any) -> None:
    pool = block_pool(llm)
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # all but the null block


@pytest.mark.parametrize("name", TEXT)
def test_a_follow_up_takes_the_entry_blocks_and_equals_the_dense_reference(
    llm: Any, reference: DenseReference, name: str
) -> None:
    null = block_pool(llm).null_block
    a_ids = SYS + _ids(1, 300)
    params = greedy(NEW, kv_policy=name, kv_budget=0.25, kv_shared_prefix=len(SYS))
    a, a_rows = _run(llm, f"{name}-a", a_ids, params)
    assert _kvmm(a)["compressed"], _kvmm(a)
    p = max(a.num_cached_tokens, len(SYS))  # the exact prefix A compressed behind
    _assert_pool_full(llm)  # the entry holds no memory: its blocks are free until vLLM reuses them
    a_out = list(a.outputs[0].token_ids)
    ext = a_out + _ids(5, 40)
    h = (len(a_ids) + NEW - 1) // BLOCK  # A's whole computed blocks
    b, b_rows = _run(
        llm, f"{name}-b", a_ids + ext, greedy(NEW, kv_policy=name, kv_budget=0.25, kv_reuse=True)
    )
    assert _kvmm(b)["reused"] == h * BLOCK and not _kvmm(b)["compressed"]
    # The same blocks, the freed middle null in both.
    assert _ids_of(b_rows, h, null) == _ids_of(a_rows, h, null)
    assert any(x is None for row in _ids_of(b_rows, h, null) for x in row)
    policy = make_policy(name, 0.25)
    ref = reference.generate_followup(
        PromptInput.from_ids(a_ids), ext, policy, NEW, BLOCK, cached=a.num_cached_tokens, shared=p
    )
    assert list(b.outputs[0].token_ids) == ref.token_ids
    _assert_pool_full(llm)


def test_only_the_same_policy_with_opt_in_reuses(llm: Any, reference: DenseReference) -> None:
    a_ids = SYS + _ids(2, 280)
    a, _ = _run(llm, "p-a", a_ids, greedy(NEW, kv_policy="snapkv", kv_budget=0.25, kv_shared_prefix=64))
    follow = a_ids + list(a.outputs[0].token_ids) + _ids(6, 30)
    for rid, extra in (
        ("p-budget", {"kv_policy": "snapkv", "kv_budget": 0.5, "kv_reuse": True}),
        ("p-policy", {"kv_policy": "pyramidkv", "kv_budget": 0.25, "kv_reuse": True}),
        (
            "p-config",
            {"kv_policy": "snapkv", "kv_budget": 0.25, "kv_policy_config": {"window": 8}, "kv_reuse": True},
        ),
        ("p-optout", {"kv_policy": "snapkv", "kv_budget": 0.25}),
    ):
        out, _ = _run(llm, rid, follow, greedy(NEW, **extra))
        assert "reused" not in _kvmm(out), rid
        # Compressed afresh behind the exact shared prefix it found in the cache (layer 1).
        assert out.num_cached_tokens == 64 and _kvmm(out)["compressed"], rid
        config = extra.get("kv_policy_config", {})
        policy = make_policy(extra["kv_policy"], extra["kv_budget"], config)
        (ref,) = reference.generate(
            [PromptInput.from_ids(follow)], policy, NEW, BLOCK, cached=[64], shared=[64]
        )
        assert list(out.outputs[0].token_ids) == ref.token_ids, rid


def test_the_third_turn_reuses_the_second(llm: Any, reference: DenseReference) -> None:
    extra = {"kv_policy": "snapkv", "kv_budget": 0.25, "kv_reuse": True}
    t1 = SYS + _ids(3, 260)
    a, _ = _run(llm, "t-1", t1, greedy(NEW, **extra))
    t2 = t1 + list(a.outputs[0].token_ids) + _ids(7, 25)
    b, _ = _run(llm, "t-2", t2, greedy(NEW, **extra))
    t3 = t2 + list(b.outputs[0].token_ids) + _ids(8, 33)
    c, _ = _run(llm, "t-3", t3, greedy(NEW, **extra))
    assert _kvmm(b)["reused"] == (len(t1) + NEW - 1) // BLOCK * BLOCK
    assert _kvmm(c)["reused"] == (len(t2) + NEW - 1) // BLOCK * BLOCK
    policy = make_policy("snapkv", 0.25)
    hit = a.num_cached_tokens  # SYS, cached by earlier tests: A compressed behind it
    ref = reference.generate_followup(
        PromptInput.from_ids(t1), t3[len(t1) :], policy, NEW, BLOCK, cached=hit, shared=hit
    )
    assert list(c.outputs[0].token_ids) == ref.token_ids


def test_no_entry_under_a_decode_evicting_policy_or_after_a_cache_reset(llm: Any) -> None:
    a_ids = SYS + _ids(4, 270)
    extra = {
        "kv_policy": "h2o",
        "kv_budget": 0.25,
        "kv_policy_config": {"decode_interval": 4},
        "kv_reuse": True,
    }
    a, _ = _run(llm, "h-a", a_ids, greedy(NEW, **extra))
    b, _ = _run(llm, "h-b", a_ids + list(a.outputs[0].token_ids) + _ids(9, 20), greedy(NEW, **extra))
    assert "reused" not in _kvmm(b)
    extra = {"kv_policy": "snapkv", "kv_budget": 0.25, "kv_reuse": True}
    a, _ = _run(llm, "r-a", a_ids, greedy(NEW, **extra))
    assert llm.reset_prefix_cache()
    b, _ = _run(llm, "r-b", a_ids + list(a.outputs[0].token_ids) + _ids(9, 20), greedy(NEW, **extra))
    assert "reused" not in _kvmm(b) and b.num_cached_tokens == 0


def test_an_aborted_follow_up_leaves_the_entry_usable(llm: Any, reference: DenseReference) -> None:
    extra = {"kv_policy": "snapkv", "kv_budget": 0.25, "kv_shared_prefix": 64, "kv_reuse": True}
    a_ids = SYS + _ids(10, 290)
    a, _ = _run(llm, "x-a", a_ids, greedy(NEW, **extra))
    a_out = list(a.outputs[0].token_ids)
    aborted, _ = _run(llm, "x-b", a_ids + a_out + _ids(11, 35), greedy(NEW, **extra), abort_after=2)
    assert aborted is None or aborted.finished
    _assert_pool_full(llm)
    follow = a_ids + a_out + _ids(12, 35)  # another question: only A's part is shared with the aborted one
    b, _ = _run(llm, "x-c", follow, greedy(NEW, **extra))
    assert _kvmm(b)["reused"] == (len(a_ids) + NEW - 1) // BLOCK * BLOCK
    hit = a.num_cached_tokens
    ref = reference.generate_followup(
        PromptInput.from_ids(a_ids), follow[len(a_ids) :], make_policy("snapkv", 0.25), NEW, BLOCK,
        cached=hit, shared=max(hit, 64),
    )  # fmt: skip
    assert list(b.outputs[0].token_ids) == ref.token_ids
    _assert_pool_full(llm)
