"""Soak test of the OpenAI-compatible server: ``vllm serve`` under a steady mixed load, then the pool drained.

Starts ``vllm serve MODEL --kv-policy snapkv --kv-budget 0.3`` (the embedded VLM by default) as a separate
process bound to 127.0.0.1 on a free port and drives it with ``openai.AsyncOpenAI`` for ``--duration``
seconds (at most ``--max-requests`` requests) from ``--concurrency`` workers. Every request is a streamed
chat completion with a random prompt (a slice of real text), a random ``max_tokens`` (EOS ignored, so the
length is exactly that), 0–2 random 64×64 images in about a third of them, and a random registered policy
and budget through ``vllm_xargs`` (or the server's default). About 10% are aborted by the client after a
random number of chunks, about 2% carry malformed policy arguments that must be answered with HTTP 400.
Request 0 is always malformed and request 1 always aborted mid-stream, so even a short run covers both.

Every request ends as exactly one of: ``completed`` (finish_reason "length" and exactly ``max_tokens``
output tokens), ``aborted`` (the client cancelled it), ``rejected`` (a malformed one answered 400) or
``failed`` (anything else: an HTTP error, a broken or short stream, a timeout, a malformed request that was
accepted). After the load the benchmark waits for ``/metrics`` to show no running or waiting request, sends
one 1-token ``full`` request so the scheduler publishes fresh pool statistics (an abort alone does not),
and reads the pool: ``vllm:kv_cache_usage_perc`` must be 0. Exit code 1 if anything failed or the pool is
not empty.

    vllm-kvmm bench soak                                  # 10 minutes, 8 workers, the embedded VLM
    vllm-kvmm bench soak --duration 60 --concurrency 4 --json out/soak-short.json
    vllm-kvmm bench soak --model DIR                      # any model folder (images only for a VLM)

Writes ``--json`` (default ``out/soak.json``: the counts, latencies, the pool after the drain, the command)
and the server's log next to it (``soak.server.log``). Only loopback is used: the server binds
127.0.0.1 and the client ignores proxy settings. (``python -m vllm_kvmm.bench.soak`` takes the same flags.)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import shlex
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vllm_kvmm.bench.child import machine
from vllm_kvmm.local_server import OPENER, free_port, vllm_exe, vllm_server

SERVED_NAME = "soak"
SERVER_POLICY, SERVER_BUDGET = "snapkv", 0.3
IMAGE_SIZE = 64  # the embedded VLM's processor input (vllm_kvmm.vlm.encoder.IMAGE_SIZE; the demo's images)
BUDGETS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
MALFORMED: tuple[dict[str, Any], ...] = (
    {"kv_budget": 1.5},
    {"kv_budget": 0},
    {"kv_policy": "no-such-policy"},
    {"kv_policy": "full", "kv_budget": 0.5},
    {"kv_policy": "snapkv", "kv_budget": -0.2},
)
KVMM_COUNTERS = (
    "vllm_kvmm:compressed_requests_total",
    "vllm_kvmm:blocks_freed_total",
    "vllm_kvmm:failed_compressions_total",
    "vllm_kvmm:decode_flushes_total",
    "vllm_kvmm:compression_duration_seconds_count",
)
KINDS = ("completed", "aborted", "rejected", "failed")


def scrape(base: str, timeout: float = 10) -> dict[str, float]:
    """Every sample of ``/metrics``, summed over label sets: ``{metric name: value}``."""
    out: dict[str, float] = {}
    with OPENER.open(f"{base}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        out[name] = out.get(name, 0.0) + value
    return out


def _is_vlm(model: Path) -> bool:
    try:
        return "vision_config" in json.loads((model / "config.json").read_text())
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class Plan:
    """One request of the load."""

    index: int
    words: int
    max_tokens: int
    images: int
    xargs: dict[str, Any] | None  # None: the server's default policy
    abort_after: int | None = None  # cancel the stream after this many chunks (0: right after the headers)
    malformed: bool = False

    @property
    def label(self) -> str:
        if self.malformed:
            return "malformed"
        return str(self.xargs["kv_policy"]) if self.xargs and "kv_policy" in self.xargs else "default"


def make_plan(rng: random.Random, index: int, a: argparse.Namespace, policies: Sequence[str]) -> Plan:
    """A random request; request 0 is malformed and request 1 aborted after one chunk (every run has both)."""
    from vllm_kvmm.policies import POLICIES, DecodeCadence

    words = rng.randint(a.min_prompt_words, a.max_prompt_words)
    max_tokens = rng.randint(1, a.max_tokens)
    images = rng.choice((1, 2)) if rng.random() < a.image_prob else 0
    if index == 0 or (index > 1 and rng.random() < a.malformed_prob):
        return Plan(index, words, max_tokens, images, dict(rng.choice(MALFORMED)), malformed=True)
    name = rng.choice([*policies, None])
    xargs: dict[str, Any] | None = None
    if name == "full":
        xargs = {"kv_policy": "full", "kv_budget": 1.0}
    elif name is not None:
        xargs = {"kv_policy": name, "kv_budget": rng.choice(BUDGETS)}
        if issubclass(POLICIES[name], DecodeCadence) and rng.random() < 0.5:  # decode-time eviction too
            config: dict[str, Any] = {"decode_interval": rng.choice((4, 8, 16))}
            if name == "hae":
                config["decode_budget"] = rng.choice((0.2, 0.5))
            xargs["kv_policy_config"] = json.dumps(config)
    if index == 1:
        return Plan(index, words, a.max_tokens, images, xargs, abort_after=1)
    abort_after = rng.randint(0, 4) if rng.random() < a.abort_prob else None
    return Plan(index, words, max_tokens, images, xargs, abort_after=abort_after)


@dataclass
class Outcome:
    plan: Plan
    kind: str  # one of KINDS
    latency_s: float | None = None
    ttft_s: float | None = None
    output_tokens: int = 0
    error: str | None = None


class Load:
    """The request generator: random plans, prompts and images (one seeded stream)."""

    def __init__(self, a: argparse.Namespace, policies: Sequence[str]) -> None:
        from vllm_kvmm.data import long_text

        self.a, self.policies = a, list(policies)
        self.rng = random.Random(a.seed)
        self.text = long_text().split()

    def plan(self, index: int) -> Plan:
        return make_plan(self.rng, index, self.a, self.policies)

    def _image_url(self) -> str:
        from PIL import Image

        rng, n = self.rng, IMAGE_SIZE
        if rng.random() < 0.5:  # noise
            im = Image.frombytes("RGB", (n, n), rng.randbytes(n * n * 3))
        else:  # a coloured box on a coloured background (easy-VQA-like)
            from PIL import ImageDraw

            im = Image.new("RGB", (n, n), tuple(rng.randrange(256) for _ in range(3)))
            x0, y0 = rng.randrange(n // 2), rng.randrange(n // 2)
            box = (x0, y0, x0 + rng.randint(8, n // 2), y0 + rng.randint(8, n // 2))
            ImageDraw.Draw(im).rectangle(box, fill=tuple(rng.randrange(256) for _ in range(3)))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def messages(self, plan: Plan) -> list[dict[str, Any]]:
        start = self.rng.randrange(max(1, len(self.text) - plan.words))
        text = " ".join(self.text[start : start + plan.words])
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": self._image_url()}} for _ in range(plan.images)
        ]
        content.append({"type": "text", "text": text})
        return [{"role": "user", "content": content}]


async def one_request(client: Any, load: Load, plan: Plan, timeout: float) -> Outcome:
    """Send ``plan`` as a streamed chat completion and classify how it ended."""
    import openai

    body: dict[str, Any] = {"ignore_eos": True}
    if plan.xargs is not None:
        body["vllm_xargs"] = plan.xargs
    t0 = time.perf_counter()
    ttft: float | None = None
    chunks, usage, finish = 0, None, None
    try:
        async with asyncio.timeout(timeout):
            stream = await client.chat.completions.create(
                model=SERVED_NAME,
                messages=load.messages(plan),
                max_tokens=plan.max_tokens,
                # No `seed`: the CPU backend refuses seeded sampling (validation.check_sampling).
                temperature=1.0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=body,
            )
            try:
                if plan.malformed:
                    return Outcome(plan, "failed", error=f"malformed {plan.xargs} was accepted (HTTP 200)")
                if plan.abort_after == 0:
                    return Outcome(plan, "aborted", latency_s=time.perf_counter() - t0)
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if not chunk.choices:
                        continue
                    chunks += 1
                    choice = chunk.choices[0]
                    if ttft is None and (choice.delta.content or choice.finish_reason):
                        ttft = time.perf_counter() - t0
                    finish = choice.finish_reason or finish
                    if plan.abort_after is not None and chunks >= plan.abort_after and finish is None:
                        return Outcome(plan, "aborted", latency_s=time.perf_counter() - t0, ttft_s=ttft)
            finally:
                await stream.close()  # a no-op after a full stream; an abort the server sees otherwise
    except openai.APIStatusError as e:
        if plan.malformed and e.status_code == 400:
            return Outcome(plan, "rejected", latency_s=time.perf_counter() - t0)
        return Outcome(plan, "failed", error=f"HTTP {e.status_code}: {e.message}"[:500])
    except TimeoutError:
        return Outcome(plan, "failed", error=f"no answer within {timeout:.0f} s")
    except Exception as e:  # connection errors, errors inside or breaking the stream
        return Outcome(plan, "failed", error=f"{type(e).__name__}: {e}"[:500])
    latency = time.perf_counter() - t0
    n_out = usage.completion_tokens if usage is not None else 0
    if finish != "length" or n_out != plan.max_tokens:
        err = f"stream ended with finish_reason={finish!r}, {n_out} of {plan.max_tokens} tokens"
        return Outcome(plan, "failed", latency_s=latency, error=err)
    return Outcome(plan, "completed", latency_s=latency, ttft_s=ttft, output_tokens=n_out)


async def drive(base: str, a: argparse.Namespace, policies: Sequence[str]) -> tuple[list[Outcome], float]:
    """``a.concurrency`` workers for ``a.duration`` s, ``a.max_requests`` at most; (outcomes, elapsed s)."""
    import openai

    load = Load(a, policies)
    http = openai.DefaultAsyncHttpxClient(trust_env=False)  # loopback only: no proxy from the environment
    client = openai.AsyncOpenAI(
        base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=a.request_timeout, http_client=http
    )
    outcomes: list[Outcome] = []
    issued = 0
    t0 = last_print = time.perf_counter()
    deadline = t0 + a.duration

    async def worker() -> None:
        nonlocal issued, last_print
        while issued < a.max_requests and time.perf_counter() < deadline:
            plan = load.plan(issued)
            issued += 1
            outcomes.append(await one_request(client, load, plan, a.request_timeout))
            if time.perf_counter() - last_print >= 30:
                last_print = time.perf_counter()
                c = Counter(o.kind for o in outcomes)
                rest = max(0.0, deadline - last_print)
                print(f"  {len(outcomes)} done: " + ", ".join(f"{c[k]} {k}" for k in KINDS)
                      + f"   ({rest:.0f} s of load left)", flush=True)  # fmt: skip

    try:
        await asyncio.gather(*(worker() for _ in range(a.concurrency)))
    finally:
        await client.close()
    return outcomes, time.perf_counter() - t0


async def settle(base: str, a: argparse.Namespace) -> None:
    """One 1-token ``full`` request: its last step publishes fresh pool statistics to ``/metrics``."""
    import openai

    http = openai.DefaultAsyncHttpxClient(trust_env=False)
    async with openai.AsyncOpenAI(
        base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=a.request_timeout, http_client=http
    ) as client:
        await client.chat.completions.create(
            model=SERVED_NAME,
            messages=[{"role": "user", "content": "Hello."}],
            max_tokens=1,
            extra_body={"vllm_xargs": {"kv_policy": "full"}},
        )


def _wait_idle(base: str, timeout: float) -> tuple[bool, dict[str, float]]:
    """Poll ``/metrics`` until no request is running or waiting; (idle, last scrape)."""
    t0 = time.time()
    while True:
        m = scrape(base)
        if m.get("vllm:num_requests_running", 0) == 0 and m.get("vllm:num_requests_waiting", 0) == 0:
            return True, m
        if time.time() - t0 > timeout:
            return False, m
        time.sleep(0.5)


def drain(base: str, a: argparse.Namespace) -> dict[str, Any]:
    """Wait for the engine to go idle, refresh the statistics, and read the pool and the counters."""
    t0 = time.time()
    res: dict[str, Any] = {"idle": False, "pool_empty": False, "error": None}
    try:
        idle, m = _wait_idle(base, a.drain_timeout)
        res["kv_cache_usage_perc_before_settle"] = m.get("vllm:kv_cache_usage_perc")
        try:
            asyncio.run(settle(base, a))
        except Exception as e:
            res["error"] = f"settle request failed: {type(e).__name__}: {e}"[:500]
        # The scrape may come before the API process has recorded the last step's statistics: poll briefly.
        deadline = time.time() + 15
        while True:
            m = scrape(base)
            now_idle = (
                m.get("vllm:num_requests_running", 0) == 0 and m.get("vllm:num_requests_waiting", 0) == 0
            )
            if (now_idle and m.get("vllm:kv_cache_usage_perc") == 0) or time.time() > deadline:
                break
            time.sleep(0.5)
    except OSError as e:  # the server is gone
        res["error"] = f"reading /metrics failed: {e}"
        return {**res, "drain_s": round(time.time() - t0, 2)}
    usage = m.get("vllm:kv_cache_usage_perc")
    res.update(
        idle=idle and now_idle,
        drain_s=round(time.time() - t0, 2),
        running=m.get("vllm:num_requests_running"),
        waiting=m.get("vllm:num_requests_waiting"),
        kv_cache_usage_perc=usage,
        counters={k.removeprefix("vllm_kvmm:"): m.get(k, 0.0) for k in KVMM_COUNTERS},
        preemptions=m.get("vllm:num_preemptions_total"),
    )
    res["pool_empty"] = bool(usage == 0 and res["idle"])
    return res


def percentile(xs: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 100]); None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, -(-len(s) * q // 100) - 1))
    return round(s[int(k)], 4)


def summarize(outcomes: Sequence[Outcome], elapsed: float) -> dict[str, Any]:
    kinds = Counter(o.kind for o in outcomes)
    done = [o for o in outcomes if o.kind == "completed"]
    lat = [o.latency_s for o in done if o.latency_s is not None]
    ttft = [o.ttft_s for o in done if o.ttft_s is not None]
    tokens = sum(o.output_tokens for o in done)
    by_policy: dict[str, Counter] = {}
    for o in outcomes:
        by_policy.setdefault(o.plan.label, Counter())[o.kind] += 1
    return {
        "issued": len(outcomes),
        **{k: kinds[k] for k in KINDS},
        "errors": [
            f"request {o.plan.index} ({o.plan.label}): {o.error}" for o in outcomes if o.kind == "failed"
        ][:10],
        "elapsed_s": round(elapsed, 2),
        "requests_per_s": round(len(done) / elapsed, 3) if elapsed > 0 else None,
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / elapsed, 2) if elapsed > 0 else None,
        "latency_p50_s": percentile(lat, 50),
        "latency_p99_s": percentile(lat, 99),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "with_images": sum(1 for o in outcomes if o.plan.images),
        "images": sum(o.plan.images for o in outcomes),
        "by_policy": {k: dict(v) for k, v in sorted(by_policy.items())},
    }


def command_line(a: argparse.Namespace) -> str:
    """The full command of this run, every flag spelled out."""
    flags = []
    for dest in ("model", "duration", "concurrency", "max_requests", "max_tokens", "min_prompt_words",
                 "max_prompt_words", "image_prob", "abort_prob", "malformed_prob", "seed", "json",
                 "request_timeout", "drain_timeout", "start_timeout", "max_model_len"):  # fmt: skip
        value = getattr(a, dest)
        if value is not None:
            flags += [f"--{dest.replace('_', '-')}", str(value)]
    for extra in a.serve_arg:
        flags.append(f"--serve-arg={extra}")
    return "vllm-kvmm bench soak " + shlex.join(flags)


def server_command(a: argparse.Namespace, model: Path, vlm: bool) -> list[str]:
    cmd = [
        vllm_exe(), "serve", str(model),
        "--served-model-name", SERVED_NAME,
        "--kv-policy", SERVER_POLICY,
        "--kv-budget", str(SERVER_BUDGET),
        "--dtype", "float32",
        "--max-model-len", str(a.max_model_len),
        "--block-size", "16",
        "--enforce-eager",
        "--seed", "0",
        "--host", "127.0.0.1",
        "--port", str(free_port()),
    ]  # fmt: skip
    if vlm:
        cmd += ["--limit-mm-per-prompt", json.dumps({"image": 2})]
    return cmd + list(a.serve_arg)


def _table(res: dict[str, Any]) -> str:
    d = res["drain"]
    rows = [
        ("requests", f"{res['issued']} issued in {res['elapsed_s']} s"),
        ("completed / aborted / rejected / failed",
         f"{res['completed']} / {res['aborted']} / {res['rejected']} / {res['failed']}"),
        ("requests/s (completed)", res["requests_per_s"]),
        ("output tokens/s", f"{res['output_tokens_per_s']} ({res['output_tokens']} tokens)"),
        ("latency p50 / p99 (s)", f"{res['latency_p50_s']} / {res['latency_p99_s']}"),
        ("TTFT p50 / p99 (s)", f"{res['ttft_p50_s']} / {res['ttft_p99_s']}"),
        ("requests with images", f"{res['with_images']} ({res['images']} images)"),
        ("drained (no running/waiting)", f"{d['idle']} in {d['drain_s']} s"),
        ("vllm:kv_cache_usage_perc after drain", d.get("kv_cache_usage_perc")),
        *((f"vllm_kvmm:{k}", int(v)) for k, v in d.get("counters", {}).items()),
        ("preemptions", d.get("preemptions")),
    ]  # fmt: skip
    if d["error"]:
        rows.append(("drain error", d["error"]))
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'metric':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
    return "\n".join(lines)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The benchmark's flags (``vllm-kvmm bench soak`` and ``python -m vllm_kvmm.bench.soak``)."""
    p = p or argparse.ArgumentParser(
        prog="vllm-kvmm bench soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="model folder (default: the embedded VLM)")
    p.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent client workers (default 8)")
    p.add_argument("--max-requests", type=int, default=5000, help="at most this many requests (default 5000)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens is drawn from 1..this (default 64)")
    p.add_argument("--min-prompt-words", type=int, default=3)
    p.add_argument("--max-prompt-words", type=int, default=400, help="prompt: a random slice of real text")
    p.add_argument("--image-prob", type=float, default=1 / 3, help="share of requests with 1-2 images (VLM)")
    p.add_argument("--abort-prob", type=float, default=0.1, help="share cancelled by the client mid-stream")
    p.add_argument("--malformed-prob", type=float, default=0.02, help="share with malformed vllm_xargs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json", default=str(Path("out") / "soak.json"), help="result file; the log goes next to it"
    )
    p.add_argument("--request-timeout", type=float, default=300, help="seconds per request before 'failed'")
    p.add_argument(
        "--drain-timeout", type=float, default=120, help="seconds to wait for the engine to go idle"
    )
    p.add_argument("--start-timeout", type=float, default=600, help="seconds to wait for the server to start")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="extra `vllm serve` argument (repeatable; --serve-arg=--x=1)",
    )
    return p


def run(a: argparse.Namespace) -> int:
    """Run the soak benchmark parsed into ``a``; 1 if a request failed or the pool is not empty after it."""
    from vllm_kvmm.policies import policy_names

    for flag in ("duration", "concurrency", "max_requests", "max_tokens", "request_timeout"):
        if getattr(a, flag) <= 0:
            raise SystemExit(f"vllm-kvmm bench soak: --{flag.replace('_', '-')} must be positive")
    if a.model is None:
        from vllm_kvmm.vlm.assemble import ensure_vlm

        model = ensure_vlm()
    else:
        model = Path(a.model)
    vlm = _is_vlm(model)
    if not vlm:
        a.image_prob = 0.0  # a text-only model gets no images
    out = Path(a.json)
    log = out.with_suffix(".server.log")
    cmd = server_command(a, model, vlm)
    policies = policy_names()
    command = command_line(a)
    print(f"$ {command}\n$ {shlex.join(cmd)}   (log: {log})", flush=True)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        with vllm_server(cmd, log, a.start_timeout) as base:
            print(
                f"load: {a.concurrency} workers, {a.duration:g} s, at most {a.max_requests} requests",
                flush=True,
            )
            outcomes, elapsed = asyncio.run(drive(base, a, policies))
            drained = drain(base, a)
    except RuntimeError as e:
        print(f"vllm-kvmm bench soak: {e}", file=sys.stderr)
        return 1
    res = {
        "command": command,
        "argv": sys.argv,
        "server_command": cmd,
        "server_log": str(log),
        "model": str(model),
        "machine": machine(),
        "started": started,
        "server_policy": {"kv_policy": SERVER_POLICY, "kv_budget": SERVER_BUDGET},
        "policies": policies,
        "duration_s": a.duration,
        "concurrency": a.concurrency,
        **summarize(outcomes, elapsed),
        "drain": drained,
    }
    res["pool_empty"] = drained["pool_empty"]
    res["ok"] = res["failed"] == 0 and res["pool_empty"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print("\n" + _table(res))
    for err in res["errors"]:
        print(f"  failed: {err}")
    print(f"\n{'OK' if res['ok'] else 'FAILED'}; wrote {out}", flush=True)
    return 0 if res["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vllm_kvmm.bench.soak``: the same as ``vllm-kvmm bench soak``."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
