"""Text quality of every policy on SmolLM2 (real weights), through the dense reference and through vLLM.

For each segment of the embedded long texts (:func:`vllm_kvmm.data.long_texts`: the GPL-3, the Python
Language Reference and IDLE's manual, ``segments`` windows of each): the first ``prompt_tokens`` tokens
are the prompt (compressed by the policy right after prefill), the next ``cont_tokens`` the continuation.
Per policy, budget and path
(``dense``: the Hugging Face reference; ``vllm``: vLLM's paged cache, the policy chosen per request):

* ``ppl`` and ``dppl_pct``: perplexity of the true continuation (teacher forcing) and its change vs the
  full cache on the same path. Through vLLM the continuation is forced by :class:`~.forcing.ForceTokens`
  and read from vLLM's raw log-probabilities;
* ``top1``: how often the next-token argmax equals the full cache's, same true prefix;
* ``greedy``: share of the ``gen_tokens`` greedy tokens equal to the full cache's, position by position;
* ``kv``: measured share of prompt KV kept (dense reference; the vLLM layout is the same, block 16);
* ``agree_top1`` / ``agree_greedy`` / ``max_dlogp``: the oracle between the paths — share of positions
  whose argmax is the same on both, share of segments whose greedy tokens are identical, and the largest
  difference of a true token's log-probability.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
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
from vllm_kvmm.data import TEXTS, long_texts

__all__ = ["QualityRow", "run_text_quality", "table", "text_segments"]

Segment = tuple[list[int], list[int]]  # (prompt ids, continuation ids)


@dataclass
class QualityRow:
    policy: str
    budget: float
    engine: str
    ppl: float
    dppl_pct: float
    top1: float
    greedy: float
    kv: float | None
    agree_top1: float | None = None
    agree_greedy: float | None = None
    max_dlogp: float | None = None


def text_segments(
    tok: Any, prompt_tokens: int, cont_tokens: int, segments: int, texts: Sequence[str] = ("gpl3",)
) -> list[Segment]:
    """``segments`` windows of each of ``texts`` (:data:`vllm_kvmm.data.TEXTS`), spread evenly over it."""
    out: list[Segment] = []
    span = prompt_tokens + cont_tokens
    for name in texts:
        ids = tok(long_texts(name), add_special_tokens=False)["input_ids"]
        stride = (len(ids) - span) // max(1, segments - 1) if segments > 1 else 0
        if len(ids) < span + stride * (segments - 1) or stride < 0:
            raise ValueError(f"text {name} has {len(ids)} tokens, too few for {segments} segments of {span}")
        segs = [ids[s * stride : s * stride + span] for s in range(segments)]
        out += [(seg[:prompt_tokens], seg[prompt_tokens:]) for seg in segs]
    return out


def run_text_quality(
    policies: Sequence[str],
    budgets: Sequence[float],
    prompt_tokens: int = 1536,
    cont_tokens: int = 256,
    gen_tokens: int = 32,
    segments: int = 2,
    texts: Sequence[str] = TEXTS,
    engines: Sequence[str] = ("dense", "vllm"),
    device: str = "cpu",
    out: Path | None = None,
    log: Callable[[str], None] = lambda s: print(s, flush=True),
) -> list[QualityRow]:
    from transformers import AutoTokenizer

    from vllm_kvmm.models.smollm2 import ensure_smollm2

    path = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    segs = text_segments(tok, prompt_tokens, cont_tokens, segments, texts)
    cases = yardstick_cases(policies, budgets)  # a policy at 1.0 must reproduce full: a live identity check
    setup = dict(
        model="SmolLM2-135M-Instruct", prompt_tokens=prompt_tokens, cont_tokens=cont_tokens,
        gen_tokens=gen_tokens, segments=segments, texts=list(texts), device=device, block=BLOCK,
    )  # fmt: skip
    cache = CaseCache(None if out is None else out.with_suffix(".cases.json"), setup)
    if "vllm" in engines and (todo := cache.missing("vllm", cases)):
        _vllm_cases(path, todo, segs, gen_tokens, device, cache, log)
    if "dense" in engines and (todo := cache.missing("dense", cases)):
        _dense_cases(path, todo, segs, gen_tokens, device, cache, log)
    rows = _rows(cases, list(engines), cache)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(
            setup, model="SmolLM2-135M-Instruct (GGUF Q4_1 dequantised)", text="vllm_kvmm.data.long_texts"
        )
        out.write_text(json.dumps(dict(meta=meta, rows=[asdict(r) for r in rows]), indent=1) + "\n")
        plot(rows, out.with_suffix(".png"))
    log(table(rows))
    return rows


def _dense_cases(
    path: Path,
    todo: list[tuple[str, float]],
    segs: list[Segment],
    gen_tokens: int,
    device: str,
    cache: CaseCache,
    log: Callable[[str], None],
) -> None:
    import torch

    from vllm_kvmm.reference import DenseReference, PromptInput

    ref = DenseReference(path, dtype=torch.float32 if device == "cpu" else torch.bfloat16, device=device)
    for name, budget in todo:
        t0 = time.perf_counter()
        policy = build_policy(name, budget)
        res: dict[str, list[Any]] = {"logp": [], "top1": [], "greedy": [], "kv": []}
        for prompt_ids, cont in segs:
            prompt = PromptInput.from_ids(prompt_ids)
            logits = ref.continuation_logits(prompt, cont, policy, granularity=BLOCK)
            logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None])[:, 0]
            res["logp"].append(logp.tolist())
            res["top1"].append(logits.argmax(-1).tolist())
            g = ref.generate([prompt], policy, gen_tokens, granularity=BLOCK)[0]
            res["greedy"].append(g.token_ids)
            res["kv"].append(g.kv_fraction)
        cache.put("dense", name, budget, res)
        log(f"dense {name} ρ={budget:g}: {len(segs)} segments in {time.perf_counter() - t0:.0f} s")


def _vllm_cases(
    path: Path,
    todo: list[tuple[str, float]],
    segs: list[Segment],
    gen_tokens: int,
    device: str,
    cache: CaseCache,
    log: Callable[[str], None],
) -> None:
    """Every case through one engine, the policy chosen per request: forced and greedy requests batched."""
    from vllm import SamplingParams

    from vllm_kvmm.bench.forcing import ForceTokens, forced_logprobs

    longest = max(len(p) + max(len(c), gen_tokens) for p, c in segs)
    prompts = [{"prompt_token_ids": p} for p, _ in segs]
    with bench_engine(path, longest + BLOCK, device, logits_processors=[ForceTokens]) as llm:
        for name, budget in todo:
            t0 = time.perf_counter()
            xa = request_args(name, budget)
            forced = [
                SamplingParams(
                    max_tokens=len(c),
                    temperature=0.0,
                    logprobs=1,
                    ignore_eos=True,
                    detokenize=False,
                    extra_args={**xa, "force_tokens": c},
                )
                for _, c in segs
            ]
            greedy = SamplingParams(
                max_tokens=gen_tokens, temperature=0.0, ignore_eos=True, detokenize=False, extra_args=xa
            )
            outs = llm.generate(prompts * 2, forced + [greedy] * len(segs), use_tqdm=False)
            res: dict[str, list[Any]] = {"logp": [], "top1": [], "greedy": [], "kv": None}
            for (_, cont), o in zip(segs, outs[: len(segs)], strict=True):
                logp, top1 = forced_logprobs(o.outputs[0], cont)
                res["logp"].append(logp)
                res["top1"].append(top1)
            res["greedy"] = [list(o.outputs[0].token_ids) for o in outs[len(segs) :]]
            cache.put("vllm", name, budget, res)
            log(f"vllm {name} ρ={budget:g}: {len(segs)} segments in {time.perf_counter() - t0:.0f} s")


def _flat(rows: list[list[Any]]) -> list[Any]:
    return [x for row in rows for x in row]


def _share(a: list[list[Any]], b: list[list[Any]]) -> float:
    """Share of positions where ``a`` and ``b`` (per segment, same shapes) hold the same value."""
    x, y = _flat(a), _flat(b)
    if len(x) != len(y):
        raise ValueError(f"cannot compare {len(x)} positions with {len(y)}")
    return sum(u == v for u, v in zip(x, y, strict=True)) / len(x)


def _ppl(logp: list[list[float]]) -> float:
    flat = _flat(logp)
    return math.exp(-sum(flat) / len(flat))


def _rows(cases: list[tuple[str, float]], engines: list[str], cache: CaseCache) -> list[QualityRow]:
    rows = []
    for name, budget in cases:
        kv = cache.get("dense", name, budget)["kv"] if "dense" in engines else None
        for engine in engines:
            res, full = cache.get(engine, name, budget), cache.get(engine, "full", 1.0)
            ppl, ppl_full = _ppl(res["logp"]), _ppl(full["logp"])
            row = QualityRow(
                name, budget, engine, ppl, 100 * (ppl / ppl_full - 1), _share(res["top1"], full["top1"]),
                _share(res["greedy"], full["greedy"]), None if kv is None else sum(kv) / len(kv),
            )  # fmt: skip
            if len(engines) > 1:
                a, b = (cache.get(e, name, budget) for e in ("dense", "vllm"))
                row.agree_top1 = _share(a["top1"], b["top1"])
                same = [x == y for x, y in zip(a["greedy"], b["greedy"], strict=True)]
                row.agree_greedy = sum(same) / len(same)
                row.max_dlogp = max(
                    abs(x - y) for x, y in zip(_flat(a["logp"]), _flat(b["logp"]), strict=True)
                )
            rows.append(row)
    return rows


def table(rows: list[QualityRow]) -> str:
    """Markdown: one line per policy and budget, the paths side by side (dense / vLLM)."""
    engines = list(dict.fromkeys(r.engine for r in rows))
    both = len(engines) > 1
    head = ["policy", "ρ", "KV kept", "perplexity", "Δ ppl vs full", "top-1 agreement", "greedy agreement"]
    if both:
        head += ["paths: same argmax", "paths: same greedy tokens", "paths: max Δ log p"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, budget in dict.fromkeys((r.policy, r.budget) for r in rows):
        rs = [next(r for r in rows if (r.policy, r.budget, r.engine) == (name, budget, e)) for e in engines]
        kv = rs[0].kv
        cells = [
            name, f"{budget:g}", "-" if kv is None else f"{kv:.1%}",
            " / ".join(f"{r.ppl:.3f}" for r in rs), " / ".join(f"{r.dppl_pct:+.2f}%" for r in rs),
            " / ".join(f"{r.top1:.1%}" for r in rs), " / ".join(f"{r.greedy:.1%}" for r in rs),
        ]  # fmt: skip
        if both:
            r = rs[0]
            cells += [f"{r.agree_top1:.1%}", f"{r.agree_greedy:.0%}", f"{r.max_dlogp:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n(cells: " + " / ".join(engines) + ")"


def plot(rows: list[QualityRow], path: Path) -> None:
    """Δ perplexity and top-1 agreement against budget, one line per policy (vLLM path when present)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engine = "vllm" if any(r.engine == "vllm" for r in rows) else "dense"
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for name in dict.fromkeys(r.policy for r in rows if r.policy != "full"):
        pts = sorted((r.budget, r.dppl_pct, r.top1) for r in rows if (r.policy, r.engine) == (name, engine))
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=name)
    axes[0].set_ylabel(f"Δ perplexity vs full, % ({engine})")
    axes[1].set_ylabel(f"next-token top-1 agreement ({engine})")
    for ax in axes:
        ax.set_xlabel("budget ρ")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
