"""The entropy-sample benchmark's comparison (vllm_kvmm/bench/entropy_sample.py) on hand-made statistics."""

from __future__ import annotations

import pytest
import torch

from vllm_kvmm.bench.entropy_sample import compare, spearman
from vllm_kvmm.ops import LayerStats
from vllm_kvmm.policies import PromptInfo


def test_spearman() -> None:
    assert spearman([1.0, 2.0, 3.0], [10.0, 20.0, 30.0]) == pytest.approx(1.0)
    assert spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert spearman([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 4.0, 3.0]) == pytest.approx(0.8)


def _stats(entropies: list[float]) -> list[LayerStats]:
    return [LayerStats(entropy_tv=torch.tensor(e), entropy_vt=torch.tensor(0.0)) for e in entropies]


def test_compare_measures_budget_moves_against_the_exact_entropies() -> None:
    n, layers = 400, 4
    vision = torch.zeros(n, dtype=torch.bool)
    vision[50:300] = True
    info = PromptInfo(n, vision, layers, 2)
    exact = _stats([1.0, 2.0, 3.0, 4.0])
    same_order = _stats([1.1, 2.0, 3.0, 4.2])
    swapped = _stats([1.0, 2.0, 4.0, 3.0])
    out = compare([exact, same_order, swapped], info, [0.2], [1, 2, 4])
    assert out["1"]["moved@0.2"] == 0 and out["1"]["max_layer_move@0.2"] == 0
    assert out["1"]["spearman"] == pytest.approx(1.0)
    assert out["2"]["spearman"] == pytest.approx(1.0)
    assert out["2"]["max_abs_entropy_error"] == pytest.approx(0.2)
    assert out["4"]["spearman"] == pytest.approx(0.8)
    # Swapping the two highest layers' entropies swaps their budgets (the lowest sit at the floor).
    assert out["4"]["moved@0.2"] > out["2"]["moved@0.2"] > 0
    assert out["uniform"]["moved@0.2"] > 0
    with pytest.raises(ValueError, match="first step must be 1"):
        compare([exact], info, [0.2], [2])
