"""Fixed costs of the extension vs vanilla vLLM, side by side (any device; CPU by default).

A 32-layer tiny random Llama (one KV-cache group per layer under a policy), each configuration in its own
process, best of three:

* decode: one 1,000-token request, 128 greedy tokens; per-token time = (t(129 tokens) − t(1 token)) / 128.
  On a small model the step is mostly fixed cost, which is what this isolates: metadata for 32 groups,
  the compact view, the statistics hooks.
* TTFT alone: one request of ``--ttft-tokens`` prompt tokens (a different prompt each time: no prefix-cache
  hit) to its first token — prefill and the statistics; ``second_ms``: from the first token to the second,
  which waits for the compression (it runs in the step after the prefill); ``compress_ms`` is the
  compression step alone (the worker's timer: device time on a GPU).

    vllm-kvmm bench overhead            # vanilla, full, snapkv@0.25, meda@0.25

(``python -m vllm_kvmm.bench.overhead`` takes the same flags.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from vllm_kvmm.bench.child import add_child_flag, parse_config, report, run_child


def _child(cfg: dict) -> None:
    from vllm import LLM, SamplingParams

    from vllm_kvmm.vllm_ext.worker.state import worker_state

    kw: dict = dict(
        model=cfg["model"], enforce_eager=True, dtype="float32", max_model_len=4096, block_size=16, seed=0
    )
    if cfg["policy"]:
        from vllm_kvmm.bench.cases import engine_args

        kw.update(engine_args(cfg["policy"], cfg["budget"], cfg.get("groups")))  # or a bench label (h2o-s4)
    llm = LLM(**kw)
    prompt = [{"prompt_token_ids": list(range(100, 1100))}]

    def run(n: int) -> float:
        t = time.perf_counter()
        llm.generate(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t

    run(4)
    best = min((run(129) - run(1)) / 128 for _ in range(3))

    worker, engine = worker_state(), llm.llm_engine

    def two_tokens(k: int) -> tuple[float, float, float]:
        """Seconds to the first token, from it to the second, and the worker's (compression) seconds."""
        ids = [100 + (7 * i + k) % 5000 for i in range(cfg["ttft_tokens"])]
        sp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, detokenize=False)
        c = worker.seconds_total
        t = time.perf_counter()
        engine.add_request(f"ttft-{k}", {"prompt_token_ids": ids}, sp)
        stamps = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                stamps += [time.perf_counter()] * (len(out.outputs[0].token_ids) - len(stamps))
        return stamps[0] - t, stamps[1] - stamps[0], worker.seconds_total - c

    two_tokens(0)
    ttft, second, compress = min(two_tokens(k) for k in range(1, 4))
    report({"ms_per_token": round(1000 * best, 3), "ttft_ms": round(1000 * ttft, 1),
            "second_ms": round(1000 * second, 1), "compress_ms": round(1000 * compress, 1)})  # fmt: skip


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The benchmark's flags (``vllm-kvmm bench overhead`` and ``python -m vllm_kvmm.bench.overhead``)."""
    p = p or argparse.ArgumentParser(
        prog="vllm-kvmm bench overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--configs",
        default="vanilla,full,snapkv@0.25,meda@0.25",
        help="comma-separated: vanilla (no plugin) or POLICY[@BUDGET][/GROUPS] (GROUPS: --kv-groups; POLICY "
        "may be a bench label such as h2o-s4)",
    )
    p.add_argument("--ttft-tokens", type=int, default=3000, help="prompt tokens of the TTFT-alone request")
    add_child_flag(p)
    return p


def run(a: argparse.Namespace) -> int:
    """Run the benchmark parsed into ``a``; 1 if a configuration failed."""
    if a.child:
        _child(json.loads(a.child))
        return 0
    from vllm_kvmm.models import build_tiny_llama, load_smollm2_tokenizer

    home = Path(os.environ.get("VLLM_KVMM_HOME", Path.home() / ".cache" / "vllm-kvmm"))
    model = build_tiny_llama(
        home / "bench" / "tiny-llama-32", num_layers=32, seed=0, tokenizer=load_smollm2_tokenizer()
    )
    rows, failed = [], 0
    for cfg in a.configs.split(","):
        spec = parse_config(cfg)
        child = dict(model=str(model), policy=spec.policy, budget=spec.budget, groups=spec.groups,
                     ttft_tokens=a.ttft_tokens)  # fmt: skip
        res = run_child("vllm_kvmm.bench.overhead", child, env={"VLLM_CPU_KVCACHE_SPACE": "2"}, tail=2000)
        if res.result is None:
            failed += 1
            print(f"{cfg}: failed\n{res.error}")
            continue
        rows.append((cfg, res.result))
        print(f"{cfg}: {res.result}", flush=True)
    base = dict(rows).get("vanilla")
    if base:
        print(
            f"\n| config | decode ms/token | vs vanilla | TTFT alone, {a.ttft_tokens} tokens (ms) "
            "| vs vanilla | second token (ms) | vs vanilla | compression (ms) |\n" + "|---" * 8 + "|"
        )
        for cfg, r in rows:
            print(
                f"| {cfg} | {r['ms_per_token']} | {r['ms_per_token'] / base['ms_per_token']:.3f}x "
                f"| {r['ttft_ms']} | {r['ttft_ms'] / base['ttft_ms']:.3f}x "
                f"| {r['second_ms']} | {r['second_ms'] / base['second_ms']:.3f}x | {r['compress_ms']} |"
            )
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vllm_kvmm.bench.overhead``: the same as ``vllm-kvmm bench overhead``."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
