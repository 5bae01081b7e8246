"""Where a decode step's time goes: batch-1 ms/token and a cProfile of the engine, vanilla vs a policy.

Runs the engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so one profile sees the scheduler, the
model runner and our hooks. Each configuration runs in its own subprocess (a clean GPU)::

    python -m vllm_kvmm.bench.profile_decode --configs vanilla,full,snapkv --ctx 4096 --out out/profile

Prints, per configuration, the batch-1 ms/token and the functions with the largest own time during
``--steps`` decode steps; writes the full ``pstats`` dumps under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from vllm_kvmm.bench.archs import write_model


def _child(cfg: dict) -> None:
    import cProfile
    import io
    import pstats
    import random

    import torch
    from vllm import LLM, SamplingParams

    kw = dict(
        model=cfg["model"], load_format="dummy", skip_tokenizer_init=True, gpu_memory_utilization=0.85,
        max_model_len=cfg["ctx"] + cfg["steps"] + 64, enable_prefix_caching=False, max_num_seqs=64, seed=0,
    )  # fmt: skip
    if cfg["name"] == "vanilla-piecewise":  # vanilla in the CUDA-graph mode a policy runs in
        kw["compilation_config"] = {"cudagraph_mode": "PIECEWISE"}
    elif cfg["policy"]:
        import vllm_kvmm

        kw.update(vllm_kvmm.engine_args(cfg["policy"], cfg["budget"]))
    llm = LLM(**kw)
    rng = random.Random(0)
    prompt = [{"prompt_token_ids": [rng.randrange(100, 30000) for _ in range(cfg["ctx"])]}]

    def run(out: int) -> float:
        sp = SamplingParams(max_tokens=out, ignore_eos=True, temperature=0.0, detokenize=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(prompt, sp, use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(8)
    tp, tt = run(1), run(cfg["steps"] + 1)
    prof = cProfile.Profile()
    prof.enable()
    run(cfg["steps"] + 1)
    prof.disable()
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    prof.dump_stats(out / f"{cfg['name']}.pstats")
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(45)
    (out / f"{cfg['name']}.txt").write_text(buf.getvalue())
    ms = 1000 * (tt - tp) / cfg["steps"]
    print("RESULT " + json.dumps(dict(config=cfg["name"], bs1_ms_per_tok=round(ms, 3))), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="vanilla,vanilla-piecewise,snapkv", help="names")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--arch", default="llama2-7b-mha")
    ap.add_argument("--model-root", default="out/models")
    ap.add_argument("--out", default="out/profile")
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        _child(json.loads(a.child))
        return
    model = write_model(Path(a.model_root), a.arch, images=False).path
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    for name in a.configs.split(","):
        cfg = dict(
            name=name, policy=None if name.startswith("vanilla") else name, model=str(model), ctx=a.ctx,
            steps=a.steps, budget=a.budget, out=a.out,
        )  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", "vllm_kvmm.bench.profile_decode", "--child", json.dumps(cfg)],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"{name}.log").write_text(proc.stdout + proc.stderr)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        print(line[7:] if line else json.dumps(dict(config=name, error=proc.stderr[-2000:])), flush=True)


if __name__ == "__main__":
    main()
