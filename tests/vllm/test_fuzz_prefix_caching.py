"""The lifecycle fuzzer with prefix caching on: repeated preambles and images, marked shared prefixes,
follow-ups continuing finished requests' compressed caches (kv_reuse), aborts and preemption; every
invariant after every step (shared blocks counted once, ref counts equal to their holders, no hash past a
compressing request's shared prefix but an adopted entry's) and a full pool after the drain. Once with one
KV-cache group per layer, once with ``--kv-groups 2`` (two layers per group: per-layer budgets become
their group's mean, decode-time flushes keep one layout per group)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vllm.conftest import shutdown
from tests.vllm.fuzz import FuzzConfig, Fuzzer, make_engine

CONFIG = FuzzConfig(seed=3, requests=150, prefix_caching=True)
GROUPS = FuzzConfig(seed=4, requests=150, prefix_caching=True, groups=2)


@pytest.fixture(scope="module", params=[CONFIG, GROUPS], ids=["per-layer", "groups-of-2"])
def engine(request: Any, tiny_llava_dir: Path) -> Iterator[tuple[Any, Any, FuzzConfig]]:
    from transformers import AutoProcessor

    llm = make_engine(tiny_llava_dir, request.param)
    yield llm, AutoProcessor.from_pretrained(tiny_llava_dir), request.param
    shutdown(llm)


def test_fuzz_with_prefix_caching_keeps_every_invariant(engine: tuple[Any, Any, FuzzConfig]) -> None:
    llm, processor, config = engine
    groups = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config.kv_cache_groups
    assert [len(g.layer_names) for g in groups] == ([2, 2] if config.groups == 2 else [1, 1, 1, 1])
    report = Fuzzer(llm, processor, config).run()
    assert report.finished + report.aborted + report.refused == config.requests
    assert report.aborted > 0 and report.preemptions > 0 and report.compressed > 0, report
    assert report.errors == []
    # Prefixes really were shared, and compressed behind.
    assert report.cache_hits > 0 and report.compressed_on_hit > 0, report
    # Follow-ups were made and some continued a compressed entry.
    assert report.follow_ups > 0 and report.reused > 0, report
