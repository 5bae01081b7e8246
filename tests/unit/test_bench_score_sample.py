"""The score-sample benchmark's measures (vllm_kvmm/bench/score_sample.py) on hand-made plans and records."""

from __future__ import annotations

import pytest
import torch

from vllm_kvmm.bench.score_sample import prefix_recall, summarise, table
from vllm_kvmm.policies import LayerPlan


def _plan(rows: list[list[int]], prefix_keep: int, tail_start: int = 20, n: int = 24) -> LayerPlan:
    tail = list(range(tail_start, n))
    return LayerPlan(torch.tensor([r + tail for r in rows]), tail_start, prefix_keep, n)


def test_prefix_recall_counts_the_selected_prefix_per_head() -> None:
    exact = [_plan([[0, 3, 5, 9], [1, 2, 3, 4]], 4), _plan([[7, 8], [0, 1]], 2)]
    # Layer 0: head 0 keeps 3 of 4, head 1 all 4; layer 1: head 0 1 of 2, head 1 none: 8 of 12.
    got = [_plan([[0, 3, 6, 9], [1, 2, 3, 4]], 4), _plan([[7, 19], [5, 6]], 2)]
    assert prefix_recall(got, exact) == pytest.approx(8 / 12)
    assert prefix_recall(exact, exact) == 1.0
    # The tail is kept either way and is not counted; nothing selected counts as full recall.
    empty = [_plan([[], []], 0)]
    assert prefix_recall(empty, empty) == 1.0


def test_summary_per_variant() -> None:
    def rec(answer: str, full: str, results: dict) -> dict:
        return dict(group="needle@16", answer=answer, full=full, results=results)

    prompts = [
        rec("red", "red", {"h2o/s1@0.1": dict(answer="red", same=True, recall=1.0, kv=0.1),
                           "h2o/s4@0.1": dict(answer="blue", same=False, recall=0.8, kv=0.1)}),
        rec("cat", "dog", {"h2o/s1@0.1": dict(answer="cat", same=True, recall=1.0, kv=0.12),
                           "h2o/s4@0.1": dict(answer="cat", same=True, recall=0.9, kv=0.12)}),
    ]  # fmt: skip
    rows = {(r["policy"], r["step"]): r for r in summarise(prompts)}
    exact, sampled = rows[("h2o", 1)], rows[("h2o", 4)]
    assert exact["accuracy"] == 1.0 and sampled["accuracy"] == 0.5 and sampled["full_accuracy"] == 0.5
    assert sampled["same_answer"] == 0.5 and sampled["budget"] == 0.1
    assert sampled["recall_mean"] == pytest.approx(0.85) and sampled["recall_min"] == pytest.approx(0.8)
    assert exact["kv"] == pytest.approx(0.11)
    assert "| h2o | 0.1 | 4 | 85.0% / 80.0% | 50.0% | 50.0 [" in table(list(rows.values()))
