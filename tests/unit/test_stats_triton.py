"""The Triton statistics kernels (``vllm_kvmm/ops/stats_triton.py``) against the dense float64 twin.

The kernels run in Triton's CPU interpreter, in a child process (``triton_interpret_run.py``: Triton
decides at import whether to compile or interpret); the expected values come from the naive twin of
``test_ops_stats.py``, which builds the whole attention map. The same kernels compiled for a GPU are
compared with the torch path in ``tests/gpu/test_stats_triton.py``.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.unit.test_ops_stats import naive_stats
from tests.unit.triton_interpret_run import CASES, case_inputs
from vllm_kvmm.ops import StatsAccumulator, StatsRequest, stats_triton

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("triton") / "stats.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.unit.triton_interpret_run", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def interpreted_cases(interpreted) -> dict[str, dict[str, torch.Tensor]]:
    return interpreted["cases"]


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_the_dense_twin(interpreted_cases, name):
    q, k, vision, scale, request, _ = case_inputs(name)
    exp = naive_stats(q, k, vision, scale, request.window, request.entropy_step, request.colsum_step)
    got = interpreted_cases[name]
    wanted = {
        "colsum": request.colsum,
        "window": bool(request.window),
        "entropy": request.entropy,
        "entropy_tv": request.cross_entropy,
        "entropy_vt": request.cross_entropy,
        "t2v_sum": request.t2v,
        "t2v_max": request.t2v,
    }
    assert set(got) == {f for f, w in wanted.items() if w}
    for field, value in got.items():
        if value.dim():
            torch.testing.assert_close(value.double(), exp[field], rtol=1e-5, atol=1e-6, msg=field)
        elif math.isnan(exp[field]):
            assert math.isnan(float(value)), f"{field}: expected nan, got {float(value)}"
        else:
            assert float(value) == pytest.approx(exp[field], rel=1e-5, abs=1e-6), field


def test_tiling_and_key_splits_do_not_change_the_sums(interpreted):
    """Smaller tiles and fewer splits than key tiles (a split strides over several): same statistics."""
    first, *others = interpreted["tilings"]
    assert {f for f, v in first.items() if v is not None} == set(stats_triton.BlockStats.__slots__)
    for other in others:
        for field, value in first.items():
            torch.testing.assert_close(other[field], value, rtol=1e-5, atol=1e-6, msg=field)


def test_sampled_rows_get_the_entropies_they_have_among_every_row(interpreted):
    got = interpreted["strided"]
    assert got["alone_entropy"].shape == (4, 75)
    torch.testing.assert_close(got["alone_entropy"], got["every_entropy"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["alone_cross"], got["every_cross"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threshold", ["window_from", "t2v_from"])
def test_sampled_rows_refuse_the_window_and_text_to_vision_sums(threshold):
    q, k = torch.randn(4, 2, 16), torch.randn(8, 2, 16)
    with pytest.raises(ValueError, match="the window and text→vision sums need every row"):
        stats_triton.block_stats(q, k, 0, 1.0, torch.zeros(8, dtype=torch.bool), row_step=2, **{threshold: 0})


def test_kernels_argument_is_checked():
    vision = torch.zeros(8, dtype=torch.bool)
    with pytest.raises(ValueError, match="kernels must be 'auto', 'torch' or 'triton'"):
        StatsAccumulator(StatsRequest(colsum=True), 8, 2, 2, vision, 1.0, kernels="cuda")  # type: ignore[arg-type]
    # Tensor parallelism reduces cross-modal maps over ranks inside the map: not in the kernels.
    with pytest.raises(ValueError, match="under tensor parallelism"):
        StatsAccumulator(StatsRequest(cross_entropy=True), 8, 2, 2, vision, 1.0, world=2, kernels="triton")
    auto = StatsAccumulator(StatsRequest(t2v=True), 8, 2, 2, vision, 1.0, world=2, all_reduce=lambda x: x)
    assert auto.kernels == "torch"
    assert StatsAccumulator(StatsRequest(colsum=True), 8, 2, 2, vision, 1.0, world=2).kernels == "auto"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this process interprets Triton")
def test_cpu_tensors_without_the_interpreter_get_a_clear_error():
    q, k = torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        stats_triton.block_stats(q, k, 0, 1.0, torch.zeros(4, dtype=torch.bool), entropy=True)


def test_auto_keeps_cpu_tensors_on_torch():
    n = 6
    q, k = torch.randn(n, 2, 16), torch.randn(n, 2, 16)
    acc = StatsAccumulator(StatsRequest(colsum=True), n, 2, 2, torch.zeros(n, dtype=torch.bool), 0.25)
    acc.update(q, k, 0)  # would raise in block_stats if it went to Triton
    # every row's probabilities sum to 1, in each of the 2 KV heads
    torch.testing.assert_close(acc.result().colsum.sum(1), torch.full((2,), float(n)))


KERNELS = ("_row_stats", "_col_stats", "_t2v_max", "_cross_entropy")


@pytest.mark.parametrize(
    ("arch", "dtype", "d", "group"),
    [(90, "bf16", 128, 1), (90, "bf16", 128, 4), (80, "fp16", 64, 7), (90, "fp32", 40, 2)],
)
def test_kernels_compile_for_the_gpu(tmp_path, monkeypatch, arch, dtype, d, group):
    """Ahead-of-time compilation to a CUDA binary (no GPU needed): the interpreter does not type-check."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    consts = {"GROUP": group, "D": d, "BD": max(16, triton.next_power_of_2(d)), "BM": 64, "BN": 64}
    consts["PREC"] = "ieee" if dtype == "fp32" else "tf32"
    for name in KERNELS:
        fn = getattr(stats_triton, name)
        signature = {}
        for arg in inspect.signature(fn.fn).parameters:
            if arg in consts:
                signature[arg] = "constexpr"
            elif arg in ("q_ptr", "k_ptr"):
                signature[arg] = f"*{dtype}"
            elif arg == "vis_ptr":
                signature[arg] = "*i8"
            elif arg.endswith("_ptr"):
                signature[arg] = "*fp32"
            else:
                signature[arg] = "fp32" if arg == "scale" else "i32"
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs=consts), target=GPUTarget("cuda", arch, 32)
        )
        assert compiled.asm["cubin"], name
