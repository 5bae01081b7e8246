"""One compressing engine per process: a second in-process engine is refused at start-up.

vLLM keeps one worker-side KV connector per process and hands it to every engine started there while it
lives; without the check a second engine would register its caches over the first one's, and the first
would go on compressing the second's caches. Shutting the first down (which resets vLLM's connector and
our worker state) lets the next one start.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vllm.conftest import greedy, make_llm, shutdown
from vllm_kvmm.vllm_ext.worker import worker_state


def test_second_engine_is_refused_and_the_first_keeps_serving(tiny_llama_dir: Path):
    prompt = [{"prompt_token_ids": list(range(300, 400))}]
    first = make_llm(str(tiny_llama_dir), "snapkv", 0.5)
    try:
        before = first.generate(prompt, greedy(4), use_tqdm=False)[0].outputs[0].token_ids
        caches = dict(worker_state().engine.kv_caches)
        with pytest.raises(RuntimeError, match="a second engine with a KV policy in this process"):
            make_llm(str(tiny_llama_dir), "snapkv", 0.5)
        assert worker_state().engine.kv_caches.keys() == caches.keys()
        assert all(worker_state().engine.kv_caches[n] is t for n, t in caches.items())  # still the first's
        assert first.generate(prompt, greedy(4), use_tqdm=False)[0].outputs[0].token_ids == before
    finally:
        shutdown(first)
    assert worker_state().engine.kv_caches == {}  # released with the engine
    second = make_llm(str(tiny_llama_dir), "snapkv", 0.5)
    try:
        assert second.generate(prompt, greedy(4), use_tqdm=False)[0].outputs[0].token_ids == before
    finally:
        shutdown(second)
