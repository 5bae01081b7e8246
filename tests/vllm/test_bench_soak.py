"""``vllm-kvmm bench soak`` for a short time: `vllm serve` (the embedded VLM) on 127.0.0.1 under mixed load.

Request 0 is always malformed (HTTP 400) and request 1 always aborted mid-stream, so a short run covers both;
nothing fails, every request is counted once, and the pool is empty after the drain.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_kvmm.bench.soak import main


@pytest.mark.slow
def test_short_soak(smollm2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    rc = main(
        ["--duration", "25", "--concurrency", "3", "--max-requests", "40", "--max-tokens", "16",
         "--max-prompt-words", "150", "--seed", "1", "--json", str(out)]
    )  # fmt: skip
    res = json.loads(out.read_text())
    assert rc == 0, res["errors"]
    keys = {
        "command", "server_command", "model", "issued", "completed", "aborted", "rejected", "failed",
        "errors", "requests_per_s", "output_tokens_per_s", "latency_p50_s", "latency_p99_s", "ttft_p50_s",
        "ttft_p99_s", "by_policy", "drain", "pool_empty", "ok",
    }  # fmt: skip
    assert keys <= set(res)
    assert res["command"].startswith("vllm-kvmm bench soak ") and "--duration 25" in res["command"]
    assert "127.0.0.1" in res["server_command"] and (tmp_path / "soak.server.log").is_file()
    assert res["failed"] == 0 and res["errors"] == []
    assert res["completed"] > 0 and res["rejected"] >= 1 and res["aborted"] >= 1  # requests 0 and 1
    assert res["completed"] + res["aborted"] + res["rejected"] + res["failed"] == res["issued"] <= 40
    assert sum(sum(v.values()) for v in res["by_policy"].values()) == res["issued"]
    assert res["latency_p50_s"] <= res["latency_p99_s"] and res["ttft_p50_s"] <= res["latency_p99_s"]
    drain = res["drain"]
    assert drain["idle"] and drain["kv_cache_usage_perc"] == 0 and res["pool_empty"] and res["ok"]
    counters = drain["counters"]
    assert set(counters) == {
        "compressed_requests_total", "blocks_freed_total", "failed_compressions_total",
        "decode_flushes_total", "compression_duration_seconds_count",
    }  # fmt: skip
    assert counters["failed_compressions_total"] == 0
