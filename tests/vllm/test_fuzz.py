"""The lifecycle fuzzer (tests/vllm/fuzz.py) in CI: a short seeded run, and proof that it catches a leak."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vllm.conftest import shutdown
from tests.vllm.fuzz import FuzzConfig, Fuzzer, Violation, make_engine


@pytest.fixture(scope="module")
def engine(tiny_llava_dir: Path) -> Iterator[tuple[Any, Any]]:
    from transformers import AutoProcessor

    llm = make_engine(tiny_llava_dir, FuzzConfig())
    yield llm, AutoProcessor.from_pretrained(tiny_llava_dir)
    shutdown(llm)


def test_short_fuzz_run_keeps_every_invariant(engine: tuple[Any, Any]) -> None:
    report = Fuzzer(*engine, FuzzConfig(seed=0, requests=200)).run()
    # Every path the invariants guard really ran.
    assert report.finished + report.aborted + report.refused == 200
    assert report.aborted > 0 and report.refused > 0 and report.preemptions > 0, report
    assert report.with_images > 0 and report.compressed > 0, report
    # A contained failure keeps the engine serving, but it is still a bug: none may happen.
    assert report.errors == []


def test_fuzzer_catches_blocks_that_never_return(
    engine: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_kvmm.vllm_ext import internals
    from vllm_kvmm.vllm_ext.spec import CompressManager

    def leaky(self: CompressManager, request_id: str, logical: Any) -> int:
        blocks, null, n = internals.req_blocks(self, request_id), internals.null_block(self), 0
        for i in set(logical):
            if i < len(blocks) and blocks[i] is not null:
                blocks[i] = null  # dropped from the row, never given back to the pool
                n += 1
        return n

    monkeypatch.setattr(CompressManager, "release_blocks", leaky)
    with pytest.raises(Violation) as caught:
        Fuzzer(*engine, FuzzConfig(seed=1, requests=40)).run()
    message = str(caught.value)
    assert message.startswith("pool accounting: ") and "free +" in message
    assert "replay: python -m tests.vllm.fuzz --requests 40 --seed 1 --stop-at " in message
