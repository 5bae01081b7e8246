"""Every tiny multimodal family on the vLLM CPU build, images and (Qwen-VL) video: identity, paged == dense.

The vision mask of the vLLM path comes from the request's multimodal placeholder ranges, the reference's
from the processor's image and video tokens: equal kept sets show they agree. Video tokens are vision
tokens for every modality-aware policy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import AutoProcessor

from tests.vllm.conftest import BLOCK, greedy, make_llm, shutdown, token_ids
from tests.vllm.helpers import assert_same_kept_sets, block_pool, plans_by_output_id
from vllm_kvmm.policies import make_policy, policy_names
from vllm_kvmm.reference import DenseReference, prompt_from_messages

NEW = 10
QUESTIONS = [
    "Describe these pictures in detail.",
    "What is the difference between the two images?",
    "What happens in this video?",
]


# Tiny model families (tests/conftest.py builds ``tiny_<name>_dir``) and how they take video: ``None`` (no
# video), ``"frames"``, or ``"frames+metadata"`` (Qwen3-VL writes each temporal patch's timestamp into the
# prompt from the video's fps; vLLM 0.26 drops the metadata of Qwen2-VL/2.5-VL videos, so those get frames).
# InternVL runs images only: vLLM 0.26 writes its video frames with ``<video>`` tokens where transformers
# writes ``<IMG_CONTEXT>`` (docs/models.md).
FAMILIES: dict[str, str | None] = {
    "llava": None,
    "qwen2vl": "frames",
    "qwen25vl": "frames",
    "qwen3vl": "frames+metadata",
    "internvl": None,
    "llava_onevision": "frames",
    "llava_next": None,
}
# The long-video test's clip per family: (frames, frame size, vision tokens). Qwen-VL: 8 temporal patches
# of 8×8 merged patches; LLaVA-OneVision: 4 pooled features a frame and one newline a video.
LONG_VIDEO: dict[str, tuple[int, int, int]] = {"llava_onevision": (128, 64, 128 * 4 + 1)}
LONG_VIDEO_DEFAULT = (16, 256, 512)


def video(seed: int, frames: int, size: int, kind: str = "frames") -> Any:
    """``[frames, size, size, 3]`` uint8 random frames; with ``kind="frames+metadata"`` as
    ``(frames, metadata)`` at 2 fps, the form vLLM and :func:`prompt_from_messages` both take."""
    rgb = np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    if kind == "frames":
        return rgb
    meta = {
        "fps": 2.0,
        "total_num_frames": frames,
        "frames_indices": list(range(frames)),
        "duration": frames / 2,
    }
    return rgb, meta


def _cases(images: list, videos: list) -> list[tuple[list[dict], list, list]]:
    """(messages, images, videos): one image with a short question, two images with another, and with
    ``videos`` one video with a third."""
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}]
    two = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTIONS[1]}],
        }
    ]
    out = [(one, images[:1], []), (two, images[1:3], [])]
    if videos:
        clip = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTIONS[2]}]}]
        out.append((clip, [], videos[:1]))
    return out


def _vllm_input(processor: Any, messages: list[dict], imgs: list, vids: list) -> dict[str, Any]:
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    data: dict[str, Any] = {"image": imgs} if imgs else {}
    if vids:
        data["video"] = vids[0]
    return {"prompt": text, "multi_modal_data": data}


@pytest.fixture(scope="module", params=list(FAMILIES))
def setup(request: Any, images: list) -> Iterator[dict[str, Any]]:
    """Vanilla tokens, then our engine (default policy ``full``) for one model family; shut down after."""
    from vllm_kvmm.vllm_ext.worker import PlanRecorder, worker_state

    model_dir: Path = request.getfixturevalue(f"tiny_{request.param}_dir")
    processor = AutoProcessor.from_pretrained(model_dir)
    kind = FAMILIES[request.param]
    videos = [video(3, 8, 128, kind)] if kind else []
    cases = _cases(images, videos)
    inputs = [_vllm_input(processor, *c) for c in cases]
    limits = {"image": 2, "video": 1 if videos else 0}
    kw: dict[str, Any] = dict(max_model_len=2048, limit_mm_per_prompt=limits)
    vanilla = make_llm(str(model_dir), **kw)
    van = token_ids(vanilla.generate(inputs, greedy(NEW)))
    shutdown(vanilla)
    llm = make_llm(str(model_dir), "full", **kw)
    worker_state().recorder = PlanRecorder()
    refs_in = [prompt_from_messages(processor, *c) for c in cases]
    yield dict(
        llm=llm, vanilla=van, inputs=inputs, ref=DenseReference(model_dir), ref_in=refs_in,
        processor=processor, video=kind, family=request.param,
    )  # fmt: skip
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


def test_a_long_video_is_compressed_and_frees_its_blocks(setup: dict[str, Any]) -> None:
    """Hundreds of video tokens (Qwen-VL: 512, 16 frames in 8 temporal patches of 8×8; LLaVA-OneVision:
    513, 128 frames) under snapkv 0.25: after the step that compressed it (the one after the prefill) each
    layer's KV-cache group holds exactly the blocks the dense reference's plan keeps, and all come back
    after the request."""
    from vllm_kvmm.vllm_ext.spec import managers

    if not setup["video"]:
        pytest.skip("this family takes no video")
    clip = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTIONS[2]}]}]
    count, size, tokens = LONG_VIDEO.get(setup["family"], LONG_VIDEO_DEFAULT)
    frames = video(4, count, size, setup["video"])  # Qwen: resized to 224 (Qwen2/2.5-VL) or kept (Qwen3-VL)
    ref_in = prompt_from_messages(setup["processor"], clip, [], [frames])
    n, n_video = ref_in.num_tokens, int(ref_in.vision_mask.sum())
    assert n_video == tokens, n_video
    llm = setup["llm"]
    engine, pool = llm.llm_engine, block_pool(llm)
    free0 = pool.get_num_free_blocks()
    params = greedy(4, kv_policy="snapkv", kv_budget=0.25)
    engine.add_request("video", _vllm_input(setup["processor"], clip, [], [frames]), params)
    engine.step()  # the whole prompt fits one step: prefill and the first token
    engine.step()  # compression (before the forward), the second token, the release
    ref = setup["ref"].generate([ref_in], make_policy("snapkv", 0.25), 4, granularity=BLOCK)[0]
    held = {
        gid: m.num_held_blocks(next(r for r in m.req_to_blocks if r.startswith("video")))
        for gid, m in managers(pool).items()
    }
    assert held == {
        # n + 1 tokens stored: the second token's step wrote the first's KV
        gid: -(-(n + 1) // BLOCK) - (p.tail_start - p.prefix_keep) // BLOCK
        for gid, p in enumerate(ref.plans)
    }
    assert sum(held.values()) <= len(held) * -(-n // BLOCK) // 2  # well under half the blocks kept
    out: list[int] = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out = list(o.outputs[0].token_ids)
    assert out == ref.token_ids
    assert pool.get_num_free_blocks() == free0  # everything back
