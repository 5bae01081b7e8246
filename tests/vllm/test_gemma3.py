"""Gemma 3 (sliding-window local layers next to global ones) on the vLLM CPU build.

A KV policy compresses the global layers only; the local layers keep vLLM's own sliding-window spec and
manager. Shown here on the tiny Gemma 3 (local layers 0, 2, 3; global 1, 4; window 64 tokens):

* the KV-cache groups: one :class:`CompressSpec` group per global layer, the local layers in vLLM's spec;
* identity: ``full`` and every policy at budget 1.0 give vanilla vLLM's tokens, and so does the dense
  reference (whose local layers attend over the same window);
* paged == dense for every policy (decode-time eviction included): the same kept sets per global layer
  and KV head, the same greedy tokens;
* blocks: after a long prompt's prefill the global groups hold exactly the reference plan's blocks, the
  local groups exactly what they hold without compression, and everything comes back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vllm.conftest import BLOCK, greedy, make_llm, shutdown, token_ids
from tests.vllm.helpers import assert_same_kept_sets, block_pool, plans_by_output_id, scheduler
from vllm_kvmm.models import build_tiny_gemma3
from vllm_kvmm.models.tiny_gemma3 import GEMMA3_LAYER_TYPES, GEMMA3_SLIDING_WINDOW
from vllm_kvmm.policies import POLICIES, DecodeCadence, make_policy, policy_names
from vllm_kvmm.reference import DenseReference, PromptInput

LENGTHS = [260, 45, 150, 100]  # past the 64-token window and within it, batched together
NEW = 12
GLOBAL = [i for i, t in enumerate(GEMMA3_LAYER_TYPES) if t == "full_attention"]
LOCAL = [i for i, t in enumerate(GEMMA3_LAYER_TYPES) if t == "sliding_attention"]


def _ids(n: int, seed: int) -> list[int]:
    return [(37 * seed + 11 * j) % 4000 + 200 for j in range(n)]


def _prompts() -> list[dict[str, list[int]]]:
    return [{"prompt_token_ids": _ids(n, i)} for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def gemma3_dir(tiny_root: Path, smollm2_tokenizer: Any) -> Path:
    return build_tiny_gemma3(tiny_root / "gemma3", seed=0, tokenizer=smollm2_tokenizer)


@pytest.fixture(scope="module")
def setup(gemma3_dir: Path) -> Iterator[dict[str, Any]]:
    from vllm_kvmm.vllm_ext.worker import PlanRecorder, worker_state

    vanilla = make_llm(str(gemma3_dir))
    van = token_ids(vanilla.generate(_prompts(), greedy(NEW)))
    shutdown(vanilla)
    llm = make_llm(str(gemma3_dir), "full")
    worker_state().recorder = PlanRecorder()
    yield dict(llm=llm, vanilla=van, ref=DenseReference(gemma3_dir))
    shutdown(llm)


def _layer(name: str) -> int:
    from vllm_kvmm.vllm_ext.grouping import layer_index

    return layer_index(name)


def test_global_layers_get_compressing_groups_and_local_layers_keep_vllms_spec(
    setup: dict[str, Any],
) -> None:
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    from vllm_kvmm.vllm_ext.spec import CompressSpec
    from vllm_kvmm.vllm_ext.worker import worker_state

    groups = scheduler(setup["llm"]).kv_cache_config.kv_cache_groups
    kinds = [(type(g.kv_cache_spec), [_layer(n) for n in g.layer_names]) for g in groups]
    assert kinds == [(CompressSpec, [i]) for i in GLOBAL] + [(SlidingWindowSpec, [i]) for i in LOCAL]
    assert [g.kv_cache_spec.group_index for g in groups[: len(GLOBAL)]] == list(range(len(GLOBAL)))
    assert {g.kv_cache_spec.sliding_window for g in groups[len(GLOBAL) :]} == {GEMMA3_SLIDING_WINDOW}
    # The worker knows the global layers only, numbered in decoder order (the policy's layer index).
    refs = worker_state().engine.layers
    assert sorted((_layer(n), r.index, r.group) for n, r in refs.items()) == [
        (layer, i, i) for i, layer in enumerate(GLOBAL)
    ]


def test_full_budget_one_and_the_reference_equal_vanilla(setup: dict[str, Any]) -> None:
    llm, van = setup["llm"], setup["vanilla"]
    assert token_ids(llm.generate(_prompts(), greedy(NEW))) == van
    for name in ("meda", "snapkv", "hae", "h2o"):
        assert token_ids(llm.generate(_prompts(), greedy(NEW, kv_policy=name, kv_budget=1.0))) == van
    ref_in = [PromptInput.from_ids(p["prompt_token_ids"]) for p in _prompts()]
    refs = setup["ref"].generate(ref_in, make_policy("full", 1.0), NEW, granularity=BLOCK)
    assert [r.token_ids for r in refs] == van  # the reference's local layers attend as vLLM's do


# Every registered policy (prefill and decode-time eviction alike; hae and meda-released keep text).
MATRIX = [n for n in policy_names() if n not in ("full", "hae", "meda-released")]
DECODE_CONFIG = {"decode_interval": 4}


@pytest.mark.parametrize("name", MATRIX)
def test_paged_equals_dense(setup: dict[str, Any], name: str) -> None:
    from vllm_kvmm.vllm_ext.worker import worker_state

    # Decode-time eviction flushes every 4 tokens here: the local layers must stay untouched by flushes too.
    config = DECODE_CONFIG if issubclass(POLICIES[name], DecodeCadence) else {}
    extra: dict[str, Any] = dict(kv_policy=name, kv_budget=0.25)
    if config:
        extra["kv_policy_config"] = json.dumps(config)
    policy = make_policy(name, 0.25, config or None)
    outs = setup["llm"].generate(_prompts(), greedy(NEW, **extra))
    ref_in = [PromptInput.from_ids(p["prompt_token_ids"]) for p in _prompts()]
    refs = setup["ref"].generate(ref_in, policy, NEW, granularity=BLOCK)
    compressed = 0
    for out, ref in zip(outs, refs, strict=True):
        assert list(out.outputs[0].token_ids) == ref.token_ids
        assert len(ref.plans) == len(GLOBAL)
        if any(not p.is_identity for p in ref.plans):
            compressed += 1
            mine = plans_by_output_id(worker_state().recorder.plans, out.request_id)
            assert_same_kept_sets(mine, ref.plans)
    assert compressed >= 2
    assert token_ids(outs) != setup["vanilla"]


def _held(coordinator: Any, prefix: str) -> list[int]:
    """Real blocks the running request whose id starts with ``prefix`` (vLLM suffixes the ids it is
    given) holds per KV-cache group, vLLM's sliding-window managers included."""
    from vllm_kvmm.vllm_ext import internals

    managers = coordinator.single_type_managers
    request_id = next(r for r in managers[0].req_to_blocks if r.startswith(prefix))
    return [
        sum(b is not internals.null_block(m) for b in internals.req_blocks(m, request_id)) for m in managers
    ]


def test_a_long_prompt_frees_global_blocks_and_local_layers_keep_vllms_blocks(
    setup: dict[str, Any],
) -> None:
    """600 tokens under snapkv 0.25: after the prefill step and one decode step (which stays in the
    prompt's last block) each global group holds exactly the blocks
    the reference plan keeps, each local group exactly what it holds under ``full`` (vLLM's sliding-window
    manager, untouched); all blocks come back at the end."""
    llm = setup["llm"]
    engine, pool = llm.llm_engine, block_pool(llm)
    coordinator = scheduler(llm).kv_cache_manager.coordinator
    free0 = pool.get_num_free_blocks()
    ids = _ids(600, 7)
    n = len(ids)
    held: dict[str, list[int]] = {}
    for policy in ("full", "snapkv"):
        params = (
            greedy(4, kv_policy=policy) if policy == "full" else greedy(4, kv_policy=policy, kv_budget=0.25)
        )
        engine.add_request(policy, {"prompt_token_ids": ids}, params)
        engine.step()  # the whole prompt fits one step: prefill and the first token
        # One decode step: the compression and its release, and vLLM drops the blocks a local layer's
        # window left behind.
        engine.step()
        held[policy] = _held(coordinator, policy)
        while engine.has_unfinished_requests():
            engine.step()
        assert pool.get_num_free_blocks() == free0  # everything back
    ref = setup["ref"].generate(
        [PromptInput.from_ids(ids)], make_policy("snapkv", 0.25), 4, granularity=BLOCK
    )
    g = len(GLOBAL)
    blocks = -(-n // BLOCK)
    assert [held["full"][i] for i in range(g)] == [blocks] * g
    assert [held["snapkv"][i] for i in range(g)] == [
        blocks - (p.tail_start - p.prefix_keep) // BLOCK for p in ref[0].plans
    ]
    assert all(held["snapkv"][i] < blocks // 2 for i in range(g))
    local = range(g, g + len(LOCAL))
    assert [held["snapkv"][i] for i in local] == [held["full"][i] for i in local]
    assert all(held["full"][i] < blocks for i in local)  # vLLM's window manager did drop old blocks
