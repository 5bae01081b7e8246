"""ASGI middleware of ``vllm serve --kv-policy``: reject malformed per-request policy arguments early.

vLLM renders a chat request (and caches its images for the engine) before it checks ``SamplingParams``;
an error raised at that later check leaves vLLM 0.26's multimodal sender cache believing the engine has
the images, so the *next* request with the same image fails. Checking ``vllm_xargs`` here, before
anything is rendered, returns the HTTP 400 without touching any state.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from vllm_kvmm.vllm_ext.validation import check_request_args

__all__ = ["KVPolicyRequestCheck"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
CHECKED_PATHS = ("/chat/completions", "/completions", "/responses")


class KVPolicyRequestCheck:
    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith(CHECKED_PATHS):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        error, body = _check(body)
        if error is not None:
            payload = json.dumps(
                {"error": {"message": error, "type": "BadRequestError", "param": "vllm_xargs", "code": 400}}
            ).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ]
            await send({"type": "http.response.start", "status": 400, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()  # e.g. http.disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _check(body: bytes) -> tuple[str | None, bytes]:
    """``(error, body for the app)``: the 400 message of malformed policy arguments, or ``None``.

    vLLM accepts only scalars as ``vllm_xargs`` values, so a ``kv_policy_config`` given as the JSON object
    the docs show is rewritten into its string form here, before vLLM's own validation sees it.
    """
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return None, body  # not ours to judge: vLLM answers malformed JSON itself
    xargs = data.get("vllm_xargs") if isinstance(data, dict) else None
    if xargs is None:
        return None, body
    if not isinstance(xargs, dict):
        return f"vllm_xargs must be an object, got {type(xargs).__name__}", body
    try:
        check_request_args(xargs)
    except ValueError as e:
        return str(e), body
    if isinstance(xargs.get("kv_policy_config"), dict):
        xargs["kv_policy_config"] = json.dumps(xargs["kv_policy_config"])
        return None, json.dumps(data).encode()
    return None, body
