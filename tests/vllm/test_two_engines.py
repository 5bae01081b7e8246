"""One compressing engine per process: an engine whose worker state a later engine took over stops loudly.

In-process engines (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) share one worker state per process. Without the
ownership check the first engine would go on compressing with the second one's layers and caches.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vllm.conftest import greedy, make_llm, shutdown
from vllm_kvmm.vllm_ext.worker import LayerRef, WorkerState

TAKEN_OVER = "a later engine with a KV policy took over this process's worker state"


def test_each_configuration_gets_its_own_token():
    state = WorkerState()
    first = state.configure({"l0": LayerRef(0, 0)}, 16, 2)
    second = state.configure({"l0": LayerRef(0, 0)}, 16, 2)
    assert second != first
    state.check_owner(second)
    with pytest.raises(RuntimeError, match=TAKEN_OVER):
        state.check_owner(first)


def test_first_engine_refuses_to_run_on_the_second_engines_state(tiny_llama_dir: Path):
    prompt = [{"prompt_token_ids": list(range(300, 400))}]
    first = make_llm(str(tiny_llama_dir), "snapkv", 0.5)
    second = None
    try:
        before = first.generate(prompt, greedy(4), use_tqdm=False)[0].outputs[0].token_ids
        second = make_llm(str(tiny_llama_dir), "snapkv", 0.5)
        # The newest engine owns the state and gives the first engine's tokens (same model, same policy).
        assert second.generate(prompt, greedy(4), use_tqdm=False)[0].outputs[0].token_ids == before
        with pytest.raises(RuntimeError, match=TAKEN_OVER):
            first.generate(prompt, greedy(4), use_tqdm=False)
    finally:
        shutdown(first)
        if second is not None:
            shutdown(second)
