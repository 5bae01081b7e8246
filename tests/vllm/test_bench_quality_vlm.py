"""``vllm-kvmm bench quality --model vlm`` on the CPU build: the embedded VLM answers held-out multi-image
questions with the full cache, and the vLLM path gives the dense reference's tokens in every case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_kvmm.bench.quality_vlm import VLMQualityRow, parse_plan, plan_examples
from vllm_kvmm.vlm import data

pytestmark = pytest.mark.skipif(
    not data.easy_vqa_available(), reason="easy-vqa (the images) is not installed: run scripts/setup.sh"
)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> tuple[Path, list[VLMQualityRow]]:
    # In its own process: an in-process engine would reconfigure this process's worker state, which the
    # session's shared engines use.
    out = tmp_path_factory.mktemp("quality_vlm") / "q.json"
    cmd = [
        sys.executable, "-m", "vllm_kvmm.cli", "bench", "quality", "--model", "vlm",
        "--policies", "full,meda,streamingllm", "--budgets", "1.0,0.2",
        "--tasks", "needle:4:1,lookup:4:1", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, [VLMQualityRow(**r) for r in json.loads(out.read_text())["rows"]]


def test_plan_is_held_out_and_parsed() -> None:
    assert parse_plan("needle:16:2,single:1:4") == [("needle", 16, 2), ("single", 1, 4)]
    with pytest.raises(ValueError, match="unknown task 'nedle'"):
        parse_plan("nedle:4:1")
    exs = plan_examples([("needle", 4, 1), ("lookup", 4, 1)])
    assert [g for g, _ in exs] == ["needle@4"] * 4 + ["lookup@4"] * 4
    assert all(ex.context.split == "test" for _, ex in exs)


def test_vllm_path_gives_the_dense_tokens_in_every_case(result: tuple[Path, list[VLMQualityRow]]) -> None:
    out, rows = result
    cases = {(r.policy, r.budget) for r in rows}
    assert cases == {
        ("full", 1.0),
        ("meda", 1.0),
        ("meda", 0.2),
        ("streamingllm", 1.0),
        ("streamingllm", 0.2),
    }
    assert {(r.task, r.n_images) for r in rows} == {("needle", 4), ("lookup", 4), ("all", 0)}
    assert all(r.agree == 1.0 for r in rows), [(r.policy, r.budget, r.task, r.engine, r.agree) for r in rows]
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_full_cache_answers_and_budget_one_changes_nothing(result: tuple[Path, list[VLMQualityRow]]) -> None:
    _, rows = result
    acc = {(r.policy, r.budget, r.task, r.engine): r.accuracy for r in rows}
    assert acc["full", 1.0, "all", "vllm"] >= 0.75  # chance: 1/4 (needle), ≤ 1/3 (lookup)
    for name in ("meda", "streamingllm"):
        for task in ("needle", "lookup", "all"):
            assert acc[name, 1.0, task, "vllm"] == acc["full", 1.0, task, "vllm"]
