"""The main job: `vllm serve` on the embedded SmolLM2 with `--kv-policy meda`, asked a long question.

Starts the OpenAI-compatible server as a user would (a separate process on 127.0.0.1), sends the
planted-passphrase document through the OpenAI client — once under the server's default policy and once
per comparison policy through ``vllm_xargs`` — prints each answer with the KV blocks compression gave
back (read from ``/metrics``), and stops the server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from vllm_kvmm.data import needle_prompt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metrics(base: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode().splitlines():
        if line.startswith("vllm_kvmm:") and "_total{" in line:
            out[line.split("_total{")[0].removeprefix("vllm_kvmm:")] = float(line.rsplit(" ", 1)[1])
    return out


def _wait(proc: subprocess.Popen, base: str, log: Path, timeout: float = 300) -> None:
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"vllm serve exited ({proc.returncode}); last lines of {log}:\n{log.read_text()[-2000:]}"
            )
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            return
        except OSError:
            if time.time() - t0 > timeout:
                raise RuntimeError(
                    f"vllm serve did not become ready in {timeout:.0f} s (log: {log})"
                ) from None
            time.sleep(1)


def run_serve_demo(
    policy: str = "meda",
    budget: float = 0.5,
    compare: Sequence[str] = ("full", "snapkv"),
    max_tokens: int = 24,
    doc_words: int = 900,
) -> int:
    from openai import OpenAI

    from vllm_kvmm.models.smollm2 import ensure_smollm2
    from vllm_kvmm.policies import make_policy

    make_policy(policy, budget)  # a bad name or budget fails before anything starts
    model = ensure_smollm2()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = Path(os.environ.get("VLLM_KVMM_HOME", Path.home() / ".cache" / "vllm-kvmm")) / "serve-demo.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(Path(sys.executable).parent / "vllm"),
        "serve",
        str(model),
        "--served-model-name", "smollm2",
        "--kv-policy", policy,
        "--kv-budget", str(budget),
        "--max-model-len", "4096",
        "--dtype", "float32",  # the converted weights' dtype: the numbers the dense reference sees
        "--enforce-eager",  # torch.compile costs ~100 s of start-up on this CPU for no gain here
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    print(f"$ vllm serve {model} --kv-policy {policy} --kv-budget {budget} ...   (log: {log})")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        t0 = time.time()
        _wait(proc, base, log)
        print(f"server ready in {time.time() - t0:.0f} s at {base}\n")
        task = needle_prompt(words=doc_words)
        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        runs = [(f"{policy} (server default, budget {budget:g})", None)]
        runs += [(name if name == "full" else f"{name} (budget 0.3)", name) for name in compare]
        print(f"question: {task.question}  (planted answer: {task.answer!r})")
        for label, override in runs:
            xargs = None
            if override is not None:
                xargs = (
                    {"kv_policy": override}
                    if override == "full"
                    else {"kv_policy": override, "kv_budget": 0.3}
                )
            before = _metrics(base)
            t1 = time.time()
            resp = client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": task.user_message}],
                max_tokens=max_tokens,
                temperature=0,
                extra_body={"vllm_xargs": xargs} if xargs else None,
            )
            dt = time.time() - t1
            after = _metrics(base)
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            answer = (resp.choices[0].message.content or "").strip().replace("\n", " ")
            usage = resp.usage
            n_prompt = usage.prompt_tokens if usage else 0
            print(f"\n== {label}   [{dt:.1f} s, {n_prompt} prompt tokens]")
            found = "yes" if task.answer in answer.lower() else "no"
            print(f"   answer:  {answer!r}   (passphrase recalled: {found})")
            if delta.get("compressed_requests"):
                kept, full = delta.get("kv_token_layers_kept", 0), delta.get("kv_token_layers_prompt", 1)
                print(
                    f"   KV:      {int(delta.get('blocks_freed', 0))} blocks freed back to the pool; "
                    f"{int(kept)} of {int(full)} prompt KV entries kept ({100 * kept / full:.0f}%), "
                    f"compression took {1000 * delta.get('compression_seconds', 0):.0f} ms"
                )
            else:
                print("   KV:      not compressed (every prompt token kept)")
        return 0
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        print("\nserver stopped")
