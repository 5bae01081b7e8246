"""`--kv-groups 2` on the 4-layer tiny Llama: two layers per group, still paged == dense."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.vllm.conftest import BASE, BLOCK, greedy, shutdown
from tests.vllm.helpers import assert_same_kept_sets, block_pool, plans_by_output_id
from vllm_kvmm.policies import make_policy
from vllm_kvmm.reference import DenseReference, PromptInput

GROUPS = [[0, 1], [2, 3]]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> Any:
    from vllm import LLM

    import vllm_kvmm
    from vllm_kvmm.vllm_ext.worker import worker_state

    engine = LLM(model=str(tiny_llama_dir), **BASE, **vllm_kvmm.engine_args("full", groups=2))
    from vllm_kvmm.vllm_ext.worker import PlanRecorder

    worker_state().recorder = PlanRecorder()
    yield engine
    shutdown(engine)


def test_two_groups_of_two_layers(llm: Any) -> None:
    from vllm_kvmm.vllm_ext.spec import managers

    assert sorted(managers(block_pool(llm))) == [0, 1]
    cfg = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
    assert [len(g.layer_names) for g in cfg.kv_cache_groups] == [2, 2]


@pytest.mark.parametrize("name", ["meda", "pyramidkv", "snapkv"])
def test_paged_equals_dense_with_groups(llm: Any, tiny_llama_dir: Path, name: str) -> None:
    from vllm_kvmm.vllm_ext.worker import worker_state

    ids = [[(17 * i + 3 * j) % 3000 + 100 for j in range(n)] for i, n in enumerate([210, 96])]
    outs = llm.generate([{"prompt_token_ids": x} for x in ids], greedy(10, kv_policy=name, kv_budget=0.25))
    refs = DenseReference(tiny_llama_dir).generate(
        [PromptInput.from_ids(x) for x in ids],
        make_policy(name, 0.25),
        10,
        granularity=BLOCK,
        layer_groups=GROUPS,
    )
    for out, ref in zip(outs, refs, strict=True):
        assert list(out.outputs[0].token_ids) == ref.token_ids
        plans = plans_by_output_id(worker_state().recorder.plans, out.request_id)
        assert_same_kept_sets(plans, ref.plans)
        assert plans[0].num_kept == plans[1].num_kept and plans[2].num_kept == plans[3].num_kept


@pytest.mark.parametrize("name", ["h2o", "streamingllm"])
def test_decode_eviction_with_groups(llm: Any, tiny_llama_dir: Path, name: str) -> None:
    # Layer-uniform decode eviction keeps every member of a group at one layout at each flush (the worker
    # refuses a flush whose members disagree), so groups of layers serve it: same tokens and kept
    # positions as the dense reference at every flush.
    from vllm_kvmm.vllm_ext.worker import worker_state

    interval = 16
    ids = [[(29 * i + 7 * j) % 3500 + 150 for j in range(n)] for i, n in enumerate([230, 150])]
    cfg = json.dumps({"decode_interval": interval})
    params = greedy(70, kv_policy=name, kv_budget=0.3, kv_policy_config=cfg)
    outs = llm.generate([{"prompt_token_ids": x} for x in ids], params)
    refs = DenseReference(tiny_llama_dir).generate(
        [PromptInput.from_ids(x) for x in ids],
        make_policy(name, 0.3, {"decode_interval": interval}),
        70,
        granularity=BLOCK,
        layer_groups=GROUPS,
    )
    for out, ref in zip(outs, refs, strict=True):
        assert list(out.outputs[0].token_ids) == ref.token_ids
        mine = plans_by_output_id(worker_state().recorder.flushes, out.request_id)  # type: ignore[arg-type]
        assert len(mine) == len(ref.flush_positions) == 4
        for a, b in zip(mine, ref.flush_positions, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
