"""``vllm-kvmm bench retrieval`` on the CPU build: the embedded SmolLM2 finds the pass key with the full
cache, and the vLLM path gives the dense reference's tokens for every case (the benchmark's own oracle)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_kvmm.bench.retrieval import RetrievalRow, passkey_prompts


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> list[RetrievalRow]:
    # In its own process: an in-process engine would reconfigure this process's worker state, which the
    # session's shared engines use.
    out = tmp_path_factory.mktemp("retrieval") / "r.json"
    cmd = [
        sys.executable, "-m", "vllm_kvmm.cli", "bench", "retrieval", "--policies", "full,streamingllm",
        "--budgets", "1.0,0.25", "--contexts", "320", "--samples", "2", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [RetrievalRow(**r) for r in json.loads(out.read_text())["rows"]]


def test_prompts_have_the_exact_length_and_the_key(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = passkey_prompts(tok, 320, 3)
    assert [len(p.ids) for p in prompts] == [320] * 3
    assert len({p.answer for p in prompts}) == 3
    for p in prompts:
        assert f"The pass key is {p.answer}." in tok.decode(p.ids)
    assert [p.depth for p in prompts] == pytest.approx([1 / 6, 3 / 6, 5 / 6])


def test_vllm_path_gives_the_dense_tokens_in_every_case(rows: list[RetrievalRow]) -> None:
    cases = {(r.policy, r.budget) for r in rows}
    assert cases == {("full", 1.0), ("streamingllm", 1.0), ("streamingllm", 0.25)}
    assert all(r.agree == 1.0 for r in rows), [(r.policy, r.budget, r.engine, r.agree) for r in rows]


def test_full_cache_finds_the_key_and_streaming_window_loses_it(rows: list[RetrievalRow]) -> None:
    acc = {(r.policy, r.budget, r.engine): r.accuracy for r in rows}
    assert acc["full", 1.0, "dense"] == acc["full", 1.0, "vllm"] == 1.0
    # StreamingLLM keeps sinks + the last 25 %: a key planted at depth 1/4 or 3/4 of the document is
    # outside its window for the first sample, so it cannot answer both.
    assert acc["streamingllm", 0.25, "dense"] < 1.0


def test_a_context_without_room_for_the_answer_is_refused_before_any_engine(smollm2_dir: Path) -> None:
    from vllm_kvmm.bench.retrieval import run_retrieval

    with pytest.raises(ValueError, match=r"contexts \[8192\] plus the 16-token answer exceed SmolLM2's 8192"):
        run_retrieval(["full"], [1.0], [2048, 8192], engines=())
