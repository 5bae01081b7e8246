"""Decode throughput: vanilla vLLM vs KV policies vs the ideal, side by side, on dummy 7B weights (GPU).

Each configuration runs in its own subprocess (a clean GPU), with the same random token-id prompts:
``vanilla`` (full prompts), ``ideal`` (vanilla on prompts cut to ρ·N, the best any policy can do), and
each policy at budget ρ. Decode tok/s = N·OUT / (t(prompt + OUT tokens) − t(prompt + 1 token)), as in
``shared/bench/vanilla_anchor.py``. Prints one JSON line per configuration, then a ratio table.

    python -m vllm_kvmm.bench.perf_gpu --ctx 4096 --requests 48 --budget 0.2 --policies snapkv,meda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LLAMA2_7B_MHA = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=11008,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
    max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0, torch_dtype="bfloat16",
)  # fmt: skip


def _child(cfg: dict) -> None:
    import random

    import torch
    from vllm import LLM, SamplingParams

    kw = dict(
        model=cfg["model"], load_format="dummy", skip_tokenizer_init=True, gpu_memory_utilization=0.9,
        max_model_len=cfg["ctx"] + cfg["out"] + 64, enable_prefix_caching=False, max_num_seqs=256, seed=0,
    )  # fmt: skip
    if cfg["policy"]:
        import vllm_kvmm

        kw.update(vllm_kvmm.engine_args(cfg["policy"], cfg["budget"]))
    t0 = time.time()
    llm = LLM(**kw)
    ready = time.time() - t0
    rng = random.Random(0)
    plen = cfg["plen"]
    prompts = [
        {"prompt_token_ids": [rng.randrange(100, 30000) for _ in range(plen)]} for _ in range(cfg["n"])
    ]

    def run(ps: list, out: int) -> float:
        sp = SamplingParams(max_tokens=out, ignore_eos=True, temperature=0.0, detokenize=False)
        torch.cuda.synchronize()
        t = time.time()
        llm.generate(ps, sp, use_tqdm=False)
        torch.cuda.synchronize()
        return time.time() - t

    run(prompts[:2], 8)  # warm-up
    tp = run(prompts, 1)
    tt = run(prompts, cfg["out"] + 1)
    t1p = run(prompts[:1], 1)
    t1 = run(prompts[:1], cfg["out"] + 1)
    res = dict(
        config=cfg["name"], ctx=plen, n=cfg["n"], engine_s=round(ready, 1), prefill_s=round(tp, 2),
        total_s=round(tt, 2), decode_tok_s=round(cfg["n"] * cfg["out"] / max(tt - tp, 1e-6), 1),
        bs1_ms_per_tok=round(1000 * (t1 - t1p) / cfg["out"], 2), ttft1_s=round(t1p, 3),
    )  # fmt: skip
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--out", type=int, default=256)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--policies", default="snapkv,meda")
    ap.add_argument("--model-dir", default="/tmp/models/llama2-7b-mha")
    ap.add_argument("--no-ideal", action="store_true", help="skip the shortened-prompt ideal")
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        _child(json.loads(a.child))
        return
    os.makedirs(a.model_dir, exist_ok=True)
    with open(f"{a.model_dir}/config.json", "w") as f:
        json.dump(LLAMA2_7B_MHA, f)
    base = dict(model=a.model_dir, ctx=a.ctx, out=a.out, n=a.requests, budget=a.budget)
    configs = [dict(base, name="vanilla", policy=None, plen=a.ctx)]
    if not a.no_ideal:
        configs.append(dict(base, name=f"ideal@{a.budget:g}", policy=None, plen=int(a.ctx * a.budget)))
    configs += [
        dict(base, name=f"{p}@{a.budget:g}", policy=p, plen=a.ctx) for p in a.policies.split(",") if p
    ]
    results = []
    for cfg in configs:
        proc = subprocess.run(
            [sys.executable, "-m", "vllm_kvmm.bench.perf_gpu", "--child", json.dumps(cfg)],
            capture_output=True, text=True,
        )  # fmt: skip
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(json.dumps(dict(config=cfg["name"], error=(proc.stdout + proc.stderr)[-3000:])), flush=True)
            continue
        res = json.loads(line[7:])
        results.append(res)
        print(json.dumps(res), flush=True)
    van = next((r for r in results if r["config"] == "vanilla"), None)
    if van:
        print("\n| config | decode tok/s | vs vanilla | prefill s (all requests) | batch-1 ms/tok |")
        print("|---|---|---|---|---|")
        for r in results:
            ratio = r["decode_tok_s"] / van["decode_tok_s"]
            cells = [r["config"], r["decode_tok_s"], f"{ratio:.2f}x", r["prefill_s"], r["bs1_ms_per_tok"]]
            print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
