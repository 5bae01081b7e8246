"""The main job's first version: the dense reference on SmolLM2 with a long prompt, one run per policy."""

from __future__ import annotations

import time
from collections.abc import Sequence

from vllm_kvmm.data import needle_prompt
from vllm_kvmm.policies import make_policy


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _layer_summary(kept: Sequence[int]) -> str:
    """Kept tokens per layer, compact: every layer when they differ, one number when uniform."""
    if len(set(kept)) == 1:
        return f"{kept[0]} in every layer"
    return " ".join(str(k) for k in kept)


def run_reference_demo(
    policies: Sequence[str], budget: float, max_new_tokens: int = 24, doc_words: int = 900
) -> int:
    """Answer a planted-passphrase question about a long document under each policy; print the table."""
    import torch

    from vllm_kvmm.models.smollm2 import ensure_smollm2
    from vllm_kvmm.reference import DenseReference, prompt_from_text

    # Build every policy first so a bad name or budget fails before the model loads.
    built = [make_policy(name, 1.0 if name == "full" else budget) for name in policies]
    torch.manual_seed(0)
    path = ensure_smollm2()
    print(f"model: SmolLM2-135M-Instruct (real weights, float32) at {path}")
    ref = DenseReference(path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    task = needle_prompt(words=doc_words)
    prompt = prompt_from_text(tok, task.user_message)
    print(
        f"prompt: {prompt.num_tokens} tokens — a {doc_words}-word document (GPL-3 text) with a planted "
        f"passphrase ({task.answer!r}) and the question {task.question!r}\n"
    )
    for policy in built:
        t0 = time.perf_counter()
        out = ref.generate([prompt], policy, max_new_tokens, stop_at_eos=True)[0]
        dt = time.perf_counter() - t0
        text = tok.decode(out.token_ids, skip_special_tokens=True).strip().replace("\n", " ")
        saved = out.kv_bytes_full - out.kv_bytes_kept
        label = policy.name if policy.name == "full" else f"{policy.name} (budget {policy.budget:g})"
        found = "yes" if task.answer.lower() in text.lower() else "no"
        print(f"== {label}  [{dt:.1f} s]")
        print(f"   answer:        {text!r}   (passphrase recalled: {found})")
        print(f"   KV kept/layer: {_layer_summary(out.kept_tokens)} of {out.num_prompt_tokens} tokens")
        print(
            f"   KV bytes:      {_mib(out.kv_bytes_kept)} of {_mib(out.kv_bytes_full)} kept "
            f"({100 * out.kv_fraction:.1f}%), {_mib(saved)} saved"
        )
        if policy.compresses and saved == 0 and policy.name == "hae":
            print("   note:          HAE prunes only vision tokens at prefill; this prompt is text only")
    return 0
