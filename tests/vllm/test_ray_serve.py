"""The Ray Serve application (vllm_kvmm/ray_serve.py), started for real on a local Ray cluster (CPU).

Ray Serve's HTTP proxy on 127.0.0.1 forwards to one replica that runs vLLM's OpenAI app with the embedded
SmolLM2 under ``--kv-policy snapkv --kv-budget 0.3``: a long chat is answered and compressed (its
``kv_transfer_params`` and the replica's ``/metrics`` say so), a bad ``kv_budget`` gets our 400, and a
per-request ``full`` override is served uncompressed.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

DOCUMENT = " ".join(
    f"Note {i}: the courier left parcel {i * 7 % 31} at dock {i % 5} before the {i % 3 + 1}st bell."
    for i in range(40)
)  # ~900 tokens: several blocks to free at ρ 0.3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base(smollm2_dir: Path) -> Iterator[str]:
    import ray
    from ray import serve

    from vllm_kvmm.ray_serve import build_app

    ray.init(
        address="local", num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False,
        log_to_driver=False,
    )  # fmt: skip
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        argv = (
            f"{smollm2_dir} --served-model-name smol --kv-policy snapkv --kv-budget 0.3 --dtype float32 "
            "--enforce-eager --max-model-len 2048"
        )
        serve.run(build_app({"argv": argv}), name="kvmm", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(base: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        base + path, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _chat(base: str, **xargs: Any) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {
        "model": "smol",
        "messages": [{"role": "user", "content": DOCUMENT + "\nWhere was parcel 14 left?"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    if xargs:
        body["vllm_xargs"] = xargs
    return _post(base, "/v1/chat/completions", body)


def _metric(base: str, name: str) -> float:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=60).read().decode()
    values = [float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(name + "{")]
    return sum(values)


def test_ray_serve_answers_with_compression(base: str) -> None:
    with urllib.request.urlopen(f"{base}/health", timeout=60) as r:
        assert r.status == 200
    status, reply = _chat(base)
    assert status == 200, reply
    assert reply["usage"]["completion_tokens"] == 8 and reply["choices"][0]["message"]["content"]
    report = reply["kv_transfer_params"]["kvmm"]
    assert (report["policy"], report["budget"], report["compressed"]) == ("snapkv", 0.3, True)
    assert report["prompt_tokens"] == reply["usage"]["prompt_tokens"] > 512
    assert 0.25 <= report["kv_kept"] <= 0.33 and report["budget_met"]
    assert _metric(base, "vllm_kvmm:compressed_requests_total") == 1
    assert _metric(base, "vllm_kvmm:blocks_freed_total") > 0


def test_ray_serve_keeps_our_request_checks_and_overrides(base: str) -> None:
    status, reply = _chat(base, kv_budget=1.5)
    assert status == 400
    assert "kv_budget must be a number in (0, 1]" in reply["error"]["message"]
    status, reply = _chat(base, kv_policy="full")
    assert status == 200
    assert reply["kv_transfer_params"]["kvmm"] == {"policy": "full", "budget": 1.0, "compressed": False}
