"""Multimodal quality of every policy on the embedded VLM (docs/vlm.md): dense reference and vLLM path.

Held-out easy-VQA tasks (:mod:`vllm_kvmm.vlm.data`, ``test`` split only): single-image questions, the
needle among ``N`` images, lookup of image ``k``, counting and frame order. Each prompt is answered by
greedy decoding with the cache compressed by a policy at budget ρ right after prefill, through

* ``dense``: the Hugging Face reference (:class:`~vllm_kvmm.reference.DenseReference`) with the paged
  layout of the vLLM path (block granularity), and
* ``vllm``: one vLLM engine, the policy chosen per request (``extra_args``).

Reported per policy, budget and task: ``accuracy`` (exact match of the answer), ``agree``: the share of
prompts whose greedy tokens are identical on both paths (the oracle of the vLLM integration, measured on
the benchmark's own prompts), and ``kv``: the prompt KV actually kept, measured by the dense reference
(text-prior policies keep every text token, so their real budget exceeds ρ: ALGORITHMS.md §10).
``vllm-kvmm bench quality --model vlm`` (docs/benchmarks.md has the command and the tables).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vllm_kvmm.bench.cases import (
    BLOCK,
    CaseCache,
    bench_engine,
    build_policy,
    request_args,
    yardstick_cases,
)
from vllm_kvmm.vlm import data

__all__ = ["DEFAULT_PLAN", "VLMQualityRow", "plan_examples", "run_vlm_quality", "table"]


# (task family, images per prompt, contexts): 34 prompts, up to 16 images (~1.2k tokens) each.
DEFAULT_PLAN: tuple[tuple[str, int, int], ...] = (
    ("single", 1, 1),
    ("needle", 16, 1),
    ("lookup", 8, 1),
    ("count", 8, 1),
    ("order", 8, 1),
)


@dataclass
class VLMQualityRow:
    policy: str
    budget: float
    task: str
    n_images: int
    engine: str
    accuracy: float
    agree: float | None
    prompts: int
    kv: float | None = None  # mean fraction of prompt KV kept (dense reference), over the group's prompts


def parse_plan(text: str) -> list[tuple[str, int, int]]:
    """``"needle:16:2,single:1:4"`` → ``[("needle", 16, 2), ("single", 1, 4)]`` (task:images:contexts)."""
    out = []
    for item in text.split(","):
        task, n, c = item.split(":")
        if task not in ("single", "needle", "lookup", "count", "order", "find_all"):
            raise ValueError(f"unknown task {task!r} in --tasks")
        out.append((task, int(n), int(c)))
    return out


def plan_examples(
    plan: Sequence[tuple[str, int, int]], split: str = "test"
) -> list[tuple[str, data.Example]]:
    """``(group, example)`` of every prompt of the plan on ``split``; ``group`` is ``"<family>@<N>"``."""
    out = []
    for family, n, count in plan:
        for ex in data.examples(data.eval_contexts(family, n, count, split=split)):
            out.append((f"{family}@{n}", ex))
    return out


def _answer(tok: Any, ids: Sequence[int]) -> str:
    ids = list(ids)
    if tok.eos_token_id in ids:
        ids = ids[: ids.index(tok.eos_token_id)]
    return tok.decode(ids, skip_special_tokens=True).strip().lower()


def run_vlm_quality(
    model: Path,
    policies: Sequence[str],
    budgets: Sequence[float],
    plan: Sequence[tuple[str, int, int]] = DEFAULT_PLAN,
    engines: Sequence[str] = ("dense", "vllm"),
    gen_tokens: int = 4,  # the longest answer ("rectangle", "12") is ≤ 3 tokens + <|im_end|>
    device: str = "cpu",
    out: Path | None = None,
    log: Any = print,
) -> list[VLMQualityRow]:
    """Accuracy and dense/vLLM agreement for every (policy, budget, task group); writes JSON + PNG."""
    from transformers import AutoProcessor

    from vllm_kvmm.reference import prompt_from_messages

    cases = yardstick_cases(policies, budgets)
    for name, b in cases:
        build_policy(name, b)  # a bad name or budget fails before any model loads
    proc = AutoProcessor.from_pretrained(model)
    tok = proc.tokenizer
    examples = plan_examples(plan)
    images = [ex.context.images() for _, ex in examples]
    # Every finished (engine, policy, budget) is kept next to ``out``: an interrupted run resumes, and a
    # later run with more policies or budgets computes only the new cases.
    cache = CaseCache(
        None if out is None else out.with_suffix(".cases.json"),
        dict(model=str(model), plan=[list(p) for p in plan], gen_tokens=gen_tokens, device=device),
    )
    if "vllm" in engines and (todo := cache.missing("vllm", cases)):
        _vllm_tokens(model, proc, todo, examples, images, gen_tokens, device, log, cache)
    if "dense" in engines and (todo := cache.missing("dense", cases)):
        import torch

        from vllm_kvmm.reference import DenseReference

        ref = DenseReference(model, dtype=torch.float32 if device == "cpu" else torch.bfloat16, device=device)
        refs = [
            prompt_from_messages(proc, ex.messages(), im)
            for (_, ex), im in zip(examples, images, strict=True)
        ]
        for name, budget in todo:
            t0 = time.perf_counter()
            policy = build_policy(name, budget)
            outs = [
                ref.generate([r], policy, gen_tokens, granularity=BLOCK, stop_at_eos=True)[0] for r in refs
            ]
            cache.put(
                "dense",
                name,
                budget,
                {"tokens": [o.token_ids for o in outs], "kv": [o.kv_fraction for o in outs]},
            )
            log(f"dense {name} ρ={budget:g}: {len(refs)} prompts in {time.perf_counter() - t0:.0f} s")
    tokens = {(e, n, b): cache.get(e, n, b)["tokens"] for e in engines for n, b in cases}
    kv = {(n, b): cache.get("dense", n, b)["kv"] for n, b in cases if "dense" in engines}
    rows = _rows(tok, cases, examples, engines, tokens, kv)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(
            model=str(model), split="test", plan=[list(p) for p in plan], gen_tokens=gen_tokens, block=BLOCK
        )
        out.write_text(json.dumps(dict(meta=meta, rows=[asdict(r) for r in rows]), indent=1) + "\n")
        plot(rows, out.with_suffix(".png"))
    log(table(rows))
    return rows


def _rows(
    tok: Any,
    cases: list[tuple[str, float]],
    examples: list[tuple[str, data.Example]],
    engines: Sequence[str],
    tokens: dict[tuple[str, str, float], list[list[int]]],
    kv: dict[tuple[str, float], list[float]],
) -> list[VLMQualityRow]:
    groups = list(dict.fromkeys(g for g, _ in examples))
    rows = []
    for name, budget in cases:
        for engine in engines:
            got = tokens[engine, name, budget]
            other = tokens.get(("vllm" if engine == "dense" else "dense", name, budget))
            for group in [*groups, "all"]:
                idx = [i for i, (g, _) in enumerate(examples) if group in (g, "all")]
                right = sum(_answer(tok, got[i]) == examples[i][1].question.answer for i in idx)
                agree = None if other is None else sum(got[i] == other[i] for i in idx) / len(idx)
                task, _, n = group.partition("@")
                frac = kv.get((name, budget))
                rows.append(
                    VLMQualityRow(
                        name,
                        budget,
                        task,
                        int(n or 0),
                        engine,
                        right / len(idx),
                        agree,
                        len(idx),
                        None if frac is None else sum(frac[i] for i in idx) / len(idx),
                    )
                )
    return rows


def _vllm_tokens(
    model: Path,
    proc: Any,
    cases: list[tuple[str, float]],
    examples: list[tuple[str, data.Example]],
    images: list[list[Any]],
    gen_tokens: int,
    device: str,
    log: Any,
    cache: CaseCache,
) -> None:
    """Every case through one engine: the policy is chosen per request (``extra_args``)."""
    from vllm import SamplingParams

    inputs = []
    for (_, ex), im in zip(examples, images, strict=True):
        text = proc.apply_chat_template(ex.messages(), add_generation_prompt=True, tokenize=False)
        inputs.append({"prompt": text, "multi_modal_data": {"image": im if len(im) > 1 else im[0]}})
    most = max(len(im) for im in images)
    max_len = 2048 + 64 * max(0, most - 16)
    with bench_engine(model, max_len, device, limit_mm_per_prompt={"image": most}) as llm:
        for name, budget in cases:
            t0 = time.perf_counter()
            sp = SamplingParams(
                max_tokens=gen_tokens, temperature=0.0, detokenize=False,
                extra_args=request_args(name, budget),
            )  # fmt: skip
            res = llm.generate(inputs, sp, use_tqdm=False)
            cache.put(
                "vllm", name, budget, {"tokens": [list(r.outputs[0].token_ids) for r in res], "kv": None}
            )
            log(f"vllm {name} ρ={budget:g}: {len(inputs)} prompts in {time.perf_counter() - t0:.0f} s")


def table(rows: list[VLMQualityRow]) -> str:
    """Markdown: one line per policy and budget; accuracy per task group (dense / vLLM) and agreement."""
    engines = sorted({r.engine for r in rows})
    groups = list(dict.fromkeys((r.task, r.n_images) for r in rows))
    head = ["policy", "ρ"] + [("all" if t == "all" else f"{t} N={n}") for t, n in groups]
    if len(engines) > 1:
        head.append("dense = vLLM tokens")
    has_kv = any(r.kv is not None for r in rows)
    if has_kv:
        head.insert(2, "KV kept")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, budget in dict.fromkeys((r.policy, r.budget) for r in rows):
        cells = [name, f"{budget:g}"]
        if has_kv:
            a = next(
                r for r in rows if (r.policy, r.budget, r.task) == (name, budget, "all") and r.kv is not None
            )
            cells.append(f"{100 * (a.kv or 0):.0f}%")
        for t, n in groups:
            accs = [
                next(
                    r
                    for r in rows
                    if (r.policy, r.budget, r.task, r.n_images, r.engine) == (name, budget, t, n, e)
                )
                for e in engines
            ]
            cells.append(" / ".join(f"{100 * r.accuracy:.0f}" for r in accs))
        if len(engines) > 1:
            a = next(
                r for r in rows if (r.policy, r.budget, r.task, r.engine) == (name, budget, "all", "dense")
            )
            cells.append(f"{100 * (a.agree or 0):.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    note = "(cells: " + " / ".join(engines) + " accuracy, %)" if len(engines) > 1 else "(accuracy, %)"
    return "\n".join(lines) + "\n" + note


def plot(rows: list[VLMQualityRow], path: Path) -> None:
    """Accuracy against budget, one panel per task group, one line per policy (vLLM path when present)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engine = "vllm" if any(r.engine == "vllm" for r in rows) else "dense"
    groups = list(dict.fromkeys((r.task, r.n_images) for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.2), sharey=True, squeeze=False)
    full = {(r.task, r.n_images): r.accuracy for r in rows if r.policy == "full" and r.engine == engine}
    for ax, (t, n) in zip(axes[0], groups, strict=True):
        for name in dict.fromkeys(r.policy for r in rows if r.policy != "full"):
            pts = sorted(
                (r.budget, r.accuracy)
                for r in rows
                if (r.policy, r.task, r.n_images, r.engine) == (name, t, n, engine)
            )
            ax.plot([b for b, _ in pts], [a for _, a in pts], marker="o", label=name)
        if (t, n) in full:
            ax.axhline(full[t, n], color="k", ls="--", lw=1, label="full")
        ax.set_title("all tasks" if t == "all" else f"{t}, {n} image{'s' if n > 1 else ''}")
        ax.set_xlabel("budget ρ")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel(f"accuracy ({engine})")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
