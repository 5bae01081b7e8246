"""A resumable store of finished benchmark cases, shared by the quality benchmarks.

A case is one (engine, policy, budget) over the whole prompt set; its result is a JSON-able dict. Cases are
written to disk as they finish, so an interrupted run resumes and a later run with more policies or budgets
computes only the new ones.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BLOCK",
    "VARIANTS",
    "CaseCache",
    "bench_engine",
    "build_policy",
    "case_policy",
    "engine_args",
    "request_args",
    "yardstick_cases",
]

BLOCK = 16  # the vLLM path's block size; the dense reference compresses to the same layout
# Part of every cache's setup: a change of what a policy name or the layout means invalidates old results.
# 2: budgets hold ρ (docs/policies.md, layout), `meda` is the product default, the paper is `meda-paper`.
CASES_VERSION = 2
CPU_KV_CACHE_BYTES = 4 << 30


class CaseCache:
    """Finished cases ``{"engine|policy|budget": {...}}`` in one JSON file.

    Keyed by ``setup`` (model, prompts, generation length, device, ...): a file written for another setup
    is ignored and replaced at the first :meth:`put`. ``path`` None: memory only.
    """

    def __init__(self, path: Path | None, setup: dict[str, Any]) -> None:
        self.path = path
        # Round-trip through JSON so that tuples and lists compare equal with what the file holds.
        self.setup = json.loads(json.dumps({**setup, "cases_version": CASES_VERSION}))
        self.cases: dict[str, dict[str, Any]] = {}
        if path is not None and path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("setup") == self.setup:
                self.cases = saved["cases"]

    @staticmethod
    def _key(engine: str, policy: str, budget: float) -> str:
        return f"{engine}|{policy}|{budget:g}"

    def has(self, engine: str, policy: str, budget: float) -> bool:
        return self._key(engine, policy, budget) in self.cases

    def missing(self, engine: str, cases: list[tuple[str, float]]) -> list[tuple[str, float]]:
        """The ``(policy, budget)`` cases ``engine`` has not finished yet, in order."""
        return [c for c in cases if not self.has(engine, *c)]

    def get(self, engine: str, policy: str, budget: float) -> dict[str, Any]:
        return self.cases[self._key(engine, policy, budget)]

    def put(self, engine: str, policy: str, budget: float, result: dict[str, Any]) -> None:
        self.put_many(engine, {(policy, budget): result})

    def put_many(self, engine: str, results: dict[tuple[str, float], dict[str, Any]]) -> None:
        """Store several ``(policy, budget)`` cases of ``engine`` with one write."""
        for (policy, budget), result in results.items():
            self.cases[self._key(engine, policy, budget)] = json.loads(json.dumps(result))
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"setup": self.setup, "cases": self.cases}))
            tmp.replace(self.path)


def yardstick_cases(policies: Sequence[str], budgets: Sequence[float]) -> list[tuple[str, float]]:
    """``full`` at 1.0 (every row's yardstick, always run once), then every other policy at every budget."""
    return [("full", 1.0)] + [(n, float(b)) for n in dict.fromkeys(policies) if n != "full" for b in budgets]


# Named variants a benchmark can run beside the registered policies: label → (policy, budget → fields).
VARIANTS: dict[str, tuple[str, Any]] = {
    # MEDA as in the paper, plus 4 attention-sink tokens in every layer (beyond the paper: sink_tokens).
    "meda-sink": ("meda-paper", lambda budget: {"sink_tokens": 4}),
    # The default meda with its layer entropies from every query row (the sampled estimate's yardstick).
    "meda-exact": ("meda", lambda budget: {"entropy_step": 1}),
    # Accumulated attention from every 4th / 8th query row (score_step), beside the exact H2O and LOOK-M.
    **{
        f"{name}-s{step}": (name, lambda budget, step=step: {"score_step": step})
        for name in ("h2o", "lookm")
        for step in (4, 8)
    },
}


def case_policy(label: str, budget: float | None) -> tuple[str, dict[str, Any]]:
    """``(policy name, config fields)`` of a benchmark label: a registered policy or one of ``VARIANTS``."""
    if label in VARIANTS:
        name, fields = VARIANTS[label]
        return name, fields(budget)
    return label, {}


def build_policy(label: str, budget: float) -> Any:
    """The dense reference's policy for a benchmark label (raises ``PolicyError`` for a bad one)."""
    from vllm_kvmm.policies import make_policy

    name, config = case_policy(label, budget)
    return make_policy(name, budget, config)


def engine_args(label: str, budget: float | None, groups: int | None = None) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments turning on the policy of a benchmark label for every request
    (:func:`vllm_kvmm.engine_args`; ``budget`` ``None``: the plugin's default)."""
    import vllm_kvmm

    name, config = case_policy(label, budget)
    return vllm_kvmm.engine_args(name, budget, groups, **config)


def request_args(label: str, budget: float) -> dict[str, Any]:
    """vLLM ``SamplingParams.extra_args`` choosing the same policy per request."""
    name, config = case_policy(label, budget)
    return {"kv_policy": name, "kv_budget": budget} | ({"kv_policy_config": config} if config else {})


@contextlib.contextmanager
def bench_engine(model: str | Path, max_model_len: int, device: str, **kw: Any) -> Iterator[Any]:
    """The quality benchmarks' vLLM engine, shut down on exit (before the dense reference loads).

    Block ``BLOCK``, seed 0, policy ``full`` by default (each request names its own); on CPU float32,
    eager, and a fixed KV-cache size: vLLM's CPU default reserves 92 % of the NUMA node's memory and refuses
    to start when page cache or another process holds a little of it. ``kw``: further engine arguments.
    """
    from vllm import LLM

    import vllm_kvmm

    args: dict[str, Any] = dict(model=str(model), max_model_len=max_model_len, seed=0, block_size=BLOCK, **kw)
    if device == "cpu":
        args.update(dtype="float32", enforce_eager=True)
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            args["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    llm = LLM(**args, **vllm_kvmm.engine_args("full"))
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
