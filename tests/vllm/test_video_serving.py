"""Video through the OpenAI API: `vllm serve` tiny Qwen2.5-VL `--kv-policy snapkv`, a `video_url` (MP4).

The video's tokens reach the policy as vision tokens (placeholder ranges), the prompt is compressed to
its budget and blocks go back to the pool; a per-request `full` leaves the same video whole.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vllm_kvmm.local_server import OPENER, free_port, vllm_exe, vllm_server

FRAMES, SIZE = 16, 224  # 8 temporal patches of 8×8 merged patches: 512 video tokens


def _mp4(path: Path) -> str:
    """A ``data:video/mp4`` URL of ``FRAMES`` random frames at 2 fps."""
    import cv2

    rng = np.random.default_rng(5)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 2.0, (SIZE, SIZE))
    for _ in range(FRAMES):
        writer.write(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    writer.release()
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def server(tiny_qwen25vl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    cmd = [
        vllm_exe(), "serve", str(tiny_qwen25vl_dir),
        "--kv-policy", "snapkv",
        "--kv-budget", "0.25",
        "--dtype", "float32",
        "--max-model-len", "2048",
        "--limit-mm-per-prompt", '{"image": 0, "video": 1}',
        "--enforce-eager",
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    with vllm_server(cmd, tmp_path_factory.mktemp("serve") / "serve.log", start_timeout=240) as base:
        yield base


def _chat(client: Any, model: str, url: str, **xargs: Any) -> Any:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": url}},
                {"type": "text", "text": "What happens in this video?"},
            ],
        }
    ]
    extra = {"vllm_xargs": xargs} if xargs else None
    return client.chat.completions.create(
        model=model, messages=messages, max_tokens=6, temperature=0, extra_body=extra
    )


def _blocks_freed(base: str) -> float:
    text = OPENER.open(f"{base}/metrics").read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm_kvmm:blocks_freed_total{"))  # fmt: skip


def test_a_video_url_is_compressed(server: str, tiny_qwen25vl_dir: Path, tmp_path: Path) -> None:
    import httpx
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", http_client=httpx.Client(trust_env=False))
    model, url = str(tiny_qwen25vl_dir), _mp4(tmp_path / "clip.mp4")

    out = _chat(client, model, url)  # the server default: snapkv at 0.25
    assert out.usage.completion_tokens == 6
    assert out.usage.prompt_tokens > 512  # the video's tokens, then the question
    report = out.kv_transfer_params["kvmm"]
    assert report["policy"] == "snapkv" and report["compressed"] is True
    assert 0.2 <= report["kv_kept"] <= 0.275 and report["budget_met"] is True
    freed = _blocks_freed(server)
    assert freed > 0

    whole = _chat(client, model, url, kv_policy="full")
    assert whole.usage.prompt_tokens == out.usage.prompt_tokens
    assert whole.kv_transfer_params["kvmm"]["compressed"] is False
    assert _blocks_freed(server) == freed  # nothing more given back
