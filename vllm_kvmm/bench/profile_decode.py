"""Where a request's time goes, vanilla vs a policy: its decode steps and its TTFT alone.

Runs the engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so one profile sees the scheduler, the
model runner and our hooks. Each configuration runs in its own subprocess (a clean GPU)::

    vllm-kvmm bench profile-decode --configs vanilla,full,snapkv --ctx 4096 --out out/profile

(``python -m vllm_kvmm.bench.profile_decode`` takes the same flags; ``--scale tiny`` runs it on a CPU.)
Prints, per configuration, the batch-1 ms/token and the TTFT alone; writes under ``--out``:

* ``NAME.txt``: the functions with the largest own and cumulative time during ``--steps`` decode steps
  (cProfile; the full dump in ``NAME.pstats``);
* ``NAME.prefill.txt``: one request alone to its second token under ``torch.profiler`` (the compression
  runs in the step after the prefill) — the operators and kernels by device time, with our stages as
  ranges (``kvmm.statistics``, ``kvmm.compression``), so the gap to vanilla is attributed;
* ``NAME.log``: the child's output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from vllm_kvmm.bench.archs import write_model
from vllm_kvmm.bench.child import add_child_flag, parse_config, report, run_child


def _child(cfg: dict) -> None:
    import cProfile
    import io
    import pstats
    import random

    import torch
    from vllm import LLM, SamplingParams

    cuda = torch.cuda.is_available()
    kw = dict(
        model=cfg["model"], load_format="dummy", skip_tokenizer_init=True, gpu_memory_utilization=0.85,
        max_model_len=cfg["ctx"] + cfg["steps"] + 64, enable_prefix_caching=False, max_num_seqs=64, seed=0,
    )  # fmt: skip
    if cfg["name"] == "vanilla-piecewise":  # vanilla in the CUDA-graph mode a policy runs in
        kw["compilation_config"] = {"cudagraph_mode": "PIECEWISE"}
    elif cfg["policy"]:
        import vllm_kvmm

        kw.update(vllm_kvmm.engine_args(cfg["policy"], cfg["budget"], cfg.get("groups")))
    llm = LLM(**kw)
    rng = random.Random(0)
    prompt = [{"prompt_token_ids": [rng.randrange(100, 30000) for _ in range(cfg["ctx"])]}]

    def run(out: int) -> float:
        sp = SamplingParams(max_tokens=out, ignore_eos=True, temperature=0.0, detokenize=False)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(prompt, sp, use_tqdm=False)
        if cuda:
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
    prof.dump_stats(out / f"{cfg['stem']}.pstats")
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(45)
    (out / f"{cfg['stem']}.txt").write_text(buf.getvalue())
    # Two tokens: the compression runs in the step after the prefill.
    (out / f"{cfg['stem']}.prefill.txt").write_text(_prefill_profile(lambda: run(2), cuda))
    ms = 1000 * (tt - tp) / cfg["steps"]
    report(dict(config=cfg["name"], bs1_ms_per_tok=round(ms, 3), ttft_alone_ms=round(1000 * tp, 1)))


def _prefill_profile(first_token: Callable[[], float], cuda: bool) -> str:
    """``torch.profiler`` tables of one request alone to its second token: prefill, statistics, then the
    compression (before the second token's step)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        seconds = first_token()
    table = prof.key_averages()
    by = "device_time_total" if cuda else "cpu_time_total"
    own = "self_device_time_total" if cuda else "self_cpu_time_total"
    return (
        f"one request alone to its second token: {1000 * seconds:.1f} ms (under the profiler)\n\n"
        f"## by total time ({by}; our stages are the kvmm.* ranges)\n"
        + table.table(sort_by=by, row_limit=40)
        + f"\n## by own time ({own})\n"
        + table.table(sort_by=own, row_limit=40)
    )


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The benchmark's flags (``vllm-kvmm bench profile-decode`` and ``python -m`` this module)."""
    p = p or argparse.ArgumentParser(
        prog="vllm-kvmm bench profile-decode",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--configs",
        default="vanilla,vanilla-piecewise,snapkv",
        help="comma-separated: vanilla, vanilla-piecewise (in a policy's CUDA-graph mode), or "
        "POLICY[@BUDGET][/GROUPS] (GROUPS: --kv-groups, e.g. snapkv/1: one KV-cache group)",
    )
    p.add_argument("--ctx", type=int, default=4096, help="prompt tokens")
    p.add_argument("--steps", type=int, default=128, help="decode steps timed and profiled")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--arch", default="llama2-7b-mha", help="llama2-7b-mha | qwen2-7b-gqa (dummy weights)")
    p.add_argument("--scale", default="full", help="full | tiny (tiny dimensions, for a CPU rehearsal)")
    p.add_argument("--model-root", default="out/models")
    p.add_argument("--out", default="out/profile", help="folder for the .pstats, .txt and .log files")
    add_child_flag(p)
    return p


def run(a: argparse.Namespace) -> int:
    """Run the benchmark parsed into ``a``; 1 if a configuration failed."""
    if a.child:
        _child(json.loads(a.child))
        return 0
    model = write_model(Path(a.model_root), a.arch, images=False, scale=a.scale).path
    failed = 0
    for name in a.configs.split(","):
        spec = parse_config(name)
        cfg = dict(
            name=name, stem=spec.stem, policy=spec.policy, groups=spec.groups, model=str(model),
            ctx=a.ctx, steps=a.steps, budget=a.budget if spec.budget is None else spec.budget, out=a.out,
        )  # fmt: skip
        res = run_child("vllm_kvmm.bench.profile_decode", cfg, tail=2000)
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"{spec.stem}.log").write_text(res.output)
        failed += res.result is None
        print(json.dumps(res.result if res.ok else dict(config=name, error=res.error)), flush=True)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vllm_kvmm.bench.profile_decode``: the same as ``vllm-kvmm bench profile-decode``."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
