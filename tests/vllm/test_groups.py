"""`--kv-groups 2` on the 4-layer tiny Llama: two layers per group, still paged == dense."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

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
