"""Text quality of every policy on SmolLM2 (real weights) through the dense reference — a first look.

For each segment of the embedded long text: the first ``prompt_tokens`` tokens are the prompt (compressed
by the policy right after prefill), the next ``cont_tokens`` the continuation. Reported per policy and
budget, averaged over segments:

* ``ppl`` and ``dppl``: perplexity of the true continuation (teacher forcing) and its change vs full;
* ``top1``: how often the compressed cache's next-token argmax equals the full cache's, same prefix;
* ``greedy``: fraction of the ``gen_tokens`` greedy tokens equal to the full cache's, position by position;
* ``kv``: measured fraction of prompt KV kept.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vllm_kvmm.data import long_text
from vllm_kvmm.policies import make_policy


@dataclass
class QualityRow:
    policy: str
    budget: float
    ppl: float
    dppl_pct: float
    top1: float
    greedy: float
    kv: float


def run_text_quality(
    policies: Sequence[str],
    budgets: Sequence[float],
    prompt_tokens: int = 1536,
    cont_tokens: int = 256,
    gen_tokens: int = 32,
    segments: int = 2,
    out: Path | None = None,
) -> list[QualityRow]:
    from transformers import AutoTokenizer

    from vllm_kvmm.models.smollm2 import ensure_smollm2
    from vllm_kvmm.reference import DenseReference, PromptInput

    path = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    ref = DenseReference(path)
    ids = tok(long_text(), add_special_tokens=False)["input_ids"]
    span = prompt_tokens + cont_tokens
    stride = (len(ids) - span) // max(1, segments - 1) if segments > 1 else 0
    if len(ids) < span + stride * (segments - 1):
        raise ValueError(f"text has {len(ids)} tokens, too few for {segments} segments of {span}")
    segs = [ids[s * stride : s * stride + span] for s in range(segments)]
    full = make_policy("full")
    base = []
    for seg in segs:
        prompt = PromptInput.from_ids(seg[:prompt_tokens])
        cont = torch.tensor(seg[prompt_tokens:])
        base.append(
            (
                prompt,
                cont,
                ref.continuation_logits(prompt, cont, full),
                ref.generate([prompt], full, gen_tokens)[0].token_ids,
            )
        )
    rows = []
    for name in policies:
        for budget in budgets:
            if name == "full" and budget != 1.0:
                continue
            policy = make_policy(name, budget)
            t0 = time.perf_counter()
            nll, top1, greedy, kv = [], [], [], []
            for prompt, cont, logits_full, tokens_full in base:
                logits = ref.continuation_logits(prompt, cont, policy)
                nll.append(float(torch.nn.functional.cross_entropy(logits, cont)))
                top1.append(float((logits.argmax(-1) == logits_full.argmax(-1)).float().mean()))
                g = ref.generate([prompt], policy, gen_tokens)[0]
                greedy.append(sum(a == b for a, b in zip(g.token_ids, tokens_full, strict=True)) / gen_tokens)
                kv.append(g.kv_fraction)
            full_nll = [float(torch.nn.functional.cross_entropy(lf, c)) for _, c, lf, _ in base]
            ppl = math.exp(sum(nll) / len(nll))
            ppl_full = math.exp(sum(full_nll) / len(full_nll))
            row = QualityRow(
                name,
                budget,
                ppl,
                100 * (ppl / ppl_full - 1),
                sum(top1) / len(top1),
                sum(greedy) / len(greedy),
                sum(kv) / len(kv),
            )
            rows.append(row)
            print(
                f"{name:<13} ρ={budget:<4g} ppl {row.ppl:7.3f} ({row.dppl_pct:+6.2f}%)  "
                f"top-1 {row.top1:6.1%}  greedy {row.greedy:6.1%}  kv {row.kv:6.1%}  "
                f"[{time.perf_counter() - t0:.0f} s]",
                flush=True,
            )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(
            model="SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, float32)",
            text="GPL-3 (vllm_kvmm/data)",
            prompt_tokens=prompt_tokens,
            cont_tokens=cont_tokens,
            gen_tokens=gen_tokens,
            segments=segments,
            path="dense reference",
        )
        out.write_text(json.dumps(dict(meta=meta, rows=[asdict(r) for r in rows]), indent=1))
    return rows
