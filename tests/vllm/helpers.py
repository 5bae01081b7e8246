"""Comparison helpers for the vLLM tests (kept sets and tokens vs the dense reference)."""

from __future__ import annotations

from typing import Any

import torch

from vllm_kvmm.policies import LayerPlan


def plans_by_output_id(history: dict[str, list[LayerPlan]], request_id: str) -> list[LayerPlan]:
    """The worker's plans for an output's request (the engine appends a suffix to request ids)."""
    hits = [v for k, v in history.items() if k == request_id or k.startswith(f"{request_id}-")]
    assert len(hits) == 1, f"expected one compressed request for {request_id!r}, got {len(hits)}"
    return hits[0]


def assert_same_kept_sets(vllm_plans: list[LayerPlan], ref_plans: list[LayerPlan]) -> None:
    assert len(vllm_plans) == len(ref_plans)
    for layer, (a, b) in enumerate(zip(vllm_plans, ref_plans, strict=True)):
        assert (a.tail_start, a.prefix_keep) == (b.tail_start, b.prefix_keep), f"layer {layer} layout"
        assert torch.equal(a.keep, b.keep), f"layer {layer}: kept sets differ per KV head"


def scheduler(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.scheduler


def block_pool(llm: Any) -> Any:
    return scheduler(llm).kv_cache_manager.block_pool


def block_rows(llm: Any, rid: str) -> list[list[Any]]:
    """A running request's block row in every KV-cache group (real blocks and null placeholders);
    ``rid``: the id given to ``add_request`` (the engine may have appended a suffix)."""
    from vllm_kvmm.vllm_ext.spec import managers

    mgrs = managers(block_pool(llm))
    req = next(r for r in mgrs[0].req_to_blocks if r == rid or r.startswith(f"{rid}-"))
    return [list(mgrs[g].req_to_blocks[req]) for g in sorted(mgrs)]


class PreemptionCounter:
    """Counts scheduler preemptions while active (``with PreemptionCounter(llm) as c:``; then ``c.count``)."""

    def __init__(self, llm: Any) -> None:
        self.sched = scheduler(llm)
        self.count = 0
        self._original = self.sched._preempt_request

    def __enter__(self) -> PreemptionCounter:
        def counting(request: Any, timestamp: float) -> None:
            self.count += 1
            self._original(request, timestamp)

        self.sched._preempt_request = counting
        return self

    def __exit__(self, *exc: object) -> None:
        self.sched._preempt_request = self._original
