"""Compressed reuse over images (the workload it exists for) on the tiny LLaVA: every policy that can leave an
entry, a follow-up question about the same two images equals the dense reference's follow-up mode; the same
text over other images never reuses (the images' hashes are in the entry's key)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoProcessor

from tests.vllm.conftest import BLOCK, greedy, make_llm, shutdown
from tests.vllm.helpers import block_pool
from vllm_kvmm.config import ResolvedPolicy
from vllm_kvmm.policies import make_policy, policy_names
from vllm_kvmm.reference import DenseReference, PromptInput, prompt_from_messages

NEW = 6
MESSAGES = [
    {
        "role": "user",
        "content": [
            {"type": "image"},
            {"type": "image"},
            {"type": "text", "text": "Compare the two pictures."},
        ],
    }
]
# Every policy whose prefill compression is its last word (a decode-time flush would rewrite an entry).
PREFILL_ONLY = [
    n
    for n in policy_names()
    if n != "full" and ResolvedPolicy.of(make_policy(n, 0.25), 400).decode_interval is None
]


@pytest.fixture(scope="module")
def setup(tiny_llava_dir: Path) -> Any:
    llm = make_llm(
        str(tiny_llava_dir), "full", enable_prefix_caching=True, max_model_len=2048,
        limit_mm_per_prompt={"image": 2},
    )  # fmt: skip
    yield llm, AutoProcessor.from_pretrained(tiny_llava_dir), DenseReference(tiny_llava_dir)
    shutdown(llm)


def _run(llm: Any, rid: str, prompt: dict[str, Any], params: Any) -> Any:
    engine = llm.llm_engine
    engine.add_request(rid, prompt, params)
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out = o
    return out


def _collapsed(ids: list[int], image_token: int) -> list[int]:
    """Token ids with each image's run of placeholder tokens back to the one token vLLM expands."""
    return [t for i, t in enumerate(ids) if t != image_token or i == 0 or ids[i - 1] != image_token]


def _kvmm(out: Any) -> dict[str, Any]:
    return (out.kv_transfer_params or {}).get("kvmm", {})


@pytest.mark.parametrize("name", PREFILL_ONLY)
def test_a_follow_up_about_the_same_images_equals_the_dense_reference(
    setup: Any, images: list, name: str
) -> None:
    llm, processor, reference = setup
    tok = processor.tokenizer
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    extra = {"kv_policy": name, "kv_budget": 0.25, "kv_reuse": True}
    pics = images[:2]
    a = _run(llm, f"{name}-a", {"prompt": text, "multi_modal_data": {"image": pics}}, greedy(NEW, **extra))
    assert _kvmm(a)["compressed"], _kvmm(a)
    ext = list(a.outputs[0].token_ids) + tok.encode(
        " USER: And the colours? ASSISTANT:", add_special_tokens=False
    )
    image_token = int(tok.convert_tokens_to_ids("<image>"))
    ids = _collapsed(list(a.prompt_token_ids), image_token) + ext
    b = _run(
        llm, f"{name}-b", {"prompt_token_ids": ids, "multi_modal_data": {"image": pics}}, greedy(NEW, **extra)
    )
    assert list(b.prompt_token_ids) == list(a.prompt_token_ids) + ext
    assert _kvmm(b)["reused"] == (len(a.prompt_token_ids) + NEW - 1) // BLOCK * BLOCK
    first = prompt_from_messages(processor, MESSAGES, pics)
    assert first.input_ids.tolist() == list(a.prompt_token_ids)
    hit = a.num_cached_tokens  # the images of an earlier case may be in the prefix cache
    ref = reference.generate_followup(first, ext, make_policy(name, 0.25), NEW, BLOCK, cached=hit, shared=hit)
    assert list(b.outputs[0].token_ids) == ref.token_ids
    # The same tokens over other images: the placeholders match, the image hashes do not.
    other = [images[2], images[0]]
    c = _run(
        llm,
        f"{name}-c",
        {"prompt_token_ids": ids, "multi_modal_data": {"image": other}},
        greedy(NEW, **extra),
    )
    assert "reused" not in _kvmm(c)
    pool = block_pool(llm)
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


def test_prompt_input_is_the_engine_prompt(setup: Any, images: list) -> None:
    """The reference's prompt is vLLM's (else the equalities above compare different prompts)."""
    llm, processor, _ = setup
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    out = llm.generate({"prompt": text, "multi_modal_data": {"image": images[:2]}}, greedy(1), use_tqdm=False)
    ref: PromptInput = prompt_from_messages(processor, MESSAGES, images[:2])
    assert list(out[0].prompt_token_ids) == ref.input_ids.tolist() and int(ref.vision_mask.sum()) > 0
