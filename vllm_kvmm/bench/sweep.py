"""Design sweep on the VLM's validation split: policy variants side by side, one prefill per prompt.

Every design choice and hyper-parameter of the default ``meda`` is made here, on the ``val`` split (the
package's train images with ``id % 10 == 0``, never trained on, disjoint from the ``test`` images the
reported tables use). Each prompt is prefilled once through the dense reference with the union of the
variants' statistics (:meth:`~vllm_kvmm.reference.DenseReference.generate_variants`), then every variant
compresses to vLLM's paged layout (block 16) and decodes its answer greedily.

    python -m vllm_kvmm.bench.sweep --out docs/results/meda_sweep_val.json

Results are appended per prompt to ``<out>.jsonl`` (an interrupted sweep resumes); ``<out>`` holds the
summary: accuracy (with a 95 % Wilson interval) and measured KV per variant, budget and task group.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_kvmm.bench.cases import BLOCK

__all__ = ["GRID", "answer_tokens", "run_sweep", "summarise", "wilson"]

# label → (registered policy, config fields). Ablations of the default change one thing each.
GRID: dict[str, tuple[str, dict[str, Any]]] = {
    "snapkv": ("snapkv", {}),
    "pyramidkv": ("pyramidkv", {}),
    "h2o": ("h2o", {}),
    "streamingllm": ("streamingllm", {}),
    "lookm": ("lookm", {}),
    "hae": ("hae", {}),
    "meda-paper": ("meda-paper", {}),
    "meda-released": ("meda-released", {}),
    "meda": ("meda", {}),
    "meda/softmax": ("meda", {"allocation": "softmax"}),
    "meda/uniform": ("meda", {"allocation": "uniform"}),
    "meda/t0.5": ("meda", {"temperature": 0.5}),
    "meda/t2": ("meda", {"temperature": 2.0}),
    "meda/floor0": ("meda", {"floor": 0.0}),
    "meda/floor0.25": ("meda", {"floor": 0.25}),
    "meda/accumulated": ("meda", {"scoring": "accumulated", "recent_fraction": 0.5}),
    "meda/merge": ("meda", {"merge": "average"}),
    "meda/no-sinks": ("meda", {"sink_tokens": 0}),
    "meda/no-prior": ("meda", {"text_prior": "none"}),
}

# (task family, images per prompt, contexts): the 112 validation prompts of docs/results/meda_sweep_val.*
DEFAULT_PLAN: tuple[tuple[str, int, int], ...] = (
    ("needle", 16, 2),
    ("lookup", 16, 2),
    ("find_all", 16, 4),
    ("count", 16, 4),
    ("order", 16, 4),
    ("needle", 24, 2),
    ("lookup", 24, 2),
)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``k / n``."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def answer_tokens(tok: Any, answer: str) -> int:
    """Greedy tokens to generate for ``answer``: its tokens and the end-of-turn token."""
    return len(tok(answer, add_special_tokens=False)["input_ids"]) + 1


def run_sweep(
    model: Path,
    labels: Sequence[str],
    budgets: Sequence[float],
    plan: Sequence[tuple[str, int, int]] = DEFAULT_PLAN,
    split: str = "val",
    out: Path | None = None,
    log: Any = print,
) -> list[dict[str, Any]]:
    """Per prompt and variant: the greedy answer, whether it is right, and the KV kept; resumable."""
    import torch
    from transformers import AutoProcessor

    from vllm_kvmm.bench.quality_vlm import answer_text, plan_examples
    from vllm_kvmm.policies import make_policy
    from vllm_kvmm.reference import DenseReference, prompt_from_messages

    policies = [make_policy("full", 1.0)]
    names = ["full@1"]
    for label in labels:
        name, config = GRID[label]
        for b in budgets:
            policies.append(make_policy(name, b, config))
            names.append(f"{label}@{b:g}")
    proc = AutoProcessor.from_pretrained(model)
    tok = proc.tokenizer
    examples = plan_examples(plan, split=split)
    done: dict[int, dict[str, Any]] = {}
    log_path = None if out is None else out.with_suffix(".jsonl")
    if log_path is not None and log_path.is_file():
        for line in log_path.read_text().splitlines():
            rec = json.loads(line)
            done[rec["index"]] = rec
    ref = DenseReference(model, dtype=torch.float32)
    for i, (group, ex) in enumerate(examples):
        if i in done and set(names) <= set(done[i]["results"]):
            continue
        t0 = time.perf_counter()
        prompt = prompt_from_messages(proc, ex.messages(), ex.context.images())
        outs = ref.generate_variants(
            prompt, policies, answer_tokens(tok, ex.question.answer), BLOCK, stop_at_eos=True
        )
        results = {
            n: {"answer": answer_text(tok, o.token_ids), "kv": round(o.kv_fraction, 5)}
            for n, o in zip(names, outs, strict=True)
        }
        rec = {"index": i, "group": group, "answer": ex.question.answer, "results": results}
        done[i] = rec
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        log(f"[{i + 1}/{len(examples)}] {group}: {time.perf_counter() - t0:.1f} s")
    records = [done[i] for i in range(len(examples))]
    summary = summarise(records, names)
    if out is not None:
        meta = dict(model=str(model), split=split, plan=[list(p) for p in plan], block=BLOCK, grid=GRID)
        out.write_text(json.dumps(dict(meta=meta, rows=summary), indent=1) + "\n")
    log(table(summary))
    return summary


def summarise(records: list[dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """Accuracy (Wilson 95 %) and mean KV kept per variant and group, plus ``all``."""
    groups = list(dict.fromkeys(r["group"] for r in records))
    rows = []
    for name in names:
        for group in [*groups, "all"]:
            sel = [r for r in records if group in (r["group"], "all") and name in r["results"]]
            k = sum(r["results"][name]["answer"] == r["answer"] for r in sel)
            lo, hi = wilson(k, len(sel))
            kv = sum(r["results"][name]["kv"] for r in sel) / max(1, len(sel))
            label, _, budget = name.rpartition("@")
            rows.append(
                dict(variant=label, budget=float(budget), group=group, right=k, prompts=len(sel),
                     accuracy=k / max(1, len(sel)), lo=lo, hi=hi, kv=kv)
            )  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: a line per variant and budget; accuracy per group, the overall interval and KV kept."""
    groups = [g for g in dict.fromkeys(r["group"] for r in rows) if g != "all"]
    head = ["variant", "ρ", "KV kept", "all (95% CI)", *groups]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, b in dict.fromkeys((r["variant"], r["budget"]) for r in rows):
        by = {r["group"]: r for r in rows if (r["variant"], r["budget"]) == (v, b)}
        a = by["all"]
        cells = [v, f"{b:g}", f"{100 * a['kv']:.1f}%",
                 f"{100 * a['accuracy']:.1f} [{100 * a['lo']:.0f}, {100 * a['hi']:.0f}]"]  # fmt: skip
        cells += [f"{100 * by[g]['accuracy']:.0f}" for g in groups]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser(p: argparse.ArgumentParser) -> None:
    """The sweep's flags (``vllm-kvmm bench sweep`` and ``python -m vllm_kvmm.bench.sweep``)."""
    p.add_argument("--model", default="vlm", help="'vlm' (the embedded VLM) or a model folder")
    p.add_argument("--variants", default=",".join(GRID), help=f"comma-separated, from: {', '.join(GRID)}")
    p.add_argument("--budgets", default="0.1,0.05")
    p.add_argument("--tasks", default=None, help="task:images:contexts,... (default: DEFAULT_PLAN)")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--out", default="out/sweep_val.json")


def run(a: argparse.Namespace) -> int:
    from vllm_kvmm.bench.quality_vlm import parse_plan
    from vllm_kvmm.vlm.assemble import ensure_vlm

    labels = [x for x in a.variants.split(",") if x]
    if unknown := [x for x in labels if x not in GRID]:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(GRID)}")
    run_sweep(
        ensure_vlm() if a.model == "vlm" else Path(a.model),
        labels,
        [float(x) for x in a.budgets.split(",")],
        parse_plan(a.tasks) if a.tasks else DEFAULT_PLAN,
        a.split,
        Path(a.out),
    )
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    build_parser(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
