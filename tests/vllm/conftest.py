"""Shared vLLM (CPU build) fixtures: in-process engines, one per module, on tiny float32 models.

A vLLM engine start costs 10–35 s here, so each test module builds its engines once and most tests send
several requests, with different policies through per-request ``vllm_xargs``, to one engine. Only one
compressing engine may live in a process at a time (the worker state is per process): fixtures shut
theirs down at module end.
"""

from __future__ import annotations

import contextlib
import gc
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BLOCK = 16
BASE = dict(enforce_eager=True, dtype="float32", block_size=BLOCK, seed=0, max_model_len=1024)


def make_llm(
    model: str, policy: str | None = None, budget: float | None = None, groups: int | None = None, **kw: Any
) -> Any:
    from vllm import LLM

    import vllm_kvmm

    args = {**BASE, **kw}
    if policy is not None:
        args.update(vllm_kvmm.engine_args(policy, budget, groups))
    return LLM(model=model, **args)


def shutdown(llm: Any) -> None:
    with contextlib.suppress(Exception):  # best effort: the test outcome is already decided
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def engine_factory() -> Iterator[Any]:
    """Make engines that are shut down when the module ends."""
    made: list[Any] = []

    def factory(*args: Any, **kw: Any) -> Any:
        llm = make_llm(*args, **kw)
        made.append(llm)
        return llm

    yield factory
    for llm in made:
        shutdown(llm)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path) -> Any:
    """The dense reference (the oracle) of the tiny Llama, one per module like the engines."""
    from vllm_kvmm.reference import DenseReference

    return DenseReference(tiny_llama_dir)


def greedy(max_tokens: int, **extra: Any) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra or None)


def token_ids(outputs: list[Any]) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]
