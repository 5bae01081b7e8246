"""Multimodal quality of every policy on the embedded VLM (docs/vlm.md): vLLM path, dense reference as oracle.

Held-out easy-VQA tasks (:mod:`vllm_kvmm.vlm.data`, ``test`` split only; design choices are made on the
``val`` split by :mod:`vllm_kvmm.bench.sweep`): the needle among ``N`` images and lookup of image ``k``, in
contexts of 16 and 24 images (order, find-all and counting are available with ``--tasks``).
Each prompt is answered by greedy decoding (its answer's length + the end token) with
the cache compressed by a policy at budget ρ right after prefill, through

* ``vllm``: one vLLM engine, the policy chosen per request (``extra_args``); and
* ``dense``: the Hugging Face reference (:class:`~vllm_kvmm.reference.DenseReference`) with the paged
  layout of the vLLM path.

The ``primary`` engine answers every prompt, the other a fixed subset (every ``k``-th prompt,
``oracle_prompts`` of them): the oracle of the vLLM integration, measured on the benchmark's own prompts.

Reported per policy, budget and task: ``accuracy`` (exact match) with its 95 % Wilson interval, ``agree``
(the share of the subset's prompts whose greedy tokens are identical on both paths) and ``kv``: the
prompt KV actually kept, as the vLLM engine reports it per request (``kv_transfer_params``; the dense
reference's own measure where vLLM did not run), so policies are compared at matched measured memory.
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

__all__ = ["DEFAULT_PLAN", "VLMQualityRow", "answer_text", "plan_examples", "run_vlm_quality", "table"]


# (task family, images per prompt, contexts): 320 prompts of 16 and 24 images (~1.1k and ~1.7k tokens).
# Chosen on the val split (bench.sweep, docs/results/meda_sweep_val.json, 16 prompts a group): a group is
# kept where the full cache answers >= 85 % (needle@16 100 %, lookup@16 94 %, needle@24 88 %) and weighted
# toward those where policies differ (needle: H2O 62 % at ρ 0.1); left out where the model itself is weak,
# since what the model cannot do cannot measure a policy: find_all 0 %, count 50 %, order@16 75 %,
# lookup@24 75 % (all available with ``--tasks``).
DEFAULT_PLAN: tuple[tuple[str, int, int], ...] = (
    ("needle", 16, 16),
    ("lookup", 16, 8),
    ("needle", 24, 16),
)
ORACLE_PROMPTS = 64  # the second engine's fixed subset (every k-th prompt of the plan)


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
    kv: float | None = None  # mean fraction of prompt KV kept (vLLM's report, else dense), over the prompts
    lo: float | None = None  # 95 % Wilson interval of the accuracy
    hi: float | None = None


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


def answer_text(tok: Any, ids: Sequence[int]) -> str:
    """The answer a greedy token sequence gives: decoded up to the end token, stripped, lower case."""
    ids = list(ids)
    if tok.eos_token_id in ids:
        ids = ids[: ids.index(tok.eos_token_id)]
    return tok.decode(ids, skip_special_tokens=True).strip().lower()


def oracle_subset(count: int, k: int | None) -> list[int]:
    """Indices of the oracle's prompts: ``k`` spread evenly over ``count`` (all if ``k`` is None)."""
    if k is None or k >= count:
        return list(range(count))
    return sorted({(i * count) // k for i in range(k)})


def run_vlm_quality(
    model: Path,
    policies: Sequence[str],
    budgets: Sequence[float],
    plan: Sequence[tuple[str, int, int]] = DEFAULT_PLAN,
    engines: Sequence[str] = ("dense", "vllm"),
    primary: str = "vllm",
    oracle_prompts: int | None = ORACLE_PROMPTS,
    device: str = "cpu",
    out: Path | None = None,
    log: Any = print,
) -> list[VLMQualityRow]:
    """Accuracy, measured KV and dense/vLLM agreement per (policy, budget, task group); writes JSON + PNG.

    ``primary`` (``vllm`` or ``dense``) answers every prompt; the other engine, if in ``engines``, the
    fixed subset of ``oracle_prompts`` prompts. The dense reference prefills each prompt once for all its
    cases (:meth:`~vllm_kvmm.reference.DenseReference.generate_variants`): on a CPU it is the cheaper
    primary, and the subset's identical tokens carry its results to the served path.
    """
    from transformers import AutoProcessor

    from vllm_kvmm.bench.sweep import answer_tokens

    if primary not in engines:
        raise ValueError(f"the primary engine {primary!r} is not among the engines {list(engines)}")
    cases = yardstick_cases(policies, budgets)
    for name, b in cases:
        build_policy(name, b)  # a bad name or budget fails before any model loads
    proc = AutoProcessor.from_pretrained(model)
    tok = proc.tokenizer
    examples = plan_examples(plan)
    gen = [answer_tokens(tok, ex.question.answer) for _, ex in examples]
    subset = oracle_subset(len(examples), oracle_prompts)
    wanted = {e: (list(range(len(examples))) if e == primary else subset) for e in engines}
    # Every finished prompt of every (engine, policy, budget) is kept next to ``out``: an interrupted run
    # resumes, and a later run with more policies or budgets computes only the new cases.
    cache = CaseCache(
        None if out is None else out.with_suffix(".cases.json"),
        dict(model=str(model), plan=[list(p) for p in plan], gen_tokens="answer+1", device=device),
    )
    if "vllm" in engines and (todo := _missing(cache, "vllm", cases, wanted["vllm"])):
        _vllm_tokens(model, proc, todo, examples, wanted["vllm"], gen, device, log, cache)
    if "dense" in engines and (todo := _missing(cache, "dense", cases, wanted["dense"])):
        _dense_tokens(model, proc, todo, examples, wanted["dense"], gen, device, log, cache)
    results = {(e, n, b): _by_index(cache.get(e, n, b)) for e in engines for n, b in cases}
    rows = _rows(tok, cases, examples, engines, primary, results)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(
            model=str(model), split="test", plan=[list(p) for p in plan], gen_tokens="answer+1",
            block=BLOCK, primary=primary, oracle_subset=subset,
        )  # fmt: skip
        out.write_text(json.dumps(dict(meta=meta, rows=[asdict(r) for r in rows]), indent=1) + "\n")
        plot(rows, out.with_suffix(".png"))
    log(table(rows))
    return rows


def _missing(
    cache: CaseCache, engine: str, cases: list[tuple[str, float]], indices: list[int]
) -> list[tuple[str, float]]:
    """The cases ``engine`` has not answered every prompt of ``indices`` for."""
    need = {str(i) for i in indices}
    return [c for c in cases if not cache.has(engine, *c) or not need <= set(cache.get(engine, *c)["tokens"])]


def _dense_tokens(
    model: Path,
    proc: Any,
    cases: list[tuple[str, float]],
    examples: list[tuple[str, data.Example]],
    indices: list[int],
    gen: list[int],
    device: str,
    log: Any,
    cache: CaseCache,
) -> None:
    """The dense reference, one prefill per prompt for all ``cases``; the cache is updated per prompt."""
    import torch

    from vllm_kvmm.reference import DenseReference, prompt_from_messages

    ref = DenseReference(model, dtype=torch.float32 if device == "cpu" else torch.bfloat16, device=device)
    policies = [build_policy(n, b) for n, b in cases]
    store = {c: cache.get("dense", *c) if cache.has("dense", *c) else {"tokens": {}, "kv": {}} for c in cases}
    for j, i in enumerate(indices):
        if all(str(i) in store[c]["tokens"] for c in cases):
            continue
        t0 = time.perf_counter()
        ex = examples[i][1]
        prompt = prompt_from_messages(proc, ex.messages(), ex.context.images())
        outs = ref.generate_variants(prompt, policies, gen[i], BLOCK, stop_at_eos=True)
        for c, o in zip(cases, outs, strict=True):
            store[c]["tokens"][str(i)] = o.token_ids
            store[c]["kv"][str(i)] = o.kv_fraction
        cache.put_many("dense", store)
        log(f"dense [{j + 1}/{len(indices)}] {len(cases)} cases in {time.perf_counter() - t0:.1f} s")


def _by_index(case: dict[str, Any]) -> dict[int, tuple[list[int], float | None]]:
    """``{prompt index: (tokens, kv kept)}`` of a cached case."""
    kv = case.get("kv") or {}
    return {int(i): (t, kv.get(i)) for i, t in case["tokens"].items()}


def _rows(
    tok: Any,
    cases: list[tuple[str, float]],
    examples: list[tuple[str, data.Example]],
    engines: Sequence[str],
    primary: str,
    results: dict[tuple[str, str, float], dict[int, tuple[list[int], float | None]]],
) -> list[VLMQualityRow]:
    from vllm_kvmm.bench.sweep import wilson

    groups = list(dict.fromkeys(g for g, _ in examples))
    rows = []
    for name, budget in cases:
        for engine in engines:
            got = results[engine, name, budget]
            other = results.get(("vllm" if engine == "dense" else "dense", name, budget))
            kv_of = results[primary, name, budget]  # measured on every prompt
            for group in [*groups, "all"]:
                idx = [i for i, (g, _) in enumerate(examples) if group in (g, "all") and i in got]
                right = sum(answer_text(tok, got[i][0]) == examples[i][1].question.answer for i in idx)
                both = [i for i in idx if other is not None and i in other]
                agree = sum(got[i][0] == other[i][0] for i in both) / len(both) if both else None
                kvs = [kv_of[i][1] for i in idx if i in kv_of and kv_of[i][1] is not None]
                task, _, n = group.partition("@")
                lo, hi = wilson(right, len(idx))
                rows.append(
                    VLMQualityRow(
                        name, budget, task, int(n or 0), engine, right / max(1, len(idx)), agree, len(idx),
                        sum(kvs) / len(kvs) if kvs and len(kvs) == len(idx) else None, lo, hi,
                    )
                )  # fmt: skip
    return rows


def _vllm_tokens(
    model: Path,
    proc: Any,
    cases: list[tuple[str, float]],
    examples: list[tuple[str, data.Example]],
    indices: list[int],
    gen: list[int],
    device: str,
    log: Any,
    cache: CaseCache,
) -> None:
    """Every case through one engine: the policy is chosen per request (``extra_args``)."""
    from vllm import SamplingParams

    inputs = []
    for _, ex in (examples[i] for i in indices):
        im = ex.context.images()
        text = proc.apply_chat_template(ex.messages(), add_generation_prompt=True, tokenize=False)
        inputs.append({"prompt": text, "multi_modal_data": {"image": im if len(im) > 1 else im[0]}})
    most = max(examples[i][1].n_images for i in indices)
    max_len = 2048 + 64 * max(0, most - 16)
    with bench_engine(model, max_len, device, limit_mm_per_prompt={"image": most}) as llm:
        for name, budget in cases:
            t0 = time.perf_counter()
            sps = [
                SamplingParams(
                    max_tokens=g, temperature=0.0, detokenize=False, extra_args=request_args(name, budget)
                )
                for g in (gen[i] for i in indices)
            ]
            res = llm.generate(inputs, sps, use_tqdm=False)
            tokens = {str(i): list(r.outputs[0].token_ids) for i, r in zip(indices, res, strict=True)}
            kv = {str(i): _reported_kv(r) for i, r in zip(indices, res, strict=True)}
            cache.put("vllm", name, budget, {"tokens": tokens, "kv": kv})
            log(f"vllm {name} ρ={budget:g}: {len(inputs)} prompts in {time.perf_counter() - t0:.0f} s")


def _reported_kv(out: Any) -> float | None:
    """The prompt KV fraction the engine reports for one request (1.0 when it was not compressed)."""
    report = (out.kv_transfer_params or {}).get("kvmm")
    if report is None:
        return None
    if report["compressed"]:
        return float(report["kv_kept"])
    # Not compressed: the whole prompt is kept where nothing was to be evicted; otherwise the request
    # ended with its first token, before the step that would have compressed it (unknown).
    return 1.0 if report["policy"] == "full" or report["budget"] == 1.0 else None


def _primary(rows: list[VLMQualityRow]) -> str:
    """The engine that answered every prompt (the most prompts in the ``all`` rows)."""
    return max((r for r in rows if r.task == "all"), key=lambda r: (r.prompts, r.engine == "vllm")).engine


def table(rows: list[VLMQualityRow]) -> str:
    """Markdown: a line per policy and budget; measured KV, overall accuracy with its interval (primary
    engine: every prompt), accuracy per task group, and the other engine's accuracy and agreement on the
    oracle subset."""
    engines = sorted({r.engine for r in rows})
    main = _primary(rows)
    groups = [g for g in dict.fromkeys((r.task, r.n_images) for r in rows) if g[0] != "all"]
    head = ["policy", "ρ", "KV kept", "all (95% CI)", *[f"{t} N={n}" for t, n in groups]]
    other = next((e for e in engines if e != main), None)
    if other is not None:
        head += [f"{other} subset: accuracy", "dense = vLLM tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pick(name: str, budget: float, task: str, n: int, engine: str) -> VLMQualityRow:
        return next(
            r
            for r in rows
            if (r.policy, r.budget, r.task, r.n_images, r.engine) == (name, budget, task, n, engine)
        )

    for name, budget in dict.fromkeys((r.policy, r.budget) for r in rows):
        a = pick(name, budget, "all", 0, main)
        kv = "–" if a.kv is None else f"{100 * a.kv:.1f}%"
        ci = f"{100 * a.accuracy:.1f} [{100 * (a.lo or 0):.0f}, {100 * (a.hi or 0):.0f}]"
        cells = [
            name,
            f"{budget:g}",
            kv,
            ci,
            *[f"{100 * pick(name, budget, t, n, main).accuracy:.0f}" for t, n in groups],
        ]
        if other is not None:
            d = pick(name, budget, "all", 0, other)
            cells += [f"{100 * d.accuracy:.0f} ({d.prompts})", f"{100 * (d.agree or 0):.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n(accuracy %, {main} path; intervals: 95 % Wilson)"


def plot(rows: list[VLMQualityRow], path: Path) -> None:
    """Accuracy against the *measured* KV kept, one panel per task group (and all), one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engine = _primary(rows)
    groups = list(dict.fromkeys((r.task, r.n_images) for r in rows))
    groups = [g for g in groups if g[0] == "all"] + [g for g in groups if g[0] != "all"]
    cols = min(3, len(groups))
    nrows = -(-len(groups) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), sharey=True, squeeze=False)
    full = {(r.task, r.n_images): r.accuracy for r in rows if r.policy == "full" and r.engine == engine}
    for ax, (t, n) in zip(axes.flat, groups, strict=False):
        for name in dict.fromkeys(r.policy for r in rows if r.policy != "full"):
            pts = sorted(
                (r.kv if r.kv is not None else r.budget, r.accuracy, r.lo, r.hi)
                for r in rows
                if (r.policy, r.task, r.n_images, r.engine) == (name, t, n, engine)
            )
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            if t == "all":
                err = [[y - (p[2] or y) for y, p in zip(ys, pts, strict=True)],
                       [(p[3] or y) - y for y, p in zip(ys, pts, strict=True)]]  # fmt: skip
                ax.errorbar(xs, ys, yerr=err, marker="o", ms=3, capsize=2, label=name)
            else:
                ax.plot(xs, ys, marker="o", ms=3, label=name)
        if (t, n) in full:
            ax.axhline(full[t, n], color="k", ls="--", lw=1, label="full")
        ax.set_title("all tasks" if t == "all" else f"{t}, {n} images")
        ax.set_xscale("log")
        ax.set_xlabel("prompt KV kept (measured)")
        ax.set_ylim(0, 1.02)
    for ax in axes.flat[len(groups) :]:
        ax.axis("off")
    axes[0][0].set_ylabel(f"accuracy ({engine})")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
