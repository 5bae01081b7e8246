"""Decode-heavy serving: long generations, vanilla vLLM vs decode-time eviction, side by side.

Each configuration runs in its own process on the same prompts: ``requests`` prompts of ``prompt``
tokens, each generating ``out`` tokens (story-generation shape: output ≫ prompt). Reported per
configuration: output tokens/s over the whole run, the KV blocks held (peak and mean over engine
steps, sampled from the scheduler's block pool), so the memory claim is measured, not derived, and the
seconds the worker spent compressing prompts and flushing (device time on a GPU; the engine runs in this
process, so its worker is readable).

    vllm-kvmm bench decode                       # SmolLM2 (real weights) on this machine
    vllm-kvmm bench decode --model DIR --dtype bfloat16 --prompt 1024 --out 4096   # GPU

(``python -m vllm_kvmm.bench.decode`` takes the same flags.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from vllm_kvmm.bench.child import add_child_flag, report, run_child


def _child(cfg: dict) -> None:
    from vllm import LLM, SamplingParams

    import vllm_kvmm
    from vllm_kvmm.vllm_ext.worker import worker_state

    kw: dict = dict(
        model=cfg["model"], dtype=cfg["dtype"], max_model_len=cfg["prompt"] + cfg["out"] + 16, seed=0,
        enforce_eager=cfg["eager"], enable_prefix_caching=False, block_size=16,
        load_format=cfg.get("load_format", "auto"),
    )  # fmt: skip
    if kw["load_format"] == "dummy":  # a speed-benchmark folder (bench/archs.py): no weights, no tokenizer
        kw["skip_tokenizer_init"] = True
    if cfg["policy"]:
        kw.update(vllm_kvmm.engine_args(cfg["policy"], cfg["budget"], **cfg["config"]))
    llm = LLM(**kw)
    engine = llm.llm_engine
    pool = engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    total_blocks = pool.num_gpu_blocks - 1
    groups = len(engine.engine_core.engine_core.scheduler.kv_cache_config.kv_cache_groups)
    params = SamplingParams(max_tokens=cfg["out"], temperature=0.0, ignore_eos=True, detokenize=False)
    for i in range(cfg["requests"]):
        ids = [(37 * i + 11 * j) % 20000 + 100 for j in range(cfg["prompt"])]
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
    held, steps, produced = [], 0, 0
    c0 = worker_state().seconds_total
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                produced += len(o.outputs[0].token_ids)
        steps += 1
        held.append(total_blocks - pool.get_num_free_blocks())
    dt = time.perf_counter() - t0
    compress_s = worker_state().seconds_total - c0
    # Blocks of different configurations hold different bytes (one layer's page per block under a policy,
    # every layer's in vanilla's single group): report layer-pages so they compare.
    per_block = 1 if groups > 1 else cfg["layers"]
    res = dict(
        config=cfg["name"], tokens_per_s=round(produced / dt, 1), seconds=round(dt, 1), steps=steps,
        peak_layer_pages=max(held) * per_block, mean_layer_pages=round(sum(held) / len(held) * per_block, 1),
        compress_s=round(compress_s, 2),
    )  # fmt: skip
    report(res)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The benchmark's flags (``vllm-kvmm bench decode`` and ``python -m vllm_kvmm.bench.decode``)."""
    p = p or argparse.ArgumentParser(
        prog="vllm-kvmm bench decode",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens per request")
    p.add_argument("--out", type=int, default=768, help="output tokens per request")
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--interval", type=int, default=16, help="decode tokens between flushes")
    p.add_argument("--eager", action="store_true", default=True)
    p.add_argument("--graphs", dest="eager", action="store_false", help="CUDA graphs (GPU)")
    p.add_argument(
        "--load-format", default="auto", help="'dummy' for a speed-benchmark folder (random weights, GPU)"
    )
    add_child_flag(p)
    return p


def run(a: argparse.Namespace) -> int:
    """Run the benchmark parsed into ``a``; 1 if a configuration failed."""
    if a.child:
        _child(json.loads(a.child))
        return 0
    from transformers import AutoConfig

    from vllm_kvmm.models.smollm2 import ensure_smollm2

    model = a.model or str(ensure_smollm2())
    layers = AutoConfig.from_pretrained(model).get_text_config().num_hidden_layers
    base = dict(model=model, dtype=a.dtype, requests=a.requests, prompt=a.prompt, out=a.out, eager=a.eager,
                budget=a.budget, layers=layers, load_format=a.load_format)  # fmt: skip
    dec = {"decode_interval": a.interval}
    configs = [
        dict(base, name="vanilla", policy=None, config={}),
        dict(base, name=f"h2o@{a.budget:g}+decode", policy="h2o", config=dec),
        dict(base, name=f"streamingllm@{a.budget:g}+decode", policy="streamingllm", config=dec),
        dict(base, name="hae+recycle-bin", policy="hae", budget=None,
             config={**dec, "decode_budget": a.budget, "bin_size": 64}),
    ]  # fmt: skip
    rows, failed = [], 0
    for cfg in configs:
        res = run_child("vllm_kvmm.bench.decode", cfg, env={"VLLM_CPU_KVCACHE_SPACE": "2"}, tail=3000)
        if res.result is None:
            failed += 1
            print(f"{cfg['name']}: failed\n{res.error}", flush=True)
            continue
        rows.append(res.result)
        print(json.dumps(rows[-1]), flush=True)
    van = next((r for r in rows if r["config"] == "vanilla"), None)
    if van:
        print(
            "\n| config | output tok/s | vs vanilla | peak KV (layer pages) | mean KV (layer pages) "
            "| compressing + flushing (s of the run) |"
        )
        print("|---|---|---|---|---|---|")
        for r in rows:
            cells = [r["config"], r["tokens_per_s"], f"{r['tokens_per_s'] / van['tokens_per_s']:.2f}x",
                     r["peak_layer_pages"], r["mean_layer_pages"],
                     f"{r['compress_s']} of {r['seconds']}"]  # fmt: skip
            print("| " + " | ".join(str(c) for c in cells) + " |")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vllm_kvmm.bench.decode``: the same as ``vllm-kvmm bench decode``."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
