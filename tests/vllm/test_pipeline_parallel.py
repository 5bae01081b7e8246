"""Pipeline parallelism (2 stages, CPU, multiprocessing executor): each stage compresses its own layers.

A layer-local policy (``KVPolicy.layer_local``: a layer's plan needs that layer's statistics only) runs
with every stage planning its layers alone; the result equals the dense reference run on one device —
the same blocks held per layer, the same greedy tokens, the same measured KV (both stages' reports add
up). Policies that need every layer's statistics (MEDA, HAE) are refused at start-up and, as per-request
overrides, served under the engine's policy instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vllm.conftest import BLOCK, greedy, make_llm, shutdown, token_ids
from tests.vllm.helpers import block_pool
from vllm_kvmm.policies import make_policy
from vllm_kvmm.reference import DenseReference, PromptInput

LENGTHS = [230, 150]
NEW = 10


def _ids() -> list[list[int]]:
    return [[(29 * i + 7 * j) % 3500 + 150 for j in range(n)] for i, n in enumerate(LENGTHS)]


def _engine(model: Path, tp: int) -> Any:
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(["0", "1"] * tp)  # 2 cores shared by 2·tp ranks
    try:
        return make_llm(
            str(model),
            "full",
            pipeline_parallel_size=2,
            tensor_parallel_size=tp,
            distributed_executor_backend="mp",
        )
    finally:
        del os.environ["VLLM_CPU_OMP_THREADS_BIND"]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> Iterator[Any]:
    engine = _engine(tiny_llama_dir, tp=1)
    yield engine
    shutdown(engine)


@pytest.mark.parametrize("name,budget", [("snapkv", 0.25), ("pyramidkv", 0.25), ("lookm", 0.3)])
def test_pp2_equals_single_device_reference(
    llm: Any, reference: DenseReference, name: str, budget: float
) -> None:
    _check_against_reference(llm, reference, name, budget)


def _check_against_reference(llm: Any, reference: DenseReference, name: str, budget: float) -> None:
    from vllm_kvmm.vllm_ext.spec import managers

    ids = _ids()
    engine, pool = llm.llm_engine, block_pool(llm)
    free0 = pool.get_num_free_blocks()
    for i, x in enumerate(ids):
        engine.add_request(
            f"pp{name}{i}", {"prompt_token_ids": x}, greedy(NEW, kv_policy=name, kv_budget=budget)
        )
    refs = reference.generate(
        [PromptInput.from_ids(x) for x in ids], make_policy(name, budget), NEW, granularity=BLOCK
    )
    expected = [
        [-(-len(x) // BLOCK) - (p.tail_start - p.prefix_keep) // BLOCK for p in r.plans]
        for x, r in zip(ids, refs, strict=True)
    ]
    mgrs = managers(pool)
    assert len(mgrs) == 4  # every layer's group, whichever stage holds it

    def held() -> list[list[int]]:
        reqs = [
            next(r for r in mgrs[0].req_to_blocks if r.startswith(f"pp{name}{i}")) for i in range(len(ids))
        ]
        return [[mgrs[g].num_held_blocks(r) for g in sorted(mgrs)] for r in reqs]

    # Both prompts fit one step; with two stages in flight the scheduler hears of a step's compression
    # one or two steps later (vLLM's batch queue). Decoding 10 tokens adds no block to these prompts.
    outputs: list[Any] = []
    for _ in range(4):
        outputs += engine.step()
        if held() == expected:
            break
    assert held() == expected  # both stages' releases reached the one scheduler
    while engine.has_unfinished_requests():
        outputs += engine.step()
    out = {o.request_id: o for o in outputs if o.finished}
    for i, ref in enumerate(refs):
        o = out[f"pp{name}{i}"]
        assert list(o.outputs[0].token_ids) == ref.token_ids
        report = o.kv_transfer_params["kvmm"]
        assert report["compressed"] and report["kv_kept"] == pytest.approx(ref.kv_fraction, abs=1e-12)
    assert pool.get_num_free_blocks() == free0


def test_pp2_decode_flushes_equal_the_reference(llm: Any, reference: DenseReference) -> None:
    """H2O with a flush every 4 tokens: each stage re-selects its own layers' cache."""
    config = {"decode_interval": 4}
    params = greedy(12, kv_policy="h2o", kv_budget=0.3, kv_policy_config=json.dumps(config))
    outs = llm.generate([{"prompt_token_ids": x} for x in _ids()], params)
    refs = reference.generate(
        [PromptInput.from_ids(x) for x in _ids()], make_policy("h2o", 0.3, config), 12, granularity=BLOCK
    )
    assert token_ids(outs) == [r.token_ids for r in refs]


def test_a_policy_needing_every_layer_is_served_under_the_engines_policy(llm: Any) -> None:
    outs = llm.generate(
        [{"prompt_token_ids": x} for x in _ids()], greedy(4, kv_policy="meda", kv_budget=0.25)
    )
    assert [o.kv_transfer_params["kvmm"]["policy"] for o in outs] == ["full", "full"]


@pytest.mark.parametrize(
    "settings,msg",
    [
        (
            dict(policy="meda", budget=0.2),
            r"--kv-policy meda: policy 'meda' plans every layer from the whole model's statistics, and "
            r"pipeline stages hold different layers: under pipeline parallelism use one of lookm, snapkv",
        ),
        (dict(policy="hae", budget=0.2), r"policy 'hae' plans every layer"),
        (dict(policy="snapkv", budget=0.2, groups=2), r"--kv-groups cannot be combined with pipeline"),
    ],
)
def test_pp_refuses_what_a_stage_cannot_plan_alone(settings: dict[str, Any], msg: str) -> None:
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvmm.vllm_ext.patches import engine_overrides
    from vllm_kvmm.vllm_ext.settings import KVMMSettings

    args = EngineArgs(model="unused", pipeline_parallel_size=2)
    with pytest.raises(ValueError, match=msg):
        engine_overrides(KVMMSettings(**settings), args)
    assert engine_overrides(KVMMSettings(policy="snapkv", budget=0.2), args)["enable_prefix_caching"] is False


def test_the_ray_executor_without_ray_is_refused_with_the_install_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvmm.vllm_ext.patches import engine_overrides
    from vllm_kvmm.vllm_ext.settings import KVMMSettings

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    args = EngineArgs(model="unused", tensor_parallel_size=2, distributed_executor_backend="ray")
    with pytest.raises(
        ValueError, match=r"needs Ray, which is not installed: pip install 'vllm-kvmm\[ray\]'"
    ):
        engine_overrides(KVMMSettings(policy="snapkv", budget=0.2), args)
    monkeypatch.undo()
    assert engine_overrides(KVMMSettings(policy="snapkv", budget=0.2), args)["enable_prefix_caching"] is False


def test_api_refuses_a_per_request_policy_a_stage_cannot_plan() -> None:
    from dataclasses import replace

    from vllm_kvmm.config import resolve_request
    from vllm_kvmm.policies import PolicyError
    from vllm_kvmm.vllm_ext.settings import KVMMSettings

    settings = KVMMSettings(policy="snapkv", budget=0.2)
    rules = replace(settings.rules, layer_local_only=True)
    with pytest.raises(PolicyError, match="policy 'meda-paper' plans every layer"):
        resolve_request({"kv_policy": "meda-paper"}, None, rules=rules)
    assert resolve_request({"kv_policy": "pyramidkv"}, settings, 100, rules).name == "pyramidkv"


def test_tp2_x_pp2_equals_single_device_reference(
    llm: Any, tiny_llama_dir: Path, reference: DenseReference
) -> None:
    """Four ranks: tensor-parallel copies of a stage's report count once, the stages' add up."""
    shutdown(llm)  # this module's PP-only engine is done (this test is the module's last): free its processes
    engine = _engine(tiny_llama_dir, tp=2)
    try:
        _check_against_reference(engine, reference, "snapkv", 0.25)
    finally:
        shutdown(engine)
