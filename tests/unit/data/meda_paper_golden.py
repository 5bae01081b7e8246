"""Kept sets of MEDA's paper mode on seeded attention statistics: the regression fixture of ``meda-paper``.

``meda_paper_golden.json`` was written by this script run against commit 49c5207 (the last commit where the
paper mode was the default ``meda``), before budgets were made to hold ρ and the product default changed:

    git worktree add /tmp/old 49c5207
    PYTHONPATH=/tmp/old python tests/unit/data/meda_paper_golden.py meda \
        > tests/unit/data/meda_paper_golden.json

``tests/unit/test_policies.py`` recomputes the same cases with ``meda-paper`` through :func:`cases`.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import torch

CASES = [(300, 6, 0.2, 1), (300, 6, 0.3, 1), (517, 8, 0.1, 1), (517, 8, 0.25, 16), (300, 6, 0.5, 16)]


def cases(name: str) -> dict[str, dict[str, Any]]:
    """Per case ``"N/L/ρ/g"``: the layer budgets, and at token granularity the kept positions."""
    from vllm_kvmm.ops import attention_stats
    from vllm_kvmm.policies import PromptInfo, make_policy, plan_compression

    out = {}
    for n, layers, rho, g in CASES:
        vision = torch.zeros(n, dtype=torch.bool)
        vision[20:120] = True
        vision[140:240] = True
        info = PromptInfo(n, vision, layers, 2)
        pol = make_policy(name, rho)
        req = pol.stats_request(info)
        gen = torch.Generator().manual_seed(n + layers)
        stats = []
        for layer in range(layers):
            q = torch.randn(n, 4, 32, generator=gen) * (0.5 + 0.3 * layer)
            k = torch.randn(n, 2, 32, generator=gen)
            stats.append(attention_stats(req, q, k, vision, 1 / math.sqrt(32), chunk=64))
        rec: dict[str, Any] = {"budgets": pol.layer_budgets(stats, info)}
        if g == 1:
            rec["keep"] = [p.keep.tolist() for p in plan_compression(pol, stats, info, granularity=g)]
        out[f"{n}/{layers}/{rho}/{g}"] = rec
    return out


if __name__ == "__main__":
    print(json.dumps(cases(sys.argv[1] if len(sys.argv) > 1 else "meda-paper")))
