"""Benchmark plumbing without an engine: the resumable case store and reading a forced vLLM output."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from vllm_kvmm.bench.cases import CaseCache


def test_cases_persist_and_resume_for_the_same_setup(tmp_path: Path) -> None:
    path = tmp_path / "c.cases.json"
    setup = dict(model="m", plan=[("single", 1, 1)], gen_tokens=4)
    a = CaseCache(path, setup)
    a.put("dense", "snapkv", 0.5, {"tokens": [[1, 2]], "kv": [0.5]})
    a.put("vllm", "snapkv", 0.5, {"tokens": [[1, 2]], "kv": None})
    b = CaseCache(path, dict(setup))  # tuples in the setup compare equal with the file's lists
    assert b.has("dense", "snapkv", 0.5) and b.has("vllm", "snapkv", 0.5)
    assert not b.has("dense", "snapkv", 0.3)
    assert b.get("dense", "snapkv", 0.5) == {"tokens": [[1, 2]], "kv": [0.5]}


def test_a_file_from_another_setup_is_ignored_then_replaced(tmp_path: Path) -> None:
    path = tmp_path / "c.cases.json"
    CaseCache(path, dict(gen_tokens=4)).put("dense", "h2o", 0.2, {"x": 1})
    other = CaseCache(path, dict(gen_tokens=8))
    assert not other.has("dense", "h2o", 0.2)
    other.put("dense", "h2o", 0.1, {"x": 2})
    assert set(CaseCache(path, dict(gen_tokens=8)).cases) == {"dense|h2o|0.1"}
    assert CaseCache(path, dict(gen_tokens=4)).cases == {}


@dataclass
class _Logprob:
    logprob: float
    rank: int


@dataclass
class _Output:
    token_ids: list[int]
    logprobs: list[dict[int, _Logprob]]


def test_forced_logprobs_reads_the_true_token_and_the_argmax() -> None:
    pytest.importorskip("vllm")
    from vllm_kvmm.bench.forcing import forced_logprobs

    out = _Output(
        [5, 7],
        [{5: _Logprob(-0.1, 1)}, {7: _Logprob(-2.5, 3), 9: _Logprob(-0.3, 1)}],
    )
    assert forced_logprobs(out, [5, 7]) == ([-0.1, -2.5], [5, 9])
    with pytest.raises(RuntimeError, match="teacher forcing failed"):
        forced_logprobs(out, [5, 8])


def test_a_variant_is_the_same_policy_on_both_paths() -> None:
    from vllm_kvmm.bench.cases import build_policy, request_args
    from vllm_kvmm.config import KVPolicyArgs
    from vllm_kvmm.policies.meda import MEDAPaper

    dense = build_policy("meda-sink", 0.2)
    assert dense == MEDAPaper(budget=0.2, sink_tokens=4)
    args = request_args("meda-sink", 0.2)
    assert args["kv_policy"] == "meda-paper" and args["kv_policy_config"] == {"sink_tokens": 4}
    # What the server builds from these request arguments (vllm_ext/validation.py, connector).
    assert KVPolicyArgs.parse(args["kv_policy"], args["kv_budget"], args["kv_policy_config"]) == dense
    assert request_args("snapkv", 0.5) == {"kv_policy": "snapkv", "kv_budget": 0.5}
    # the released code's MEDA is a registered policy now, requested by name
    assert request_args("meda-released", 0.2) == {"kv_policy": "meda-released", "kv_budget": 0.2}


def test_a_variant_as_the_engine_policy() -> None:
    # bench perf / overhead run a label for every request of an engine: the plugin's settings say the same.
    from vllm_kvmm.bench.cases import engine_args

    got = engine_args("h2o-s4", 0.2)["additional_config"]["kv_policy"]
    assert got == {"policy": "h2o", "budget": 0.2, "config": {"score_step": 4}}
    grouped = engine_args("snapkv", None, 1)["additional_config"]["kv_policy"]
    assert grouped == {"policy": "snapkv", "config": {}, "groups": 1}


def test_an_unknown_label_fails_with_the_policy_list() -> None:
    from vllm_kvmm.bench.cases import build_policy
    from vllm_kvmm.policies import PolicyError

    with pytest.raises(PolicyError, match="unknown KV policy 'meda-papr'; choose one of: meda"):
        build_policy("meda-papr", 0.2)


def test_wilson_interval_and_sweep_summary() -> None:
    from vllm_kvmm.bench.sweep import summarise, wilson

    # textbook values (z = 1.96)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    records = [
        {"group": "a", "answer": "1", "results": {"x@0.1": {"answer": "1", "kv": 0.1}}},
        {"group": "a", "answer": "2", "results": {"x@0.1": {"answer": "3", "kv": 0.12}}},
        {"group": "b", "answer": "4", "results": {"x@0.1": {"answer": "4", "kv": 0.08}}},
    ]
    rows = {r["group"]: r for r in summarise(records, ["x@0.1"])}
    assert (rows["a"]["right"], rows["a"]["prompts"], rows["b"]["accuracy"]) == (1, 2, 1.0)
    assert rows["all"]["right"] == 2 and rows["all"]["kv"] == pytest.approx(0.1)
    assert rows["all"]["variant"] == "x" and rows["all"]["budget"] == 0.1
