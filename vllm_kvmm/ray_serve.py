"""A Ray Serve application: vLLM's OpenAI API with a KV policy, one engine per replica.

Each replica builds the same app ``vllm serve`` builds (vLLM's FastAPI app on an in-process engine
client, our plugin's ``--kv-*`` flags and request checks included) from a ``vllm serve`` argument list,
and Ray Serve's HTTP proxy forwards every request to it. So the API, the per-request ``vllm_xargs``, the
400s for bad values, ``/health`` and ``/metrics`` (``vllm_kvmm:*``) are vLLM's and ours, unchanged; Ray
Serve adds replicas, autoscaling and its deployment graph. Requires the ``[ray]`` extra with Ray Serve
(``pip install "ray[serve]==2.60.0"``). Run it with ``serve run vllm_kvmm.ray_serve:build_app
argv="MODEL --kv-policy snapkv --kv-budget 0.3"`` or the config in ``deploy/ray-serve/``; docs/deploy.md.
"""

from __future__ import annotations

import asyncio
import shlex
from contextlib import AsyncExitStack
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

__all__ = ["KVMMOpenAI", "build_app", "parse_serve_args"]

# Hop-by-hop headers (RFC 9110 §7.6.1) and those the forwarded body's length decides.
_DROP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host"})


def parse_serve_args(argv: list[str]) -> Any:
    """``vllm serve ARGV`` parsed exactly as the CLI does (our plugin's flags and checks included)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.openai.cli_args import validate_parsed_serve_args
    from vllm.plugins import load_general_plugins
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    load_general_plugins()  # adds --kv-* to vLLM's parser, as in `vllm serve`
    parser = FlexibleArgumentParser(prog="vllm")
    command = ServeSubcommand()
    command.subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(["serve", *argv])
    command.validate(args)
    args.model = args.model_tag
    validate_parsed_serve_args(args)
    return args


@serve.deployment(ray_actor_options={"num_cpus": 1}, health_check_timeout_s=600)
class KVMMOpenAI:
    """One vLLM engine and its OpenAI app; Ray Serve's proxy hands it each HTTP request."""

    def __init__(self, argv: list[str]) -> None:
        self._args = parse_serve_args(argv)  # a bad flag fails the deployment at once, with argparse's reason
        self._stack = AsyncExitStack()
        self._client: Any = None
        self._ready = asyncio.Lock()

    async def _start(self) -> Any:
        """Build the engine and the app on first use (inside the replica's event loop)."""
        async with self._ready:
            if self._client is None:
                import httpx
                from vllm.entrypoints.openai.api_server import (
                    build_app,
                    build_async_engine_client,
                    init_app_state,
                )

                engine = await self._stack.enter_async_context(build_async_engine_client(self._args))
                tasks = await engine.get_supported_tasks()
                app = build_app(self._args, tasks, engine.model_config)
                await init_app_state(engine, app.state, self._args, tasks)
                transport = httpx.ASGITransport(app=app)
                self._client = await self._stack.enter_async_context(
                    httpx.AsyncClient(transport=transport, base_url="http://vllm", timeout=None)
                )
        return self._client

    async def check_health(self) -> None:
        """Ray Serve's health check: the engine starts here, so a replica is ready only once it serves."""
        client = await self._start()
        reply = await client.get("/health")
        if reply.status_code != 200:
            raise RuntimeError(f"vLLM /health answered {reply.status_code}")

    async def __call__(self, request: Request) -> Response:
        client = await self._start()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        reply = await client.request(
            request.method,
            request.url.path,
            params=request.query_params,
            headers=headers,
            content=await request.body(),
        )
        out = {k: v for k, v in reply.headers.items() if k.lower() not in _DROP}
        return Response(reply.content, status_code=reply.status_code, headers=out)


def build_app(args: dict[str, str]) -> Any:
    """``serve run vllm_kvmm.ray_serve:build_app argv="..."``: the app for a ``vllm serve`` command line."""
    argv = args.get("argv", "")
    if not argv:
        raise ValueError('give the vllm serve arguments: argv="MODEL --kv-policy snapkv --kv-budget 0.3 ..."')
    return KVMMOpenAI.bind(shlex.split(argv))
