"""Needle retrieval on SmolLM2 (real weights), through the dense reference and through vLLM, side by side.

A pass key (a random 5-digit number, seeded) is planted at a spread of depths in the embedded real text
(the GPL-3, repeated if the context needs more), and the model is asked for it in its chat template. Per
policy, budget and context length:

* ``accuracy``: share of samples whose greedy answer contains the pass key;
* ``agree``: share of samples whose greedy tokens are identical on the two paths (vLLM's paged cache vs
  the dense reference, same policy, same paged layout) — the oracle of the vLLM integration, measured on
  the benchmark's own prompts.

``vllm-kvmm bench retrieval --contexts 1024,2048 --samples 4`` (CPU: minutes per context; the GPU runs the
same command with ``--device cuda`` for the dense side).
"""

from __future__ import annotations

import json
import random
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
from vllm_kvmm.data import long_text

__all__ = ["RetrievalRow", "passkey_prompts", "run_retrieval"]

QUESTION = "What is the pass key? Answer with the number only."


@dataclass(frozen=True)
class PasskeyPrompt:
    ids: list[int]
    answer: str
    depth: float

    def as_input(self) -> Any:
        """The dense reference's input (text only)."""
        from vllm_kvmm.reference import PromptInput

        return PromptInput.from_ids(self.ids)


@dataclass
class RetrievalRow:
    policy: str
    budget: float
    context: int
    engine: str
    accuracy: float
    agree: float | None
    samples: int


def passkey_prompts(tok: Any, context: int, samples: int, seed: int = 0) -> list[PasskeyPrompt]:
    """``samples`` chat prompts of exactly ``context`` tokens, the key at depths spread over (0, 1)."""
    rng = random.Random(seed * 1_000_003 + context)
    filler = tok(long_text(), add_special_tokens=False)["input_ids"]
    out = []
    for i in range(samples):
        key = str(rng.randrange(10_000, 100_000))
        depth = (i + 0.5) / samples
        needle = tok(
            f" The pass key is {key}. Remember it: {key} is the pass key. ", add_special_tokens=False
        )
        head = tok.apply_chat_template(
            [{"role": "user", "content": "Read this document.\n\nDOC\n\nQuestion: " + QUESTION}],
            add_generation_prompt=True,
            tokenize=False,
        )
        before, after = head.split("DOC")
        pre = tok(before, add_special_tokens=False)["input_ids"]
        post = tok(after, add_special_tokens=False)["input_ids"]
        room = context - len(pre) - len(post) - len(needle["input_ids"])
        if room < 16:
            raise ValueError(f"context {context} is too short for the pass-key prompt")
        doc = (filler * (room // len(filler) + 1))[:room]
        cut = int(room * depth)
        ids = pre + doc[:cut] + needle["input_ids"] + doc[cut:] + post
        out.append(PasskeyPrompt(ids, key, depth))
    return out


def _answers(tok: Any, outputs: list[list[int]], prompts: list[PasskeyPrompt]) -> list[bool]:
    return [p.answer in tok.decode(o) for o, p in zip(outputs, prompts, strict=True)]


def run_retrieval(
    policies: Sequence[str],
    budgets: Sequence[float],
    contexts: Sequence[int],
    samples: int = 4,
    engines: Sequence[str] = ("dense", "vllm"),
    gen_tokens: int = 16,  # "The pass key is 12345." — SmolLM2 writes digits as single tokens
    device: str = "cpu",
    out: Path | None = None,
) -> list[RetrievalRow]:
    from transformers import AutoTokenizer

    from vllm_kvmm.models.smollm2 import ensure_smollm2

    path = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    window = json.loads((Path(path) / "config.json").read_text())["max_position_embeddings"]
    if too_long := [c for c in contexts if c + gen_tokens > window]:
        raise ValueError(
            f"contexts {too_long} plus the {gen_tokens}-token answer exceed SmolLM2's {window} positions: "
            f"the longest prompt is {window - gen_tokens} tokens"
        )
    cases = yardstick_cases(policies, budgets)
    prompts = {c: passkey_prompts(tok, c, samples) for c in contexts}
    # Finished cases are kept next to ``out``: an interrupted run resumes, a wider one computes only the new.
    setup = dict(contexts=list(contexts), samples=samples, gen_tokens=gen_tokens, device=device, block=BLOCK)
    cache = CaseCache(None if out is None else out.with_suffix(".cases.json"), setup)
    if "vllm" in engines and (todo := cache.missing("vllm", cases)):
        _vllm_tokens(path, todo, prompts, gen_tokens, device, cache)
    if "dense" in engines and (todo := cache.missing("dense", cases)):
        import torch

        from vllm_kvmm.reference import DenseReference

        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        ref = DenseReference(path, dtype=dtype, device=device)
        for name, budget in todo:
            t0 = time.perf_counter()
            policy = build_policy(name, budget)
            done = {
                str(c): [
                    ref.generate([p.as_input()], policy, gen_tokens, granularity=BLOCK)[0].token_ids
                    for p in ps
                ]
                for c, ps in prompts.items()
            }
            cache.put("dense", name, budget, {"tokens": done})
            print(f"dense {name} ρ={budget:g}: {time.perf_counter() - t0:.0f} s", flush=True)
    tokens = {
        (e, n, b, c): cache.get(e, n, b)["tokens"][str(c)]
        for e in engines
        for n, b in cases
        for c in contexts
    }
    rows = []
    for name, budget in cases:
        for c in contexts:
            for engine in engines:
                got = tokens[engine, name, budget, c]
                other = "vllm" if engine == "dense" else "dense"
                agree = None
                if (other, name, budget, c) in tokens:
                    theirs = tokens[other, name, budget, c]
                    agree = sum(a == b for a, b in zip(got, theirs, strict=True)) / samples
                acc = sum(_answers(tok, got, prompts[c])) / samples
                rows.append(RetrievalRow(name, budget, c, engine, acc, agree, samples))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(
            model="SmolLM2-135M-Instruct (float32)", task="pass key in GPL-3 text", gen_tokens=gen_tokens
        )
        out.write_text(json.dumps(dict(meta=meta, rows=[asdict(r) for r in rows]), indent=1))
    print(table(rows))
    return rows


def _vllm_tokens(
    path: Path,
    todo: list[tuple[str, float]],
    prompts: dict[int, list[PasskeyPrompt]],
    gen_tokens: int,
    device: str,
    cache: CaseCache,
) -> None:
    """Every case through one engine: the policy is chosen per request (``extra_args``)."""
    from vllm import SamplingParams

    with bench_engine(path, max(prompts) + gen_tokens, device) as llm:
        for name, budget in todo:
            t0 = time.perf_counter()
            sp = SamplingParams(
                max_tokens=gen_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
                extra_args=request_args(name, budget),
            )  # fmt: skip
            done = {}
            for c, ps in prompts.items():
                res = llm.generate([{"prompt_token_ids": p.ids} for p in ps], sp, use_tqdm=False)
                done[str(c)] = [list(r.outputs[0].token_ids) for r in res]
            cache.put("vllm", name, budget, {"tokens": done})
            print(f"vllm {name} ρ={budget:g}: {time.perf_counter() - t0:.0f} s", flush=True)


def table(rows: list[RetrievalRow]) -> str:
    """Markdown: one line per policy and budget, accuracy per context and engine, and path agreement."""
    contexts = sorted({r.context for r in rows})
    engines = sorted({r.engine for r in rows})
    head = ["policy", "ρ"] + [f"{e} @{c}" for c in contexts for e in engines]
    if len(engines) > 1:
        head.append("dense = vLLM tokens")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = dict.fromkeys((r.policy, r.budget) for r in rows)
    for name, budget in keys:
        cells = [name, f"{budget:g}"]
        agree = []
        for c in contexts:
            for e in engines:
                r = next(x for x in rows if (x.policy, x.budget, x.context, x.engine) == (name, budget, c, e))
                cells.append(f"{r.accuracy:.0%}")
                if r.agree is not None and e == "dense":
                    agree.append(r.agree)
        if len(engines) > 1:
            cells.append(f"{sum(agree) / len(agree):.0%}" if agree else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
