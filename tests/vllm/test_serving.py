"""`vllm serve --kv-policy meda` on tiny LLaVA, driven with the OpenAI client over 127.0.0.1.

Bad per-request policies get HTTP 400 with a message and leave the server serving (also the same image
again: the check runs before vLLM renders and caches it); good ones get 200; `/metrics` reports the
compression.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [
        str(Path(sys.executable).parent / "vllm"),
        "serve",
        str(tiny_llava_dir),
        "--kv-policy", "meda",
        "--kv-budget", "0.5",
        "--enable-prefix-caching",
        "--dtype", "float32",
        "--max-model-len", "2048",
        "--block-size", "16",
        "--enforce-eager",
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the real multi-process server
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"vllm serve did not start in time:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _image_url(images: list) -> str:
    buf = io.BytesIO()
    images[0].save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(client: Any, model: str, images: list, history: list | None = None, **xargs: Any) -> Any:
    """One chat turn about ``images[0]``; ``history``: earlier answers and questions after the first."""
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _image_url(images)}},
                {"type": "text", "text": "Describe the image in detail, please."},
            ],
        },
        *(history or []),
    ]
    extra = {"vllm_xargs": xargs} if xargs else None
    return client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, extra_body=extra
    )


def _metrics(base: str, prefix: str = "vllm_kvmm:") -> dict[str, float]:
    text = urllib.request.urlopen(f"{base}/metrics").read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix) and ("_total{" in line or "_count{" in line):
            out[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
    return out


def test_serve_kv_policy(server: str, tiny_llava_dir: Path, images: list) -> None:
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    model = str(tiny_llava_dir)
    with pytest.raises(BadRequestError) as bad:
        _chat(client, model, images, kv_policy="no-such-policy")
    assert bad.value.status_code == 400
    assert "unknown KV policy 'no-such-policy'" in str(bad.value)
    with pytest.raises(BadRequestError) as bad:
        _chat(client, model, images, kv_budget=1.5)
    assert "kv_budget must be a number in (0, 1]" in str(bad.value)

    ok = _chat(client, model, images, kv_policy="snapkv", kv_budget=0.3)  # same image as the rejected ones
    assert ok.choices[0].message.content is not None and ok.usage.completion_tokens == 8
    default = _chat(client, model, images)  # the server default: meda at 0.5
    assert default.usage.completion_tokens == 8

    m = _metrics(server)
    assert m["vllm_kvmm:compressed_requests_total"] == 2
    assert m["vllm_kvmm:prompt_tokens_total"] == 2 * ok.usage.prompt_tokens
    assert 0 < m["vllm_kvmm:kv_token_layers_kept_total"] < m["vllm_kvmm:kv_token_layers_prompt_total"]
    assert m["vllm_kvmm:blocks_freed_total"] > 0
    assert m["vllm_kvmm:compression_duration_seconds_count"] == 2  # one observation per compressed prompt
    assert "vllm_kvmm:failed_compressions_total" not in m or m["vllm_kvmm:failed_compressions_total"] == 0

    # Prefix caching (the server runs with --enable-prefix-caching): the image marked shared is found in
    # the cache by the second request.
    with pytest.raises(BadRequestError) as bad:
        _chat(client, model, images, kv_shared_prefix=-3)
    assert 'kv_shared_prefix must be a number of prompt tokens (>= 0) or "images", got -3' in str(bad.value)
    hits = _metrics(server, "vllm:")["vllm:prefix_cache_hits_total"]
    for _ in range(2):
        _chat(client, model, images, kv_policy="snapkv", kv_budget=0.3, kv_shared_prefix="images")
    assert _metrics(server, "vllm:")["vllm:prefix_cache_hits_total"] - hits >= 16  # the image's blocks
    # The image is most of this prompt: kept exact, it leaves less than a block to evict after it, so
    # nothing is freed and neither request counts as compressed.
    after = _metrics(server)
    assert after["vllm_kvmm:compressed_requests_total"] == 2
    # Both kept the same whole blocks exact (nothing was marked before).
    assert m.get("vllm_kvmm:shared_prefix_tokens_total", 0) == 0
    assert after["vllm_kvmm:shared_prefix_tokens_total"] > 0
    assert after["vllm_kvmm:shared_prefix_tokens_total"] % 32 == 0

    # Compressed reuse: the next turn of a chat about another image continues the first turn's compressed
    # cache (the tiny model's answer re-tokenised may differ from its tokens, but the first turn's prompt
    # and compressed tail are found whatever follows).
    with pytest.raises(BadRequestError) as bad:
        _chat(client, model, images, kv_reuse="yes")
    assert "kv_reuse must be true or false, got 'yes'" in str(bad.value)
    other = images[1:]
    reuse = {"kv_policy": "snapkv", "kv_budget": 0.3, "kv_reuse": True}
    first = _chat(client, model, other, **reuse)
    turn = [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And the colours?"},
    ]
    second = _chat(client, model, other, history=turn, **reuse)
    assert second.usage.completion_tokens == 8
    reused = _metrics(server).get("vllm_kvmm:reused_tokens_total", 0)
    assert reused >= 32 and reused % 16 == 0
