"""Tensor parallelism (2 ranks, CPU): ranks agree on per-layer budgets and the output equals the dense
reference run on one device — per-head selection stays on each rank, head-averaged statistics are summed
over ranks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.vllm.conftest import BLOCK, greedy, make_llm, shutdown
from tests.vllm.helpers import block_pool
from vllm_kvmm.policies import make_policy
from vllm_kvmm.reference import DenseReference, PromptInput

LENGTHS = [230, 150]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> Any:
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # one core per rank (one NUMA node here)
    try:
        engine = make_llm(
            str(tiny_llama_dir), "full", tensor_parallel_size=2, distributed_executor_backend="mp"
        )
    finally:
        del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    yield engine
    shutdown(engine)


@pytest.mark.parametrize("name,budget", [("meda", 0.25), ("snapkv", 0.5), ("pyramidkv", 0.25)])
def test_tp2_equals_single_device_reference(llm: Any, tiny_llama_dir: Path, name: str, budget: float) -> None:
    from vllm_kvmm.vllm_ext.spec import managers

    ids = [[(29 * i + 7 * j) % 3500 + 150 for j in range(n)] for i, n in enumerate(LENGTHS)]
    engine = llm.llm_engine
    for i, x in enumerate(ids):
        engine.add_request(
            f"tp{name}{i}", {"prompt_token_ids": x}, greedy(10, kv_policy=name, kv_budget=budget)
        )
    engine.step()  # both prompts fit one step: prefill and the first tokens
    engine.step()  # compression (before the forward), the second tokens, the release
    refs = DenseReference(tiny_llama_dir).generate(
        [PromptInput.from_ids(x) for x in ids], make_policy(name, budget), 10, granularity=BLOCK
    )
    mgrs = managers(block_pool(llm))
    for i, (x, ref) in enumerate(zip(ids, refs, strict=True)):
        req = next(r for r in mgrs[0].req_to_blocks if r.startswith(f"tp{name}{i}"))
        held = [mgrs[g].num_held_blocks(req) for g in sorted(mgrs)]
        # len(x) + 1 tokens stored: the second step wrote the first token's KV
        expected = [-(-(len(x) + 1) // BLOCK) - (p.tail_start - p.prefix_keep) // BLOCK for p in ref.plans]
        assert held == expected  # the layouts both ranks agreed on are the single-device ones
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = list(o.outputs[0].token_ids)
    assert [out[f"tp{name}{i}"] for i in range(len(ids))] == [r.token_ids for r in refs]


@pytest.fixture(scope="module")
def llava(tiny_llava_dir: Path, llm: Any) -> Any:
    shutdown(llm)  # one tensor-parallel engine at a time on this 2-core machine
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    try:
        engine = make_llm(
            str(tiny_llava_dir),
            "full",
            tensor_parallel_size=2,
            distributed_executor_backend="mp",
            max_model_len=2048,
            limit_mm_per_prompt={"image": 2},
        )
    finally:
        del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    yield engine
    shutdown(engine)


@pytest.mark.parametrize(
    "name,budget,config",
    [("hae", None, {"threshold": 0.02}), ("meda", 0.3, {})],
    ids=["hae-threshold", "meda-cross-modal"],
)
def test_tp2_head_averaged_statistics(
    llava: Any, tiny_llava_dir: Path, images: list, name: str, budget: float | None, config: dict
) -> None:
    """HAE's threshold and MEDA's cross-modal entropy read head-averaged attention: only the sum over both
    ranks' heads reproduces the single-device kept counts."""
    import json

    from transformers import AutoProcessor

    from vllm_kvmm.reference import prompt_from_messages
    from vllm_kvmm.vllm_ext.spec import managers

    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "image"},
                {"type": "text", "text": "Compare the images."},
            ],
        }
    ]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    xargs = {"kv_policy": name, "kv_policy_config": json.dumps(config)}
    if budget is not None:
        xargs["kv_budget"] = budget
    engine = llava.llm_engine
    engine.add_request(
        f"mm{name}", {"prompt": text, "multi_modal_data": {"image": images[:2]}}, greedy(8, **xargs)
    )
    engine.step()  # prefill and the first token
    engine.step()  # compression (before the forward), the second token, the release
    ref = DenseReference(tiny_llava_dir).generate(
        [prompt_from_messages(proc, msgs, images[:2])],
        make_policy(name, budget, config),
        8,
        granularity=BLOCK,
    )[0]
    mgrs = managers(block_pool(llava))
    req = next(r for r in mgrs[0].req_to_blocks if r.startswith(f"mm{name}"))
    n = ref.num_prompt_tokens
    held = [mgrs[g].num_held_blocks(req) for g in sorted(mgrs)]
    assert any(not p.is_identity for p in ref.plans)
    assert held == [-(-(n + 1) // BLOCK) - (p.tail_start - p.prefix_keep) // BLOCK for p in ref.plans]
    out: list[int] = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out = list(o.outputs[0].token_ids)
    assert out == ref.token_ids
