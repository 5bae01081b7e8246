"""Per-step decode overhead of the extension vs vanilla vLLM, side by side (any device; CPU by default).

A 32-layer tiny random Llama (one KV-cache group per layer under a policy), one 1,000-token request,
128 greedy tokens; per-token time = (t(129 tokens) − t(1 token)) / 128, each configuration in its own
process. On a small model the step is mostly fixed cost, which is what this isolates: metadata for 32
groups, the compact view, the statistics hooks.

    python -m vllm_kvmm.bench.overhead            # vanilla, full, snapkv@0.25, meda@0.25
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _child(model: str, policy: str | None, budget: float | None) -> None:
    from vllm import LLM, SamplingParams

    import vllm_kvmm

    kw: dict = dict(
        model=model, enforce_eager=True, dtype="float32", max_model_len=2048, block_size=16, seed=0
    )
    if policy:
        kw.update(vllm_kvmm.engine_args(policy, budget))
    llm = LLM(**kw)
    prompt = [{"prompt_token_ids": list(range(100, 1100))}]

    def run(n: int) -> float:
        t = time.perf_counter()
        llm.generate(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t

    run(4)
    best = min((run(129) - run(1)) / 128 for _ in range(3))
    print("RESULT " + json.dumps({"ms_per_token": round(1000 * best, 3)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="vanilla,full,snapkv@0.25,meda@0.25")
    ap.add_argument("--child", nargs=3, default=None)
    a = ap.parse_args()
    if a.child:
        model, policy, budget = a.child
        _child(model, None if policy == "-" else policy, None if budget == "-" else float(budget))
        return
    from vllm_kvmm.models import build_tiny_llama, load_smollm2_tokenizer

    home = Path(os.environ.get("VLLM_KVMM_HOME", Path.home() / ".cache" / "vllm-kvmm"))
    model = build_tiny_llama(
        home / "bench" / "tiny-llama-32", num_layers=32, seed=0, tokenizer=load_smollm2_tokenizer()
    )
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}
    rows = []
    for cfg in a.configs.split(","):
        name, _, budget = cfg.partition("@")
        policy = None if name == "vanilla" else name
        args = [str(model), policy or "-", budget or "-"]
        proc = subprocess.run(
            [sys.executable, "-m", "vllm_kvmm.bench.overhead", "--child", *args],
            capture_output=True,
            text=True,
            env=env,
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{cfg}: failed\n{proc.stderr[-2000:]}")
            continue
        rows.append((cfg, json.loads(line[7:])["ms_per_token"]))
        print(f"{cfg}: {rows[-1][1]} ms/token", flush=True)
    base = dict(rows).get("vanilla")
    if base:
        print("\n| config | decode ms/token | vs vanilla |\n|---|---|---|")
        for cfg, ms in rows:
            print(f"| {cfg} | {ms} | {ms / base:.3f}x |")


if __name__ == "__main__":
    main()
