"""Runs the Triton statistics kernels in Triton's CPU interpreter (see ``test_stats_triton.py``).

Triton chooses at import whether ``@triton.jit`` compiles or interprets, so the kernels run in a child
process started with ``TRITON_INTERPRET=1``; this module is that child. It only *runs* the code under
test (``StatsAccumulator(kernels="triton")``) on the cases of :data:`CASES` and saves the statistics;
the expected values are computed in the test process by the dense float64 twin of ``test_ops_stats.py``.

Usage: ``TRITON_INTERPRET=1 python -m tests.unit.triton_interpret_run OUT.pt``
"""

from __future__ import annotations

import dataclasses
import itertools
import sys

import torch

from tests.unit.test_ops_stats import ALL, MASKS, make_qk, spans_mask
from vllm_kvmm.ops import StatsAccumulator, StatsRequest

REQUESTS = {
    "all": ALL,
    "window_only": StatsRequest(window=7),
    "t2v_only": StatsRequest(t2v=True),
    "colsum_entropy": StatsRequest(colsum=True, entropy=True),
    "all_step3": dataclasses.replace(ALL, entropy_step=3),  # sampled entropy rows beside every-row sums
    "all_steps24": dataclasses.replace(ALL, entropy_step=2, colsum_step=4),  # two samples of rows
}
LONG = (150, [(10, 70), (80, 130)])
# (mask name or (n, spans), heads, kv heads, head dim, prefill cuts as fractions of n)
CASES: dict[str, tuple] = {
    **{f"{m}/{r}": (m, 4, 2, 8, (0.0, 1.0), r) for m in MASKS for r in REQUESTS},
    "three_images/all/chunked": ("three_images", 4, 2, 8, (0.0, 0.03, 0.3, 0.9, 1.0), "all"),
    "one_image/all/mha_d40": ("one_image", 3, 3, 40, (0.0, 0.5, 1.0), "all"),
    "image_first/all/gqa8": ("image_first", 8, 1, 16, (0.0, 1.0), "all"),
    # past one 64-wide tile in both directions, with prefill chunks cutting through tiles
    "long/all/chunked": ((150, [(10, 70), (80, 130)]), 4, 2, 32, (0.0, 0.4, 0.45, 1.0), "all"),
    "long/all_step3/chunked": ((150, [(10, 70), (80, 130)]), 4, 2, 32, (0.0, 0.4, 0.45, 1.0), "all_step3"),
    "long/all_steps24/chunked": (LONG, 4, 2, 32, (0.0, 0.4, 0.45, 1.0), "all_steps24"),
}


def case_inputs(name: str):
    """``(q, k, vision, scale, request, cuts)`` of one case (also used by the test for its twin)."""
    mask, h, h_kv, d, fractions, req = CASES[name]
    n, spans = MASKS[mask] if isinstance(mask, str) else mask
    q, k = make_qk(n, seed=len(name), h=h, h_kv=h_kv, d=d)
    cuts = sorted({round(f * n) for f in fractions})
    return q, k, spans_mask(n, spans), d**-0.5, REQUESTS[req], cuts


def run(name: str) -> dict[str, torch.Tensor]:
    q, k, vision, scale, request, cuts = case_inputs(name)
    acc = StatsAccumulator(request, q.shape[0], q.shape[1], k.shape[1], vision, scale, kernels="triton")
    for s, e in itertools.pairwise(cuts):
        acc.update(q[s:e], k[:e], s)
    stats = acc.result()
    return {f: getattr(stats, f) for f in stats.__slots__ if getattr(stats, f) is not None}


TILINGS = ((64, 64, 8), (32, 32, 2), (16, 32, 3))  # (block_m, block_n, cross_splits)


def run_tilings() -> list[dict[str, torch.Tensor]]:
    """``block_stats`` of the long case's last 100 queries under several tilings and key-tile splits."""
    from vllm_kvmm.ops.stats_triton import block_stats

    q, k, vision, scale, _, _ = case_inputs("long/all/chunked")
    out = []
    for bm, bn, splits in TILINGS:
        stats = block_stats(
            q[50:], k, 50, scale, vision, entropy=True, colsum_from=50, window_from=140, t2v_from=130,
            cross=True, block_m=bm, block_n=bn, cross_splits=splits,
        )  # fmt: skip
        out.append({f: getattr(stats, f) for f in stats.__slots__})
    return out


def run_strided() -> dict[str, torch.Tensor]:
    """Row entropies of the long case's rows 1, 3, 5, … : from every row, and from those rows alone
    (``row_step`` 2, small tiles: several row tiles, each seeing keys up to its own last row)."""
    from vllm_kvmm.ops.stats_triton import block_stats

    q, k, vision, scale, _, _ = case_inputs("long/all/chunked")
    every = block_stats(q, k, 0, scale, vision, entropy=True, cross=True)
    alone = block_stats(
        q[1::2], k, 1, scale, vision, entropy=True, cross=True, row_step=2, block_m=16, block_n=32,
        cross_splits=3,
    )  # fmt: skip
    return {
        "every_entropy": every.entropy[:, 1::2], "every_cross": every.cross[1::2],
        "alone_entropy": alone.entropy, "alone_cross": alone.cross,
    }  # fmt: skip


if __name__ == "__main__":
    from triton import knobs

    if not knobs.runtime.interpret:
        sys.exit("set TRITON_INTERPRET=1")
    torch.set_num_threads(1)
    torch.save(
        {"cases": {name: run(name) for name in CASES}, "tilings": run_tilings(), "strided": run_strided()},
        sys.argv[1],
    )
