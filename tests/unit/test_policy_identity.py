"""Every registered policy at budget 1.0 reproduces the full cache token for token (real and tiny models),
and compressing budgets really change the cache (so the identity above is not vacuous)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer

from vllm_kvmm.data import needle_prompt
from vllm_kvmm.policies import make_policy, policy_names
from vllm_kvmm.reference import DenseReference, prompt_from_messages, prompt_from_text

COMPRESSING = [n for n in policy_names() if n != "full"]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path) -> tuple[DenseReference, Any]:
    return DenseReference(smollm2_dir), AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def smollm2_long_prompt(smollm2: tuple[DenseReference, Any]) -> Any:
    _, tok = smollm2
    return prompt_from_text(tok, needle_prompt(words=300).user_message)


@pytest.fixture(scope="module")
def smollm2_full_tokens(smollm2: tuple[DenseReference, Any], smollm2_long_prompt: Any) -> list[int]:
    ref, _ = smollm2
    return ref.generate([smollm2_long_prompt], make_policy("full"), 12)[0].token_ids


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPRESSING)
def test_budget_one_is_identity_smollm2(
    name: str, smollm2: tuple[DenseReference, Any], smollm2_long_prompt: Any, smollm2_full_tokens: list[int]
) -> None:
    ref, _ = smollm2
    out = ref.generate([smollm2_long_prompt], make_policy(name, 1.0), 12)[0]
    assert out.token_ids == smollm2_full_tokens
    assert out.kept_tokens == [smollm2_long_prompt.num_tokens] * ref.num_layers


@pytest.mark.slow
@pytest.mark.parametrize("name", ["snapkv", "h2o", "lookm", "meda"])
def test_low_budget_changes_cache_smollm2(
    name: str, smollm2: tuple[DenseReference, Any], smollm2_long_prompt: Any
) -> None:
    ref, _ = smollm2
    out = ref.generate([smollm2_long_prompt], make_policy(name, 0.2), 2)[0]
    n = smollm2_long_prompt.num_tokens
    assert sum(out.kept_tokens) <= round(0.2 * n) * ref.num_layers + ref.num_layers  # rounding slack only
    assert out.kv_fraction < 0.25


@pytest.mark.parametrize("name", COMPRESSING)
def test_budget_one_is_identity_tiny_llava(name: str, tiny_llava_dir: Path, images: list) -> None:
    ref = DenseReference(tiny_llava_dir)
    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = prompt_from_messages(proc, msgs, images[:1])
    torch.manual_seed(0)
    full = ref.generate([prompt], make_policy("full"), 8)[0].token_ids
    out = ref.generate([prompt], make_policy(name, 1.0), 8)[0]
    assert out.token_ids == full
    assert all(p.is_identity for p in out.plans)
