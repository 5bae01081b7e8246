"""Decode-time eviction inside continuous batching: paged == dense, blocks returned at each flush,
long generations in bounded memory, aborts and preemption with flushes pending."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.vllm.conftest import BLOCK, greedy, make_llm, shutdown
from tests.vllm.helpers import PreemptionCounter, block_pool, scheduler
from vllm_kvmm.policies import POLICIES, DecodeCadence, make_policy
from vllm_kvmm.reference import DenseReference, PromptInput

INTERVAL = 16
# Every policy with a decode cadence (the DecodeCadence part), from the registry. HAE's recycle bin is
# tested on its own below: it runs with its own decode budget and keeps text at prefill.
DECODING = [n for n, cls in POLICIES.items() if issubclass(cls, DecodeCadence) and n != "hae"]


def _ids(i: int, n: int) -> list[int]:
    return [(29 * i + 7 * j) % 3500 + 150 for j in range(n)]


def _params(name: str, budget: float, n: int, extra: dict[str, Any] | None = None) -> Any:
    config = {"decode_interval": INTERVAL, **(extra or {})}
    return greedy(n, kv_policy=name, kv_budget=budget, kv_policy_config=json.dumps(config))


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> Any:
    from vllm_kvmm.vllm_ext.worker import worker_state

    engine = make_llm(str(tiny_llama_dir), "full", num_gpu_blocks_override=4 * 64, max_model_len=1024)
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


def _held(llm: Any, prefix: str) -> list[int]:
    from vllm_kvmm.vllm_ext.spec import managers

    mgrs = managers(block_pool(llm))
    req = next(r for r in mgrs[0].req_to_blocks if r.startswith(prefix))
    return [mgrs[g].num_held_blocks(req) for g in sorted(mgrs)]


# H2O with prefill scores from every 3rd query (sampled, scaled by 3): decode scores add to the estimate.
@pytest.mark.parametrize("name,extra", [(n, {}) for n in DECODING] + [("h2o", {"score_step": 3})])
def test_paged_equals_dense_with_flushes(llm: Any, tiny_llama_dir: Path, name: str, extra: dict) -> None:
    _check_paged_equals_dense(
        llm, tiny_llama_dir, name, extra, name + "".join(f"-{k}{v}" for k, v in extra.items())
    )


def test_one_layer_a_stack_and_one_group_a_run_equal_the_dense_reference(
    llm: Any, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _unbatched(monkeypatch)
    _check_paged_equals_dense(llm, tiny_llama_dir, "h2o", {}, "h2o-unbatched")


def _unbatched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scoring stacks and move runs cut at one layer / one group each: what the byte budgets come to on a
    7B model at long contexts (the tiny model here fits every layer in one stack and one run)."""
    flush = importlib.import_module("vllm_kvmm.vllm_ext.worker.flush")
    from vllm_kvmm.vllm_ext.worker import compaction

    for module, budget in ((flush, "SCORE_BYTES"), (flush, "MOVE_BYTES"), (compaction, "MOVE_BYTES")):
        monkeypatch.setattr(module, budget, 1)


def _check_paged_equals_dense(llm: Any, model: Path, name: str, extra: dict, tag: str) -> None:
    from vllm_kvmm.vllm_ext.worker import worker_state

    ids = [_ids(0, 230), _ids(1, 150)]
    for i, x in enumerate(ids):
        llm.llm_engine.add_request(f"{tag}{i}", {"prompt_token_ids": x}, _params(name, 0.3, 70, extra))
    out = _drain(llm)
    refs = DenseReference(model).generate(
        [PromptInput.from_ids(x) for x in ids],
        make_policy(name, 0.3, {"decode_interval": INTERVAL, **extra}),
        70,
        BLOCK,
    )
    for i, ref in enumerate(refs):
        assert out[f"{tag}{i}"] == ref.token_ids
        mine = next(v for k, v in worker_state().recorder.flushes.items() if k.startswith(f"{tag}{i}-"))
        assert len(mine) == len(ref.flush_positions) == 4
        for a, b in zip(mine, ref.flush_positions, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "budget,lengths",
    [
        # Prefill's layout shortens the tail by a block (tail + rounding overshoot the budget), so a flush
        # 4 tokens later would start its tail before prefill's ("the tail moved back").
        (0.25, (120, 145)),
        # Whole-block prompts at ρ 0.1: the paged layout rounds some layers to no token at all, and a
        # flush found no stored position to continue from.
        (0.1, (64, 48)),
    ],
)
def test_flushes_after_edge_layouts(llm: Any, tiny_llama_dir: Path, budget: float, lengths: tuple) -> None:
    # Both failed the flush before (contained by the worker, found by the lifecycle fuzzer).
    from vllm_kvmm.vllm_ext.worker import worker_state

    ids = [_ids(5 + i, n) for i, n in enumerate(lengths)]
    config = {"decode_interval": 4}
    params = greedy(30, kv_policy="h2o", kv_budget=budget, kv_policy_config=json.dumps(config))
    tag = f"edge{budget}-"
    for i, x in enumerate(ids):
        llm.llm_engine.add_request(f"{tag}{i}", {"prompt_token_ids": x}, params)
    out = _drain(llm)
    refs = DenseReference(tiny_llama_dir).generate(
        [PromptInput.from_ids(x) for x in ids], make_policy("h2o", budget, config), 30, BLOCK
    )
    for i, ref in enumerate(refs):
        assert out[f"{tag}{i}"] == ref.token_ids
        mine = next(v for k, v in worker_state().recorder.flushes.items() if k.startswith(f"{tag}{i}-"))
        assert len(mine) == len(ref.flush_positions) == 7
        for a, b in zip(mine, ref.flush_positions, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_long_generation_in_bounded_blocks(llm: Any) -> None:
    """400 generated tokens after a 120-token prompt at budget 0.25 (30 tokens): blocks stay bounded."""
    engine, pool = llm.llm_engine, block_pool(llm)
    free0 = pool.get_num_free_blocks()
    engine.add_request("long", {"prompt_token_ids": _ids(7, 120)}, _params("h2o", 0.25, 400))
    peak, rises, last_free, steps = 0, 0, None, 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        # The prefill step holds the whole prompt (8 blocks); the next one compresses it.
        if engine.has_unfinished_requests() and steps > 1:
            peak = max(peak, max(_held(llm, "long")))
        free = pool.get_num_free_blocks()
        if last_free is not None and free > last_free:
            rises += 1
        last_free = free
    # Capacity 32 tokens (30 rounded by the layout) + one interval + a partial block: at most 5 blocks
    # of 16 per layer, where a growing cache would need 33.
    assert peak <= 5, peak
    assert rises >= 400 // INTERVAL - 2  # the pool got blocks back at (almost) every flush
    assert pool.get_num_free_blocks() == free0


def test_each_flush_frees_what_it_dropped(llm: Any) -> None:
    engine, pool = llm.llm_engine, block_pool(llm)
    engine.add_request(
        "f", {"prompt_token_ids": _ids(3, 200)}, _params("streamingllm", 0.25, 3 * INTERVAL + 1)
    )
    engine.step()  # prefill
    engine.step()  # compression (before the forward) and the second token
    checked = 0
    while engine.has_unfinished_requests():
        before_free, before_held = pool.get_num_free_blocks(), sum(_held(llm, "f"))
        engine.step()
        if not engine.has_unfinished_requests():
            break
        after_held = sum(_held(llm, "f"))
        # A step allocates at most one block per group; a flush returns whole blocks: the pool moves by
        # exactly what the request's groups hold less (or more).
        assert pool.get_num_free_blocks() - before_free == before_held - after_held
        checked += after_held < before_held
    assert checked >= 2


def test_abort_and_preemption_with_flushes_leave_nothing(llm: Any) -> None:
    from vllm_kvmm.vllm_ext.worker import worker_state

    engine, pool = llm.llm_engine, block_pool(llm)
    free0 = pool.get_num_free_blocks()
    with PreemptionCounter(llm) as counter:
        # Two uncompressed long generations outgrow the pool (64 blocks a layer) and force preemptions of
        # the later, decode-evicting requests, some with a flush due.
        for i in range(2):
            engine.add_request(
                f"f{i}", {"prompt_token_ids": _ids(40 + i, 300)}, greedy(400, kv_policy="full")
            )
        for i in range(3):
            engine.add_request(f"p{i}", {"prompt_token_ids": _ids(20 + i, 200)}, _params("h2o", 0.5, 300))
        for _ in range(INTERVAL - 1):  # stop right before the first flush step of the decode-evicting ones
            engine.step()
        engine.abort_request(["p0"])
        out = _drain(llm)
    assert sorted(out) == ["f0", "f1", "p1", "p2"]
    assert [len(out[k]) for k in sorted(out)] == [400, 400, 300, 300]
    assert counter.count > 0  # the path under test really ran
    assert pool.get_num_free_blocks() == free0
    engine.step()
    assert worker_state().requests == {}
    assert scheduler(llm).connector._requests == {}


@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
def test_recycle_bin_paged_equals_dense(
    llm: Any, tiny_llama_dir: Path, unbatched: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HAE's recycle bin in vLLM: the same active and binned tokens as the dense reference at every flush,
    the same tokens, and the bin really bins, restores and purges."""
    from vllm_kvmm.vllm_ext.worker import worker_state

    if unbatched:
        _unbatched(monkeypatch)
    tag = "binu" if unbatched else "bin"

    cfg = {"decode_interval": INTERVAL, "decode_budget": 0.3, "bin_size": 24, "protect_recent": 16}
    ids = [_ids(0, 230), _ids(1, 150)]
    for i, x in enumerate(ids):
        params = greedy(90, kv_policy="hae", kv_policy_config=json.dumps(cfg))
        llm.llm_engine.add_request(f"{tag}{i}", {"prompt_token_ids": x}, params)
    out = _drain(llm)
    refs = DenseReference(tiny_llama_dir).generate(
        [PromptInput.from_ids(x) for x in ids], make_policy("hae", None, cfg), 90, BLOCK
    )
    binned = restored = purged = 0
    for i, ref in enumerate(refs):
        assert out[f"{tag}{i}"] == ref.token_ids
        key = next(k for k in worker_state().recorder.flushes if k.startswith(f"{tag}{i}-"))
        active, bins = worker_state().recorder.flushes[key], worker_state().recorder.bins[key]
        assert len(active) == len(ref.flush_positions) == 5
        for a, b, c, d in zip(active, ref.flush_positions, bins, ref.flush_bins, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
            assert all(torch.equal(x, y) for x, y in zip(c, d, strict=True))
        for f in range(len(bins)):
            now = set(bins[f][0][0].tolist())
            binned += bool(now)
            if f + 1 < len(bins):
                restored += bool(now & set(active[f + 1][0][0].tolist()))
                purged += (
                    bool(now) and not bins[f + 1][0].numel() and bool(set(active[f + 1][0][0].tolist()) - now)
                )
    assert binned and restored and purged, (binned, restored, purged)


@pytest.mark.parametrize("name", DECODING)
def test_decode_interval_at_budget_one_schedules_no_flush(llm: Any, name: str) -> None:
    # Budget 1.0 never compresses, so decode-time eviction is off (the policy's decode_spec is None). The
    # scheduler used to read `decode_interval` from the raw config and schedule flushes the worker then
    # asserted on, taking the engine down. The tokens must be vanilla's (the `full` policy's).
    prompt = {"prompt_token_ids": _ids(41, 200)}
    out = llm.generate([prompt, prompt], [_params(name, 1.0, 2 * INTERVAL + 3), greedy(2 * INTERVAL + 3)])
    assert out[0].outputs[0].token_ids == out[1].outputs[0].token_ids
    assert len(out[0].outputs[0].token_ids) == 2 * INTERVAL + 3
    assert out[0].kv_transfer_params["kvmm"] == {"policy": name, "budget": 1.0, "compressed": False}


def test_a_flush_in_the_step_that_compresses_the_prompt(llm: Any, tiny_llama_dir: Path) -> None:
    """Decode interval 1: the first decode step compresses the prompt (at its start) and flushes (at its
    end). Both free their blocks, the output reports the compression, and the tokens are the reference's."""
    engine, pool = llm.llm_engine, block_pool(llm)
    free0 = pool.get_num_free_blocks()
    ids = _ids(11, 200)
    engine.add_request("i1", {"prompt_token_ids": ids}, _params("h2o", 0.25, 8, {"decode_interval": 1}))
    engine.step()  # prefill: 13 blocks a layer
    engine.step()  # compression, the second token, a flush
    held = _held(llm, "i1")
    out: Any = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o if o.finished else out
    (ref,) = DenseReference(tiny_llama_dir).generate(
        [PromptInput.from_ids(ids)], make_policy("h2o", 0.25, {"decode_interval": 1}), 8, BLOCK
    )
    assert max(held) <= 6  # 50 tokens kept of 200 (13 blocks): the prompt's middle went back to the pool
    assert list(out.outputs[0].token_ids) == ref.token_ids
    report = out.kv_transfer_params["kvmm"]
    assert report["compressed"] is True and report["kv_kept"] == pytest.approx(ref.kv_fraction, abs=1e-12)
    assert pool.get_num_free_blocks() == free0
