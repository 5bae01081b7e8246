"""Lifecycle under continuous batching: chunked prefill, aborts, preemption, late arrivals — no leaks.

One engine: snapkv at 0.5 by default, prefill chunks of 64 tokens, a pool of 96 one-layer blocks (24 per
layer: 384 tokens per request), so long generations must preempt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.vllm.conftest import BLOCK, greedy, make_llm, shutdown
from tests.vllm.helpers import (
    PreemptionCounter,
    assert_same_kept_sets,
    block_pool,
    plans_by_output_id,
    scheduler,
)
from vllm_kvmm.policies import make_policy
from vllm_kvmm.reference import DenseReference, PromptInput

POOL = 96


def _ids(i: int, n: int) -> list[int]:
    return [(13 * i + 5 * j) % 2500 + 400 for j in range(n)]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> Any:
    from vllm_kvmm.vllm_ext.worker import worker_state

    engine = make_llm(
        str(tiny_llama_dir),
        "snapkv",
        0.5,
        num_gpu_blocks_override=POOL,
        max_model_len=384,
        max_num_batched_tokens=64,
        max_num_seqs=4,
    )
    from vllm_kvmm.vllm_ext.worker import PlanRecorder

    worker_state().recorder = PlanRecorder()
    yield engine
    shutdown(engine)


def _drain(llm: Any) -> dict[str, list[int]]:
    engine, out = llm.llm_engine, {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = list(o.outputs[0].token_ids)
    return out


def _assert_clean(llm: Any) -> None:
    """Nothing leaked: every block is back, and no request state lingers on either side."""
    from vllm_kvmm.vllm_ext.worker import worker_state

    pool = block_pool(llm)
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
    llm.llm_engine.step()  # an empty step delivers the last finished ids to the worker
    assert worker_state().requests == {}
    conn = scheduler(llm).connector
    assert conn._requests == {} and conn._policies == {}


def test_chunked_prefill_equals_dense(llm: Any, reference: DenseReference) -> None:
    from vllm_kvmm.vllm_ext.worker import worker_state

    ids = _ids(0, 200)  # four chunks of 64 tokens
    llm.llm_engine.add_request("chunked", {"prompt_token_ids": ids}, greedy(12))
    steps_with_prefill = 0
    out = {}
    while llm.llm_engine.has_unfinished_requests():
        req = scheduler(llm).requests.get(next(iter(scheduler(llm).requests), ""), None)
        if req is not None and req.num_computed_tokens < req.num_prompt_tokens:
            steps_with_prefill += 1
        for o in llm.llm_engine.step():
            if o.finished:
                out[o.request_id] = list(o.outputs[0].token_ids)
    assert steps_with_prefill >= 4
    ref = reference.generate([PromptInput.from_ids(ids)], make_policy("snapkv", 0.5), 12, granularity=BLOCK)[
        0
    ]
    assert out["chunked"] == ref.token_ids
    assert_same_kept_sets(plans_by_output_id(worker_state().recorder.plans, "chunked"), ref.plans)
    _assert_clean(llm)


def test_abort_mid_decode(llm: Any) -> None:
    engine = llm.llm_engine
    for i in range(3):
        engine.add_request(f"a{i}", {"prompt_token_ids": _ids(i, 120)}, greedy(40))
    for _ in range(8):
        engine.step()
    engine.abort_request(["a1"])
    out = _drain(llm)
    assert set(out) == {"a0", "a2"} and all(len(v) == 40 for v in out.values())
    _assert_clean(llm)


def test_preemption_and_recompute(llm: Any) -> None:
    engine = llm.llm_engine
    with PreemptionCounter(llm) as counter:
        for i in range(3):
            engine.add_request(f"p{i}", {"prompt_token_ids": _ids(10 + i, 150)}, greedy(200))
        out = _drain(llm)
    preempted = counter.count
    assert preempted > 0  # the path under test really ran
    assert sorted(out) == ["p0", "p1", "p2"] and all(len(v) == 200 for v in out.values())
    _assert_clean(llm)


def test_requests_arriving_while_others_decode(llm: Any, reference: DenseReference) -> None:
    engine = llm.llm_engine
    prompts = {f"l{i}": _ids(20 + i, 90 + 7 * i) for i in range(4)}
    names = list(prompts)
    for name in names[:2]:
        engine.add_request(name, {"prompt_token_ids": prompts[name]}, greedy(16))
    out: dict[str, list[int]] = {}
    for _ in range(6):  # the first two are decoding when the others arrive
        for o in engine.step():
            if o.finished:
                out[o.request_id] = list(o.outputs[0].token_ids)
    for name in names[2:]:
        engine.add_request(name, {"prompt_token_ids": prompts[name]}, greedy(16))
    out.update(_drain(llm))
    refs = reference.generate(
        [PromptInput.from_ids(prompts[n]) for n in names], make_policy("snapkv", 0.5), 16, granularity=BLOCK
    )
    assert [out[n] for n in names] == [r.token_ids for r in refs]
    _assert_clean(llm)
