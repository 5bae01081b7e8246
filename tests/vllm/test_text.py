"""Tiny Llama (GQA, 4 layers, float32) on the vLLM CPU build: identity and paged == dense.

Paged == dense: for every policy and budget the vLLM path keeps exactly the tokens the dense reference
keeps per (layer, KV head), with the same block granularity, and emits the same greedy tokens — for
requests of different lengths batched together.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.vllm.conftest import BASE, BLOCK, greedy, token_ids
from tests.vllm.helpers import assert_same_kept_sets, plans_by_output_id
from vllm_kvmm.policies import make_policy, policy_names
from vllm_kvmm.reference import DenseReference, PromptInput

LENGTHS = [200, 77, 130, 33]
NEW = 12


def _prompts() -> list[dict[str, list[int]]]:
    # Token-id prompts: deterministic, no tokenizer involved, different lengths in one batch.
    return [
        {"prompt_token_ids": [(37 * i + 11 * j) % 4000 + 200 for j in range(n)]}
        for i, n in enumerate(LENGTHS)
    ]


@pytest.fixture(scope="module")
def vanilla(engine_factory: Any, tiny_llama_dir: Path) -> list[list[int]]:
    llm = engine_factory(str(tiny_llama_dir))
    return token_ids(llm.generate(_prompts(), greedy(NEW)))


@pytest.fixture(scope="module")
def kvmm(engine_factory: Any, tiny_llama_dir: Path, vanilla: list[list[int]]) -> Any:
    from vllm_kvmm.vllm_ext.worker import worker_state

    llm = engine_factory(str(tiny_llama_dir), "full")
    from vllm_kvmm.vllm_ext.worker import PlanRecorder

    worker_state().recorder = PlanRecorder()
    return llm


def test_plugin_without_policy_equals_no_plugin(tiny_llama_dir: Path, vanilla: list[list[int]]) -> None:
    """`vanilla` runs with the plugin loaded but no --kv-policy; here vLLM runs with no plugin at all."""
    script = (
        "import json, sys\n"
        "from vllm import LLM, SamplingParams\n"
        "llm = LLM(model=sys.argv[1], **json.loads(sys.argv[2]))\n"
        "sp = SamplingParams(max_tokens=int(sys.argv[4]), temperature=0.0, ignore_eos=True)\n"
        "outs = llm.generate(json.loads(sys.argv[3]), sp)\n"
        "print('TOKENS=' + json.dumps([list(o.outputs[0].token_ids) for o in outs]))\n"
    )
    env = {**os.environ, "VLLM_PLUGINS": "none-at-all", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(tiny_llama_dir),
            json.dumps(BASE),
            json.dumps(_prompts()),
            str(NEW),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    line = next((x for x in res.stdout.splitlines() if x.startswith("TOKENS=")), None)
    assert line is not None, res.stdout[-2000:] + res.stderr[-3000:]
    assert json.loads(line.removeprefix("TOKENS=")) == vanilla


def test_full_policy_equals_vanilla(kvmm: Any, vanilla: list[list[int]]) -> None:
    assert token_ids(kvmm.generate(_prompts(), greedy(NEW))) == vanilla


@pytest.mark.parametrize("name", [n for n in policy_names() if n != "full"])
def test_budget_one_equals_vanilla(kvmm: Any, vanilla: list[list[int]], name: str) -> None:
    out = kvmm.generate(_prompts(), greedy(NEW, kv_policy=name, kv_budget=1.0))
    assert token_ids(out) == vanilla


# Policies that never evict text at prefill (HAE prunes vision tokens only; meda-released keeps all text as
# its released code does): their text-only prompts are not compressed, and tests/vllm/test_multimodal.py
# covers them with images.
TEXT_KEEPING = ("hae", "meda-released")


@pytest.mark.parametrize("name", TEXT_KEEPING)
def test_text_keeping_policies_leave_text_prompts_whole(
    kvmm: Any, vanilla: list[list[int]], name: str
) -> None:
    outs = kvmm.generate(_prompts(), greedy(NEW, kv_policy=name, kv_budget=0.25))
    assert token_ids(outs) == vanilla
    for out in outs:
        report = out.kv_transfer_params["kvmm"]
        assert (report["policy"], report["budget"], report["compressed"]) == (name, 0.25, False)


@pytest.mark.parametrize("name", [n for n in policy_names() if n != "full" and n not in TEXT_KEEPING])
@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_paged_equals_dense(
    kvmm: Any, reference: DenseReference, vanilla: list[list[int]], name: str, budget: float
) -> None:
    from vllm_kvmm.vllm_ext.worker import worker_state

    prompts = _prompts()
    outs = kvmm.generate(prompts, greedy(NEW, kv_policy=name, kv_budget=budget))
    policy = make_policy(name, budget)
    ref_in = [PromptInput.from_ids(p["prompt_token_ids"]) for p in prompts]
    refs = reference.generate(ref_in, policy, NEW, granularity=BLOCK)
    compressed = 0
    for out, ref in zip(outs, refs, strict=True):
        assert list(out.outputs[0].token_ids) == ref.token_ids
        if any(not p.is_identity for p in ref.plans):
            compressed += 1
            mine = plans_by_output_id(worker_state().recorder.plans, out.request_id)
            assert_same_kept_sets(mine, ref.plans)
            # the output says what compression did: effective policy and budget, the KV actually kept
            report = out.kv_transfer_params["kvmm"]
            assert (report["policy"], report["budget"], report["compressed"]) == (name, budget, True)
            assert report["kv_kept"] == pytest.approx(ref.kv_fraction, abs=1e-12)
            assert report["budget_met"] is (ref.kv_fraction <= 1.1 * budget)  # the dense path's measure
    assert compressed >= 2  # the long prompts really were compressed
    assert token_ids(outs) != vanilla  # ... and it changed what the model says


def test_groups_with_the_same_view_share_one_metadata_build(
    kvmm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 per-layer groups, one uniform policy: each step builds attention metadata once per distinct
    layout, not once per group. The block rounding carried from layer to layer (ρ means ρ) gives a uniform
    policy two layouts at most (k and k + 1 prefix blocks)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadataBuilder

    from vllm_kvmm.vllm_ext.worker import worker_state

    calls = 0
    original = CPUAttentionMetadataBuilder.build

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CPUAttentionMetadataBuilder, "build", counting)
    out = kvmm.generate(_prompts()[:1], greedy(6, kv_policy="snapkv", kv_budget=0.5))
    assert len(out[0].outputs[0].token_ids) == 6
    plans = plans_by_output_id(worker_state().recorder.plans, out[0].request_id)
    views = {(p.prefix_keep, p.tail_start) for p in plans}
    assert len(plans) == 4 and len(views) <= 2
    assert calls == 1 + 5 * len(views)  # one prefill step + five decode steps, one build per layout


def test_the_first_token_does_not_wait_for_compression(kvmm: Any, reference: DenseReference) -> None:
    """The prompt is compressed in the step after its prefill: the first token comes back from a step
    that compressed nothing; a request that ends with it is never compressed; one that ends in the step
    that compressed it still reports what it kept (the scheduler takes the worker's report first)."""
    from vllm_kvmm.vllm_ext.worker import worker_state

    engine, recorder = kvmm.llm_engine, worker_state().recorder
    ids = _prompts()[0]["prompt_token_ids"]
    (ref,) = reference.generate(
        [PromptInput.from_ids(ids)], make_policy("snapkv", 0.25), 2, granularity=BLOCK
    )
    for rid, n in (("one-token", 1), ("two-tokens", 2)):
        engine.add_request(rid, {"prompt_token_ids": ids}, greedy(n, kv_policy="snapkv", kv_budget=0.25))
        (first,) = engine.step()
        assert list(first.outputs[0].token_ids) == ref.token_ids[:1]
        assert not any(k.startswith(rid) for k in recorder.plans)  # not compressed (yet)
        outs = [first]
        while engine.has_unfinished_requests():
            outs += engine.step()
        report = outs[-1].kv_transfer_params["kvmm"]
        assert outs[-1].finished and list(outs[-1].outputs[0].token_ids) == ref.token_ids[:n]
        if n == 1:
            assert report["compressed"] is False and not any(k.startswith(rid) for k in recorder.plans)
        else:
            assert_same_kept_sets(plans_by_output_id(recorder.plans, rid), ref.plans)
            assert report["compressed"] is True
            assert report["kv_kept"] == pytest.approx(ref.kv_fraction, abs=1e-12)
