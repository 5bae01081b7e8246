"""``vllm-kvmm bench perf`` end to end on the CPU build (tiny dimensions): every field, measured KV."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_kvmm.cli import main

CTX, OUT, BLOCK = 256, 4, 16
LAYERS, KV_HEADS, HEAD_DIM, FP32 = 4, 4, 32, 4  # the tiny llama2-7b-mha: MHA kept, dimensions shrunk
PAGE = BLOCK * 2 * KV_HEADS * HEAD_DIM * FP32  # one layer's K and V for one block


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("perf")
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        # Through the `vllm-kvmm` front end, as users and scripts/gpu_run.sh run it.
        rc = main(
            ["bench", "perf", "--scale", "tiny", "--ctx", str(CTX), "--requests", "2", "--out", str(OUT),
             "--budget", "0.25", "--policies", "snapkv", "--model-root", str(root / "models"),
             "--json", str(root / "perf.json")]
        )  # fmt: skip
    finally:
        mp.undo()
    assert rc == 0
    return json.loads((root / "perf.json").read_text())


def test_every_configuration_reports_every_metric(result: dict) -> None:
    assert [r["config"] for r in result["rows"]] == ["vanilla", "ideal@0.25", "snapkv@0.25"]
    assert result["failed"] == []
    keys = {
        "decode_tok_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_ms", "tpot_p99_ms", "bs1_ms_per_tok",
        "ttft1_ms", "kv_peak_gib", "kv_per_request_mib", "max_concurrency", "compression_s_per_request",
    }  # fmt: skip
    for row in result["rows"]:
        assert keys <= set(row)
    assert result["command"].startswith("vllm-kvmm bench perf ")
    assert [r["ctx"] for r in result["rows"]] == [CTX, CTX // 4, CTX]


def test_kv_held_per_request_is_measured_from_the_pool(result: dict) -> None:
    rows = {r["kind"]: r for r in result["rows"]}
    # Vanilla: one group of all layers; prompt + OUT decoded tokens (the last sampled one is never stored).
    vanilla_blocks = -(-(CTX + OUT) // BLOCK)
    assert rows["vanilla"]["kv_per_request_mib"] == round(vanilla_blocks * LAYERS * PAGE / 2**20, 2)
    # snapkv at 0.25 keeps 64 of 256 tokens per layer = 4 blocks, decoded tokens go to one new block.
    assert rows["policy"]["kv_per_request_mib"] == round((CTX // 4 // BLOCK + 1) * LAYERS * PAGE / 2**20, 2)
    assert rows["policy"]["kv_groups"] == LAYERS and rows["vanilla"]["kv_groups"] == 1
    assert rows["policy"]["max_concurrency"] > 3 * rows["vanilla"]["max_concurrency"]
    assert rows["policy"]["compression_s_per_request"] > 0 == rows["vanilla"]["compression_s_per_request"]


def test_plot_is_written(result: dict, tmp_path: Path) -> None:
    from vllm_kvmm.bench.perf import plot  # matplotlib comes with the [bench] extra

    src = tmp_path / "perf.json"
    src.write_text(json.dumps(result))
    assert plot(src, tmp_path / "perf.png")
    assert (tmp_path / "perf.png").read_bytes()[:4] == b"\x89PNG"
