"""Tiny LLaVA and tiny Qwen2-VL with images on the vLLM CPU build: identity and paged == dense.

The vision mask of the vLLM path comes from the request's multimodal placeholder ranges, the reference's
from the processor's image tokens: equal kept sets show they agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoProcessor

from tests.vllm.conftest import BLOCK, greedy, make_llm, shutdown, token_ids
from tests.vllm.helpers import assert_same_kept_sets, plans_by_output_id
from vllm_kvmm.policies import make_policy, policy_names
from vllm_kvmm.reference import DenseReference, prompt_from_messages

NEW = 10
QUESTIONS = ["Describe these pictures in detail.", "What is the difference between the two images?"]


def _cases(images: list) -> list[tuple[list[dict], list]]:
    """(messages, images): one image with a short question, two images with another."""
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}]
    two = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTIONS[1]}],
        }
    ]
    return [(one, images[:1]), (two, images[1:3])]


def _vllm_inputs(processor: Any, images: list) -> list[dict[str, Any]]:
    out = []
    for messages, imgs in _cases(images):
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append({"prompt": text, "multi_modal_data": {"image": imgs}})
    return out


@pytest.fixture(scope="module", params=["llava", "qwen2vl"])
def setup(
    request: Any, images: list, tiny_llava_dir: Path, tiny_qwen2vl_dir: Path
) -> Iterator[dict[str, Any]]:
    """Vanilla tokens, then our engine (default policy ``full``) for one model; shut down after."""
    from vllm_kvmm.vllm_ext.worker import worker_state

    model_dir = tiny_llava_dir if request.param == "llava" else tiny_qwen2vl_dir
    processor = AutoProcessor.from_pretrained(model_dir)
    inputs = _vllm_inputs(processor, images)
    kw: dict[str, Any] = dict(max_model_len=2048, limit_mm_per_prompt={"image": 2})
    vanilla = make_llm(str(model_dir), **kw)
    van = token_ids(vanilla.generate(inputs, greedy(NEW)))
    shutdown(vanilla)
    llm = make_llm(str(model_dir), "full", **kw)
    from vllm_kvmm.vllm_ext.worker import PlanRecorder

    worker_state().recorder = PlanRecorder()
    refs_in = [prompt_from_messages(processor, m, imgs) for m, imgs in _cases(images)]
    yield dict(llm=llm, vanilla=van, inputs=inputs, ref=DenseReference(model_dir), ref_in=refs_in)
    shutdown(llm)


def test_prompt_ids_match_reference(setup: dict[str, Any]) -> None:
    outs = setup["llm"].generate(setup["inputs"], greedy(1))
    for out, ref in zip(outs, setup["ref_in"], strict=True):
        assert list(out.prompt_token_ids) == ref.input_ids.tolist()
        assert int(ref.vision_mask.sum()) > 0


def test_full_and_budget_one_equal_vanilla(setup: dict[str, Any]) -> None:
    llm, van = setup["llm"], setup["vanilla"]
    assert token_ids(llm.generate(setup["inputs"], greedy(NEW))) == van
    for name in ("meda", "lookm", "hae", "snapkv"):
        assert token_ids(llm.generate(setup["inputs"], greedy(NEW, kv_policy=name, kv_budget=1.0))) == van


# Every registered policy at ρ 0.25 (a new policy is covered without editing this file), and the
# policies whose layer budgets differ by design at ρ 0.5 too.
MATRIX = [(n, 0.25) for n in policy_names() if n != "full"] + [
    ("meda", 0.5),
    ("lookm", 0.5),
    ("pyramidkv", 0.5),
]


@pytest.mark.parametrize("name,budget", MATRIX)
def test_paged_equals_dense(setup: dict[str, Any], name: str, budget: float) -> None:
    from vllm_kvmm.vllm_ext.worker import worker_state

    outs = setup["llm"].generate(setup["inputs"], greedy(NEW, kv_policy=name, kv_budget=budget))
    refs = setup["ref"].generate(setup["ref_in"], make_policy(name, budget), NEW, granularity=BLOCK)
    for out, ref in zip(outs, refs, strict=True):
        assert list(out.outputs[0].token_ids) == ref.token_ids
        assert any(not p.is_identity for p in ref.plans)
        assert_same_kept_sets(plans_by_output_id(worker_state().recorder.plans, out.request_id), ref.plans)
