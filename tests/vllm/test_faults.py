"""Failures contained: a fault injected at each compression stage fails that request's compression only.

One engine (default `full`), every request under h2o at ρ 0.3 with decode-time flushes every 16 tokens.
Three prompts per batch; the target (231 tokens, a length no other prompt has) hits the fault. After each:
the others' tokens equal a fault-free run's, the target finishes (with vanilla's tokens where nothing was
compressed yet), its output names the failure, and the pool is full again after the drain.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.vllm.conftest import greedy, make_llm, shutdown, token_ids
from tests.vllm.helpers import block_pool

TARGET = 231
LENGTHS = (200, TARGET, 150)
NEW = 40
INTERVAL = 16


def _prompts() -> list[dict[str, list[int]]]:
    return [
        {"prompt_token_ids": [(31 * i + 7 * j) % 3000 + 200 for j in range(n)]} for i, n in enumerate(LENGTHS)
    ]


def _params() -> Any:
    config = json.dumps({"decode_interval": INTERVAL})
    return greedy(NEW, kv_policy="h2o", kv_budget=0.3, kv_policy_config=config)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> Iterator[Any]:
    engine = make_llm(str(tiny_llama_dir), "full", num_gpu_blocks_override=4 * 64, max_model_len=1024)
    yield engine
    shutdown(engine)


@pytest.fixture(scope="module")
def clean(llm: Any) -> dict[str, Any]:
    """The batch without faults (compressed), and vanilla's tokens (the engine's default `full`)."""
    outs = llm.generate(_prompts(), _params())
    assert all(o.kv_transfer_params["kvmm"]["compressed"] for o in outs)
    return {"tokens": token_ids(outs), "vanilla": token_ids(llm.generate(_prompts(), greedy(NEW)))}


def _run(llm: Any) -> list[Any]:
    pool = block_pool(llm)
    free = pool.get_num_free_blocks()
    outs = llm.generate(_prompts(), _params())
    assert pool.get_num_free_blocks() == free, "blocks leaked"
    return outs


def _check(outs: list[Any], clean: dict[str, Any], stage: str, *, compressed: bool) -> dict[str, Any]:
    tokens = token_ids(outs)
    assert [tokens[0], tokens[2]] == [clean["tokens"][0], clean["tokens"][2]]  # the others are untouched
    assert all(len(t) == NEW for t in tokens)
    for i in (0, 2):
        assert "error" not in outs[i].kv_transfer_params["kvmm"]
    report = outs[1].kv_transfer_params["kvmm"]
    assert report["error"].startswith(f"{stage}: "), report
    assert report["compressed"] is compressed
    if not compressed:  # nothing was compressed: the target is served exactly as vanilla serves it
        assert tokens[1] == clean["vanilla"][1]
    return report


def _failing(original: Callable[..., Any], when: Callable[..., bool], message: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kw: Any) -> Any:
        if when(*args, **kw):
            raise ValueError(message)
        return original(*args, **kw)

    return wrapper


def test_statistics_failure_serves_the_request_uncompressed(
    llm: Any, clean: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_kvmm.vllm_ext.worker import stats

    is_target = lambda state, st, *a: st.info.num_tokens == TARGET  # noqa: E731
    monkeypatch.setattr(stats, "_accumulate", _failing(stats._accumulate, is_target, "injected"))
    report = _check(_run(llm), clean, "statistics", compressed=False)
    assert report["error"] == "statistics: ValueError: injected"


def test_non_finite_statistics_are_refused(
    llm: Any, clean: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_kvmm.vllm_ext.worker import stats

    class NaNColumnSums:
        def __init__(self, acc: Any) -> None:
            self.acc = acc

        def update(self, *args: Any) -> None:
            self.acc.update(*args)

        def result(self) -> Any:
            out = self.acc.result()
            return dataclasses.replace(out, colsum=torch.full_like(out.colsum, float("nan")))

    original = stats._accumulate

    def poisoned(state: Any, st: Any, job: Any, layer: int, *args: Any) -> None:
        original(state, st, job, layer, *args)
        if st.info.num_tokens == TARGET and layer == 2 and not isinstance(st.accs[layer], NaNColumnSums):
            st.accs[layer] = NaNColumnSums(st.accs[layer])

    monkeypatch.setattr(stats, "_accumulate", poisoned)
    report = _check(_run(llm), clean, "compression", compressed=False)
    assert report["error"] == "compression: FloatingPointError: non-finite statistics (layer 2 colsum)"


def test_planning_failure_serves_the_request_uncompressed(
    llm: Any, clean: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_kvmm.vllm_ext.worker import compaction

    is_target = lambda policy, stats, info, **kw: info.num_tokens == TARGET  # noqa: E731
    monkeypatch.setattr(
        compaction, "plan_compression", _failing(compaction.plan_compression, is_target, "plan")
    )
    _check(_run(llm), clean, "compression", compressed=False)


def test_compaction_failure_keeps_the_groups_done_before_it(
    llm: Any, clean: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_kvmm.vllm_ext.worker import compaction

    target: list[Any] = []  # the target's moves (one per layer), made before any of them is carried out
    runs = {"target": 0}
    kept_move, move_kv = compaction._kept_move, compaction.move_kv

    def tagged(engine: Any, name: str, plan: Any, *args: Any) -> Any:
        move = kept_move(engine, name, plan, *args)
        if move is not None and plan.num_tokens == TARGET:
            target.append(move)
        return move

    def third_run_fails(engine: Any, moves: Any) -> None:
        if any(m is t for m in moves for t in target):
            runs["target"] += 1
            if runs["target"] == 3:
                raise ValueError("third run")
        move_kv(engine, moves)

    monkeypatch.setattr(compaction, "MOVE_BYTES", 1)  # every group a run of its own
    monkeypatch.setattr(compaction, "_kept_move", tagged)
    monkeypatch.setattr(compaction, "move_kv", third_run_fails)
    report = _check(_run(llm), clean, "compression", compressed=True)
    # Layers 0 and 1 (one per KV-cache group) were compacted and reported; 2 and 3 keep the whole prompt.
    assert runs["target"] == 3
    # h2o at ρ 0.3 keeps 0.3 of a layer (within block rounding): (0.3 + 0.3 + 1 + 1) / 4 = 0.65.
    assert 0.6 < report["kv_kept"] < 0.7, report


def test_a_failure_before_the_first_run_leaves_every_group_untouched(
    llm: Any, clean: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs of groups (the default budget holds this model's every group): the moves are all made before
    the first is carried out, so one failing leaves the request wholly uncompressed."""
    from vllm_kvmm.vllm_ext.worker import compaction

    calls = {"target": 0}
    kept_move = compaction._kept_move

    def third_layer_fails(engine: Any, name: str, plan: Any, *args: Any) -> Any:
        if plan.num_tokens == TARGET:
            calls["target"] += 1
            if calls["target"] == 3:
                raise ValueError("third layer")
        return kept_move(engine, name, plan, *args)

    monkeypatch.setattr(compaction, "_kept_move", third_layer_fails)
    _check(_run(llm), clean, "compression", compressed=False)
    assert calls["target"] == 3


def test_flush_failure_stops_flushing_that_request(
    llm: Any, clean: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The module (the package re-exports its function under the same name).
    flush = importlib.import_module("vllm_kvmm.vllm_ext.worker.flush")

    # A flush at length L of the target: L ≡ TARGET (mod INTERVAL); the other prompts' lengths differ mod 16.
    # The three requests decode in step, so their flushes are planned together: the batch fails, each is
    # planned again alone, and only the target's fails.
    lengths: list[set[int]] = []

    def is_target(inputs: Any, *a: Any) -> bool:
        lengths.append({x.length for x in inputs})
        return any(x.length % INTERVAL == TARGET % INTERVAL for x in inputs)

    monkeypatch.setattr(flush, "plan_flushes", _failing(flush.plan_flushes, is_target, "flush"))
    report = _check(_run(llm), clean, "flush", compressed=True)
    assert report["error"] == "flush: ValueError: flush"
    assert max(len(x) for x in lengths) == 3  # planned together first


def test_seeded_sampling_is_refused_on_cpu_not_fatal(llm: Any) -> None:
    """vLLM 0.26's CPU runner dies on a seeded request's chunked prefill; we refuse it up front instead."""
    from vllm import SamplingParams
    from vllm.platforms import current_platform

    seeded = SamplingParams(max_tokens=4, temperature=1.0, seed=3)
    if not current_platform.is_cpu():
        (out,) = llm.generate(_prompts()[:1], seeded)
        assert len(out.outputs[0].token_ids) == 4
        return
    with pytest.raises(ValueError, match="`seed` with temperature > 0 is refused on the CPU backend"):
        llm.generate(_prompts()[:1], seeded)
    (out,) = llm.generate(_prompts()[:1], SamplingParams(max_tokens=4, temperature=0.0, seed=3))
    assert len(out.outputs[0].token_ids) == 4


def test_engine_still_serves_after_every_fault(llm: Any, clean: dict[str, Any]) -> None:
    assert token_ids(llm.generate(_prompts(), _params())) == clean["tokens"]
