"""Accumulated attention from sampled query rows against every row: kept sets and answers (VLM prompts).

H2O and LOOK-M score a token by the attention every prompt query gives it, the most expensive statistic
(every query against every key). ``score_step = s`` estimates it from the queries at positions
``0, s, 2s, …``, scaled by ``s`` (``ops/stats.py``), at ~``1/s`` of the cost. This benchmark prefills each
prompt once per step through the dense reference (:meth:`~vllm_kvmm.reference.DenseReference.
generate_variants`: the policies of one step share a prefill), compresses to vLLM's paged layout and
decodes the answer greedily, and reports per policy, step and ρ:

* ``recall``: the share of the tokens every-row scoring selects (per layer and KV head, the compressible
  prefix; the recent tail is kept either way) that the sampled scores select too — mean and worst prompt;
* ``same answer``: the share of prompts whose answer equals the every-row answer;
* ``accuracy`` with its 95 % Wilson interval, and the KV kept.

    vllm-kvmm bench score-sample --split val --out docs/results/score_sample_val.json

(``python -m vllm_kvmm.bench.score_sample`` takes the same flags.) The statistics' cost per step is
``vllm-kvmm bench stats`` / ``bench overhead`` with the labels ``h2o-s4`` … (``bench/cases.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["prefix_recall", "run_score_sample", "summarise"]

STEPS = (1, 2, 4, 8)
POLICIES = ("h2o", "lookm")
PLAN = "needle:16:2,lookup:16:1,needle:24:2"


def prefix_recall(plans: Sequence[Any], exact: Sequence[Any]) -> float:
    """Share of ``exact``'s selected prefix tokens (all layers and KV heads) that ``plans`` select too.

    ``plans`` / ``exact``: one :class:`~vllm_kvmm.policies.LayerPlan` per layer of one prompt (1.0 when
    every-row scoring selects nothing: no prefix to choose from)."""
    import torch

    hit = total = 0
    for got, ref in zip(plans, exact, strict=True):
        for g, r in zip(got.keep[:, : got.prefix_keep], ref.keep[:, : ref.prefix_keep], strict=True):
            total += r.numel()
            hit += int(torch.isin(r, g).sum())
    return hit / total if total else 1.0


def run_score_sample(
    model: Path,
    plan: Sequence[tuple[str, int, int]],
    split: str,
    budgets: Sequence[float],
    steps: Sequence[int] = STEPS,
    policies: Sequence[str] = POLICIES,
    log: Any = print,
) -> dict[str, Any]:
    import torch
    from transformers import AutoProcessor

    from vllm_kvmm.bench.cases import BLOCK
    from vllm_kvmm.bench.quality_vlm import answer_text, plan_examples
    from vllm_kvmm.bench.sweep import answer_tokens
    from vllm_kvmm.policies import make_policy
    from vllm_kvmm.reference import DenseReference, prompt_from_messages

    if steps[0] != 1:
        raise ValueError("the first step must be 1 (every row)")
    keys = [(p, s, b) for p in policies for s in steps for b in budgets]
    variants = [make_policy("full")] + [make_policy(p, b, {"score_step": s}) for p, s, b in keys]
    proc = AutoProcessor.from_pretrained(model)
    ref = DenseReference(model, dtype=torch.float32)
    prompts: list[dict[str, Any]] = []
    for i, (group, ex) in enumerate(plan_examples(plan, split=split)):
        t0 = time.perf_counter()
        prompt = prompt_from_messages(proc, ex.messages(), ex.context.images())
        full, *outs = ref.generate_variants(
            prompt, variants, answer_tokens(proc.tokenizer, ex.question.answer), BLOCK, stop_at_eos=True
        )
        by = dict(zip(keys, outs, strict=True))
        results = {}
        for (p, s, b), out in by.items():
            exact = by[(p, steps[0], b)]
            results[f"{p}/s{s}@{b:g}"] = dict(
                answer=answer_text(proc.tokenizer, out.token_ids),
                same=out.token_ids == exact.token_ids,
                recall=prefix_recall(out.plans, exact.plans),
                kv=round(out.kv_fraction, 5),
            )
        prompts.append(dict(index=i, group=group, tokens=prompt.num_tokens, answer=ex.question.answer,
                            full=answer_text(proc.tokenizer, full.token_ids), results=results))  # fmt: skip
        log(f"[{i + 1}] {group}: {prompt.num_tokens} tokens, {time.perf_counter() - t0:.1f} s")
    return dict(split=split, plan=[list(p) for p in plan], budgets=list(budgets), steps=list(steps),
                policies=list(policies), summary=summarise(prompts), prompts=prompts)  # fmt: skip


def summarise(prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant (``policy/sS@ρ``), over prompts: recall mean / min, same answer, accuracy, KV kept."""
    from vllm_kvmm.bench.sweep import wilson

    rows = []
    full_right = sum(p["full"] == p["answer"] for p in prompts)
    for name in prompts[0]["results"] if prompts else []:
        per = [p["results"][name] for p in prompts]
        right = sum(r["answer"] == p["answer"] for r, p in zip(per, prompts, strict=True))
        lo, hi = wilson(right, len(per))
        policy, _, rest = name.partition("/s")
        step, _, budget = rest.partition("@")
        rows.append(dict(
            policy=policy, step=int(step), budget=float(budget), prompts=len(per),
            recall_mean=statistics.fmean(r["recall"] for r in per), recall_min=min(r["recall"] for r in per),
            same_answer=sum(r["same"] for r in per) / len(per), accuracy=right / len(per), lo=lo, hi=hi,
            kv=statistics.fmean(r["kv"] for r in per), full_accuracy=full_right / len(per),
        ))  # fmt: skip
    return rows


def table(summary: list[dict[str, Any]]) -> str:
    head = ["policy", "ρ", "score_step", "prefix recall, mean / worst", "same answer", "accuracy (95% CI)",
            "KV kept"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(summary, key=lambda r: (r["policy"], -r["budget"], r["step"])):
        lines.append("| " + " | ".join([
            r["policy"], f"{r['budget']:g}", str(r["step"]),
            f"{100 * r['recall_mean']:.1f}% / {100 * r['recall_min']:.1f}%", f"{100 * r['same_answer']:.1f}%",
            f"{100 * r['accuracy']:.1f} [{100 * r['lo']:.0f}, {100 * r['hi']:.0f}]", f"{100 * r['kv']:.1f}%",
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The benchmark's flags (``vllm-kvmm bench score-sample`` and ``python -m``)."""
    p = p or argparse.ArgumentParser(
        prog="vllm-kvmm bench score-sample",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="vlm", help="'vlm' (the embedded VLM) or a model folder")
    p.add_argument("--tasks", default=PLAN, help="task:images:contexts,...")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--budgets", default="0.1,0.05")
    p.add_argument("--steps", default=",".join(map(str, STEPS)), help="score steps; the first must be 1")
    p.add_argument("--policies", default=",".join(POLICIES), help="policies with accumulated scores")
    p.add_argument("--out", default="out/score_sample.json")
    return p


def run(a: argparse.Namespace) -> int:
    from vllm_kvmm.bench.quality_vlm import parse_plan
    from vllm_kvmm.vlm.assemble import ensure_vlm

    result = run_score_sample(
        ensure_vlm() if a.model == "vlm" else Path(a.model),
        parse_plan(a.tasks),
        a.split,
        [float(x) for x in a.budgets.split(",")],
        [int(x) for x in a.steps.split(",")],
        [x for x in a.policies.split(",") if x],
    )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result["summary"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(run(build_parser().parse_args()))
