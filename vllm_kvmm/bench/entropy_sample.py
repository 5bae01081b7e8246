"""MEDA's layer entropies from sampled query rows against the exact ones, on the VLM's prompts.

MEDA's budgets come from the mean row entropies of each layer's cross-modal maps, which cost every query
against every key. ``entropy_step = s`` estimates the means from the queries at positions ``0, s, 2s, …``
(``ops/stats.py``) at ``1/s`` of the cost. This benchmark prefills each prompt once through the dense
reference, collects the exact entropies and every sampled estimate from the same queries and keys
(:meth:`~vllm_kvmm.reference.DenseReference.collect_stats`), and reports per step:

* the cost of the statistics relative to the exact ones (CPU seconds, same prefill);
* the layer entropies' error and how well they rank the layers (Spearman against the exact);
* the layer budgets ``meda`` derives from them at each ρ: the share of kept token-layers that move
  (``Σ_l |b_l − b*_l| / Σ_l b*_l``) and the largest move of one layer, in tokens. The row ``uniform``
  is the scale: how far the exact allocation itself is from equal budgets (what the entropies decide).

    vllm-kvmm bench entropy-sample --split val --out docs/results/entropy_sample_val.json

(``python -m vllm_kvmm.bench.entropy_sample`` takes the same flags.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["compare", "run_compare"]

STEPS = (1, 2, 4, 8, 16, 32)


def _ranks(x: Sequence[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    for rank, i in enumerate(order):
        r[i] = float(rank)
    return r


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Rank correlation (ties broken by position; 1.0 for fewer than two layers)."""
    if len(a) < 2:
        return 1.0
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else 1.0


def compare(stats: list[list[Any]], info: Any, budgets: Sequence[float], steps: Sequence[int]) -> dict:
    """Per step (``stats[i]`` collected with ``steps[i]``; ``steps[0]`` must be 1): entropy error,
    rank correlation and budget moves against the exact statistics, per ρ."""
    from vllm_kvmm.policies import make_policy

    if steps[0] != 1:
        raise ValueError("the first step must be 1 (the exact entropies)")
    entropies = make_policy("meda", budgets[0])  # layer_entropies does not depend on the budget
    exact_e = entropies.layer_entropies(stats[0]).tolist()
    out: dict[str, Any] = {}
    for step, st in zip(steps, stats, strict=True):
        e = entropies.layer_entropies(st).tolist()
        row: dict[str, Any] = {
            "max_abs_entropy_error": max(abs(x - y) for x, y in zip(e, exact_e, strict=True)),
            "spearman": spearman(e, exact_e),
        }
        for rho in budgets:
            policy = make_policy("meda", rho)
            ref = policy.layer_budgets(stats[0], info)
            got = policy.layer_budgets(st, info)
            moved = sum(abs(x - y) for x, y in zip(got, ref, strict=True))
            row[f"moved@{rho:g}"] = moved / max(1, sum(ref))
            row[f"max_layer_move@{rho:g}"] = max(abs(x - y) for x, y in zip(got, ref, strict=True))
        out[str(step)] = row
    uniform: dict[str, Any] = {}
    for rho in budgets:
        ref = make_policy("meda", rho).layer_budgets(stats[0], info)
        got = make_policy("meda", rho, {"allocation": "uniform"}).layer_budgets(stats[0], info)
        uniform[f"moved@{rho:g}"] = sum(abs(x - y) for x, y in zip(got, ref, strict=True)) / max(1, sum(ref))
        uniform[f"max_layer_move@{rho:g}"] = max(abs(x - y) for x, y in zip(got, ref, strict=True))
    out["uniform"] = uniform
    return out


def run_compare(
    model: Path,
    plan: Sequence[tuple[str, int, int]],
    split: str,
    budgets: Sequence[float],
    steps: Sequence[int] = STEPS,
    log: Any = print,
) -> dict[str, Any]:
    import torch
    from transformers import AutoProcessor

    from vllm_kvmm.bench.quality_vlm import plan_examples
    from vllm_kvmm.ops import StatsRequest
    from vllm_kvmm.policies import PromptInfo
    from vllm_kvmm.reference import DenseReference, prompt_from_messages

    proc = AutoProcessor.from_pretrained(model)
    ref = DenseReference(model, dtype=torch.float32)
    requests = [StatsRequest(cross_entropy=True, entropy_step=s) for s in steps]
    prompts: list[dict[str, Any]] = []
    for i, (group, ex) in enumerate(plan_examples(plan, split=split)):
        t0 = time.perf_counter()
        prompt = prompt_from_messages(proc, ex.messages(), ex.context.images())
        stats, seconds = ref.collect_stats(prompt, requests)
        vision = prompt.vision_mask.bool().cpu()
        info = PromptInfo(prompt.num_tokens, vision, ref.num_layers, ref.num_kv_heads)
        rows = compare(stats, info, budgets, steps)
        for s, sec in zip(steps, seconds, strict=True):
            rows[str(s)]["seconds"] = sec
        prompts.append(dict(index=i, group=group, tokens=prompt.num_tokens,
                            vision=int(info.vision_mask.sum()), steps=rows))  # fmt: skip
        log(f"[{i + 1}] {group}: {prompt.num_tokens} tokens, {time.perf_counter() - t0:.1f} s")
    return dict(split=split, plan=[list(p) for p in plan], budgets=list(budgets), steps=list(steps),
                summary=summarise(prompts, budgets, steps), prompts=prompts)  # fmt: skip


def summarise(prompts: list[dict[str, Any]], budgets: Sequence[float], steps: Sequence[int]) -> list[dict]:
    """Per step, over prompts: cost vs exact, mean / worst entropy error and Spearman, budget moves."""
    rows = []
    exact = [p["steps"][str(steps[0])]["seconds"] for p in prompts]
    for s in [*steps, "uniform"]:
        per = [p["steps"][str(s)] for p in prompts]
        row: dict[str, Any] = dict(step=s)
        if s != "uniform":
            row.update(
                cost_vs_exact=sum(x["seconds"] for x in per) / max(1e-12, sum(exact)),
                max_abs_entropy_error=max(x["max_abs_entropy_error"] for x in per),
                spearman_mean=statistics.fmean(x["spearman"] for x in per),
                spearman_min=min(x["spearman"] for x in per),
            )
        for rho in budgets:
            row[f"moved_mean@{rho:g}"] = statistics.fmean(x[f"moved@{rho:g}"] for x in per)
            row[f"moved_max@{rho:g}"] = max(x[f"moved@{rho:g}"] for x in per)
            row[f"max_layer_move@{rho:g}"] = max(x[f"max_layer_move@{rho:g}"] for x in per)
        rows.append(row)
    return rows


def table(summary: list[dict], budgets: Sequence[float]) -> str:
    head = ["step", "statistics cost vs exact", "max |ΔE| (nats)", "Spearman mean / min"]
    head += [f"ρ {b:g}: token-layers moved, mean / max; worst layer (tokens)" for b in budgets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        if r["step"] == "uniform":
            cells = ["uniform budgets (the scale)", "—", "—", "—"]
        else:
            cells = [str(r["step"]), f"{r['cost_vs_exact']:.2f}×", f"{r['max_abs_entropy_error']:.4f}",
                     f"{r['spearman_mean']:.3f} / {r['spearman_min']:.3f}"]  # fmt: skip
        for b in budgets:
            cells.append(
                f"{100 * r[f'moved_mean@{b:g}']:.2f}% / {100 * r[f'moved_max@{b:g}']:.2f}%; "
                f"{r[f'max_layer_move@{b:g}']}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The benchmark's flags (``vllm-kvmm bench entropy-sample`` and ``python -m``)."""
    p = p or argparse.ArgumentParser(
        prog="vllm-kvmm bench entropy-sample",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="vlm", help="'vlm' (the embedded VLM) or a model folder")
    p.add_argument("--tasks", default=None, help="task:images:contexts,... (default: the sweep's plan)")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--budgets", default="0.2,0.1,0.05")
    p.add_argument("--steps", default=",".join(map(str, STEPS)), help="row steps; the first must be 1")
    p.add_argument("--out", default="out/entropy_sample.json")
    return p


def run(a: argparse.Namespace) -> int:
    from vllm_kvmm.bench.quality_vlm import parse_plan
    from vllm_kvmm.bench.sweep import DEFAULT_PLAN
    from vllm_kvmm.vlm.assemble import ensure_vlm

    budgets = [float(x) for x in a.budgets.split(",")]
    result = run_compare(
        ensure_vlm() if a.model == "vlm" else Path(a.model),
        parse_plan(a.tasks) if a.tasks else DEFAULT_PLAN,
        a.split,
        budgets,
        [int(x) for x in a.steps.split(",")],
    )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result["summary"], budgets))
    return 0


if __name__ == "__main__":
    raise SystemExit(run(build_parser().parse_args()))
