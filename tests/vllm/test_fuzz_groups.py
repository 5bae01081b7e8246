"""The lifecycle fuzzer with ``--kv-groups 2`` (two layers per KV-cache group) and prefix caching: every
policy (per-layer budgets become their group's mean), decode-time flushes, preemption, aborts, shared
prefixes and follow-ups reusing compressed entries; every invariant after every step, per group."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vllm.conftest import shutdown
from tests.vllm.fuzz import FuzzConfig, Fuzzer, make_engine

CONFIG = FuzzConfig(seed=4, requests=150, prefix_caching=True, groups=2)


@pytest.fixture(scope="module")
def engine(tiny_llava_dir: Path) -> Iterator[tuple[Any, Any]]:
    from transformers import AutoProcessor

    llm = make_engine(tiny_llava_dir, CONFIG)
    yield llm, AutoProcessor.from_pretrained(tiny_llava_dir)
    shutdown(llm)


def test_fuzz_with_groups_keeps_every_invariant(engine: tuple[Any, Any]) -> None:
    llm, _ = engine
    cfg = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
    assert [len(g.layer_names) for g in cfg.kv_cache_groups] == [2, 2]
    report = Fuzzer(*engine, CONFIG).run()
    assert report.finished + report.aborted + report.refused == CONFIG.requests
    assert report.aborted > 0 and report.preemptions > 0 and report.compressed > 0, report
    assert report.errors == []
    assert report.cache_hits > 0 and report.follow_ups > 0 and report.reused > 0, report
    assert report.policies["h2o"] + report.policies["streamingllm"] + report.policies["hae"] > 0, report
