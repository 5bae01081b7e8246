"""``vllm-kvmm bench perf``: vanilla vLLM, the ideal and KV policies serving one workload, in one run.

Configurations, each in its own subprocess (a clean device) on the same prompts:

* ``vanilla``: vLLM without the plugin, full prompts;
* ``ideal``: vanilla on prompts cut to ρ·N tokens (text only) — the same decode work a policy with budget
  ρ leaves, with no compression cost: the ceiling of what compression can buy;
* each policy at budget ρ, full prompts.

Measured per configuration (engine in-process, stepped by the benchmark, so it can read the block pool):

* ``decode_tok_s``: N·OUT / (t(prompt + OUT + 1 tokens) − t(prompt + 1 token)), as in the vanilla anchors
  (the compression runs in the step after a prompt's prefill, so it counts here, not in the prefill);
* ``ttft_p50/p99_s``, ``tpot_p50/p99_ms`` over the N requests of the full run (all arrive at once, so TTFT
  includes queueing for prefill), and ``ttft1_ms`` (one request alone: prefill and statistics);
* ``bs1_ms_per_tok``: one request decoding alone (its compression included);
* ``kv_peak_gib`` / ``kv_mean_gib``: KV bytes held in the block pool (peak / mean over engine steps);
* ``kv_per_request_mib``: what one request holds after its prompt is compressed; ``max_concurrency``: how many
  such requests the pool holds (the capacity at fixed memory); ``peak_running``: concurrency observed;
* ``compression_s_per_request``: worker time spent compressing in the full run (device time on a GPU:
  worker/timing.py), per request.

    vllm-kvmm bench perf --arch llama2-7b-mha --ctx 8192 --requests 48 --budget 0.2 --policies snapkv,meda
    vllm-kvmm bench perf --images 8 ...   # LLaVA-shaped prompts: 8 × 576 image tokens in each prompt

Writes ``--json`` (all rows and the command) and a PNG next to it (needs matplotlib; the GPU image may lack
it: then ``vllm-kvmm bench perf --plot-only FILE.json`` draws it elsewhere).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from vllm_kvmm.bench.archs import write_model
from vllm_kvmm.bench.child import add_child_flag, machine, report, run_child

__all__ = ["main", "plot"]

_GIB = 2**30


def _prompts(cfg: dict[str, Any], n: int, plen: int, images: int) -> list[dict[str, Any]]:
    """``n`` random token-id prompts of ``plen`` tokens (after image expansion), ``images`` images each."""
    rng = random.Random(0)
    out = []
    img_tokens = cfg["image_tokens"] * images
    for _ in range(n):
        text = [rng.randrange(100, 30000) for _ in range(plen - img_tokens)]
        if not images:
            out.append({"prompt_token_ids": text})
            continue
        from PIL import Image

        # One placeholder per image (the processor expands it), spread evenly through the text.
        ids, step = [], len(text) // (images + 1)
        for k in range(images):
            ids += [*text[k * step : (k + 1) * step], cfg["image_token_id"]]
        ids += text[images * step :]
        pics = [
            Image.frombytes("RGB", (64, 64), bytes(rng.randrange(256) for _ in range(64 * 64 * 3)))
            for _ in range(images)
        ]
        out.append({"prompt_token_ids": ids, "multi_modal_data": {"image": pics}})
    return out


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _child(cfg: dict[str, Any]) -> None:
    import torch
    from vllm import LLM, SamplingParams

    cuda = torch.cuda.is_available()
    images = cfg["images"] if cfg["kind"] != "ideal" else 0
    kw: dict[str, Any] = dict(
        model=cfg["model"], load_format="dummy", enable_prefix_caching=False, seed=0, max_num_seqs=256,
        max_model_len=cfg["ctx"] + cfg["out"] + 64, skip_tokenizer_init=cfg["image_token_id"] is None,
        block_size=16,  # every configuration alike (a policy sets 16; the CPU build's default is 128)
    )  # fmt: skip
    if cfg["images"]:
        kw["limit_mm_per_prompt"] = {"image": cfg["images"]}
    if cuda:
        kw["gpu_memory_utilization"] = cfg["gpu_util"]
    else:
        kw.update(enforce_eager=True, dtype="float32")
    if cfg["kind"] == "policy":
        from vllm_kvmm.bench.cases import engine_args

        kw.update(engine_args(cfg["policy"], cfg["budget"]))  # a policy or a bench label (meda-exact)
    llm = LLM(**kw)
    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    pool = core.scheduler.kv_cache_manager.block_pool
    groups = core.scheduler.kv_cache_config.kv_cache_groups
    total_blocks = pool.num_gpu_blocks - 1  # block 0 is the null block
    g0 = groups[0]
    block_bytes = g0.kv_cache_spec.page_size_bytes * len(g0.layer_names)
    held: list[int] = []
    running: list[int] = []
    counter = iter(range(10**9))

    def timed(prompts: list[dict[str, Any]], out: int, sample: bool = False) -> tuple[float, dict, dict]:
        sp = SamplingParams(max_tokens=out, ignore_eos=True, temperature=0.0, detokenize=False)
        for p in prompts:
            engine.add_request(f"r{next(counter)}", p, sp)
        if cuda:
            torch.cuda.synchronize()
        first: dict[str, float] = {}
        done: dict[str, float] = {}
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.perf_counter() - t0
            for o in outs:
                if o.outputs and o.outputs[0].token_ids and o.request_id not in first:
                    first[o.request_id] = now
                if o.finished:
                    done[o.request_id] = now
            if sample:
                held.append(total_blocks - pool.get_num_free_blocks())
                running.append(len(core.scheduler.running))
        return time.perf_counter() - t0, first, done

    from vllm_kvmm.vllm_ext.worker import worker_state

    plen = int(cfg["ctx"] * cfg["budget"]) if cfg["kind"] == "ideal" else cfg["ctx"]
    prompts = _prompts(cfg, cfg["n"], plen, images)
    # Warm-up at the run's batch size (kernels, graphs and allocator see the shapes before timing).
    timed(_prompts(cfg, cfg["n"], min(plen, 256 + cfg["image_tokens"] * images), images), 4)
    tp, _, _ = timed(prompts, 1)  # ends with the first tokens: nothing is compressed
    c0 = worker_state().seconds_total
    tt, first, done = timed(prompts, cfg["out"] + 1, sample=True)
    comp = worker_state().seconds_total - c0
    ttft = list(first.values())
    tpot = [1000 * (done[r] - first[r]) / cfg["out"] for r in done]
    # One request alone: TTFT, ms per decode token, and what it holds once compressed.
    t1p, _, _ = timed(prompts[:1], 1)
    held_before = len(held)
    t1, _, _ = timed(prompts[:1], cfg["out"] + 1, sample=True)
    alone = held[held_before:]
    per_request = max(alone[1:] or alone)  # after the step after the prefill, which compressed the prompt
    res = dict(
        config=cfg["name"], kind=cfg["kind"], policy=cfg.get("policy"), ctx=plen, n=cfg["n"], out=cfg["out"],
        images=images, prefill_s=round(tp, 3), total_s=round(tt, 3),
        decode_tok_s=round(cfg["n"] * cfg["out"] / max(tt - tp, 1e-9), 1),
        ttft_p50_s=round(_percentile(ttft, 0.5), 3), ttft_p99_s=round(_percentile(ttft, 0.99), 3),
        tpot_p50_ms=round(_percentile(tpot, 0.5), 3), tpot_p99_ms=round(_percentile(tpot, 0.99), 3),
        ttft1_ms=round(1000 * t1p, 2), bs1_ms_per_tok=round(1000 * (t1 - t1p) / cfg["out"], 3),
        kv_pool_gib=round(total_blocks * block_bytes / _GIB, 3),
        kv_peak_gib=round(max(held) * block_bytes / _GIB, 3),
        kv_mean_gib=round(statistics.fmean(held) * block_bytes / _GIB, 3),
        kv_per_request_mib=round(per_request * block_bytes / 2**20, 2),
        max_concurrency=total_blocks // max(per_request, 1), peak_running=max(running),
        compression_s_per_request=round(comp / cfg["n"], 4), kv_groups=len(groups),
    )  # fmt: skip
    report(res)


def _configs(a: argparse.Namespace, model: Any) -> list[dict[str, Any]]:
    base = dict(
        model=str(model.path), image_token_id=model.image_token_id, image_tokens=model.image_tokens,
        images=a.images, ctx=a.ctx, out=a.out, n=a.requests, budget=a.budget, gpu_util=a.gpu_util,
    )  # fmt: skip
    configs = [dict(base, name="vanilla", kind="vanilla")]
    if not a.no_ideal:
        configs.append(dict(base, name=f"ideal@{a.budget:g}", kind="ideal"))
    for p in filter(None, a.policies.split(",")):
        configs.append(dict(base, name=f"{p}@{a.budget:g}", kind="policy", policy=p))
    return configs


def _table(rows: list[dict[str, Any]]) -> str:
    van = next((r for r in rows if r["kind"] == "vanilla"), None)
    ideal = next((r for r in rows if r["kind"] == "ideal"), None)
    head = (
        "| config | decode tok/s | vs vanilla | vs ideal | TTFT p50 / p99 s | TPOT p50 / p99 ms | "
        "batch-1 ms/tok | TTFT alone ms | KV peak GiB | KV / request MiB | max concurrency | "
        "compression s / request |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        vs_v = f"{r['decode_tok_s'] / van['decode_tok_s']:.2f}x" if van else "-"
        vs_i = f"{r['decode_tok_s'] / ideal['decode_tok_s']:.2f}x" if ideal else "-"
        cells = [
            r["config"], r["decode_tok_s"], vs_v, vs_i, f"{r['ttft_p50_s']} / {r['ttft_p99_s']}",
            f"{r['tpot_p50_ms']} / {r['tpot_p99_ms']}", r["bs1_ms_per_tok"], r["ttft1_ms"], r["kv_peak_gib"],
            r["kv_per_request_mib"], r["max_concurrency"], r["compression_s_per_request"],
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot(json_path: Path, png_path: Path) -> bool:
    """Bar charts (decode tok/s, TTFT p50, KV per request) from a result file; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    data = json.loads(Path(json_path).read_text())
    rows = data["rows"]
    names = [r["config"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [
        ("decode_tok_s", "decode tokens/s (N requests)"),
        ("ttft_p50_s", "TTFT p50 (s, all arrive at once)"),
        ("kv_per_request_mib", "KV held per request (MiB)"),
    ]
    for ax, (key, title) in zip(axes, panels, strict=True):
        colours = ["tab:blue" if r["kind"] == "policy" else "gray" for r in rows]
        ax.bar(names, [r[key] for r in rows], color=colours)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    args = data["args"]
    fig.suptitle(f"{args['arch']}{' + images' if args['images'] else ''}, {args['ctx']}-token prompts, "
                 f"{args['requests']} requests, {args['out']} output tokens — {data['machine']}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    return True


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="vllm-kvmm bench perf", description=__doc__)
    p.add_argument("--arch", default="llama2-7b-mha", help="llama2-7b-mha | qwen2-7b-gqa")
    p.add_argument("--scale", default="full", help="full | tiny (tiny dimensions, for CPU tests)")
    p.add_argument("--images", type=int, default=0, help="images per prompt (LLaVA-wrapped model)")
    p.add_argument("--ctx", type=int, default=8192, help="prompt tokens, image tokens included")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--out", type=int, default=256, help="output tokens per request")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--policies", default="snapkv,meda", help="policies or bench labels (e.g. meda-exact)")
    p.add_argument("--no-ideal", action="store_true")
    p.add_argument("--gpu-util", type=float, default=0.9)
    p.add_argument("--config-timeout", type=float, default=1800, help="seconds one configuration may take")
    p.add_argument("--model-root", default="out/models")
    p.add_argument("--json", default="out/perf.json")
    p.add_argument("--plot-only", default=None, help="draw the PNG of an existing result file and exit")
    add_child_flag(p)
    return p


def run(a: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run the benchmark parsed into ``a``; ``argv`` (the flags after ``bench perf``) is recorded."""
    if a.child:
        _child(json.loads(a.child))
        return 0
    if a.plot_only:
        png = Path(a.plot_only).with_suffix(".png")
        ok = plot(Path(a.plot_only), png)
        print(f"wrote {png}" if ok else "matplotlib is not installed")
        return 0 if ok else 1
    model = write_model(Path(a.model_root), a.arch, images=a.images > 0, scale=a.scale)
    rows = []
    from tqdm import tqdm

    failed: list[dict[str, str]] = []
    for cfg in tqdm(_configs(a, model), desc="configurations", disable=None):
        res = run_child("vllm_kvmm.bench.perf", cfg, timeout=a.config_timeout)
        if res.result is None:
            failed.append(dict(config=cfg["name"], error=str(res.error)))
            if res.returncode is None:  # timed out: the error is one line
                print(json.dumps(failed[-1]), flush=True)
            else:
                print(f"{cfg['name']}: failed\n{res.error}", flush=True)
            continue
        rows.append(res.result)
        print(json.dumps(rows[-1]), flush=True)
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Flags only: the `vllm-kvmm bench` front end also leaves its handler (``func``) in the namespace.
    args = {k: v for k, v in vars(a).items() if k not in ("child", "plot_only") and not callable(v)}
    if argv is None:  # the flags after `bench perf` (or after the module, for python -m)
        argv = sys.argv[sys.argv.index("perf") + 1 :] if "perf" in sys.argv else sys.argv[1:]
    flags = argv
    command = "vllm-kvmm bench perf " + " ".join(shlex.quote(x) for x in flags)
    result = dict(command=command, machine=machine(), args=args, rows=rows, failed=failed)
    out.write_text(json.dumps(result, indent=1))
    print("\n" + _table(rows))
    png = out.with_suffix(".png")
    print(f"wrote {out}" + (f" and {png}" if plot(out, png) else " (no matplotlib: no PNG)"))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m vllm_kvmm.bench.perf``: the same as ``vllm-kvmm bench perf``."""
    return run(build_parser().parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
