"""``vllm-kvmm bench multiturn`` on the CPU build, tiny: 2 conversations of 2 turns over 4 held-out images.

What must hold whatever the model answers: turn 2 is a chat continuation of turn 1; vanilla vLLM with
prefix caching hits turn 1's prompt at turn 2; the compressing engine without prefix caching never hits;
with ``kv_shared_prefix="images"`` turn 2 hits at least the images' block-rounded prefix, which stays exact
and so holds at least as much KV as re-compressing everything; with ``kv_reuse`` turn 2 continues turn 1's
compressed cache (its whole prompt, images included) and holds less than keeping the images exact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vllm_kvmm.bench.multiturn import (
    CONFIGS,
    SINGLE,
    MultiTurnRow,
    conversation_messages,
    conversations,
    image_prefix,
    table,
)
from vllm_kvmm.vlm import data

pytestmark = pytest.mark.skipif(
    not data.easy_vqa_available(), reason="easy-vqa (the images) is not installed: run scripts/setup.sh"
)

N_CONV, TURNS, IMAGES = 2, 2, 4


@pytest.fixture(scope="module")
def vlm_dir(smollm2_dir: Path) -> Path:
    from vllm_kvmm.vlm.assemble import ensure_vlm

    return ensure_vlm()


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory, vlm_dir: Path) -> dict[str, Any]:
    # Through the front end; every engine runs in a child process of its own, never in this one.
    from vllm_kvmm.cli import main

    out = tmp_path_factory.mktemp("multiturn") / "mt.json"
    argv = ["bench", "multiturn", "--policies", "snapkv", "--conversations", str(N_CONV),
            "--turns", str(TURNS), "--images", str(IMAGES), "--one-process", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return json.loads(out.read_text())


def _records(result: dict[str, Any], config: str) -> dict[tuple[int, int], dict[str, Any]]:
    return {(r["conversation"], r["turn"]): r for r in result["records"] if r["config"] == config}


def test_conversations_are_held_out_alternating_and_deterministic() -> None:
    convs = conversations(3, 16, 4)
    assert convs == conversations(3, 16, 4)
    for c in convs:
        assert c.context.split == "test" and c.context.n_images == 16
        assert [q.task == "needle" for q in c.questions] == [True, False, True, False]
    with pytest.raises(ValueError, match="more than 2 images"):
        conversations(1, 2, 6)


def test_each_turn_continues_the_previous_prompt_through_the_chat_template(vlm_dir: Path) -> None:
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(vlm_dir)

    def text(msgs: list[dict]) -> str:
        return proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    first = text(conversation_messages(4, ["Which image shows a red circle?"], []))
    second = text(
        conversation_messages(4, ["Which image shows a red circle?", "What shape is in image 2?"], ["3"])
    )
    assert second.startswith(first + "3")
    assert second.count("<image>") == 4 and second.endswith(
        "What shape is in image 2?<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="one answer fewer"):
        conversation_messages(4, ["a", "b"], [])
    assert image_prefix([7, 9, 9, 9, 5] * 8, 9, 16) == 32 and image_prefix([1, 2], 9) == 0


def test_result_has_every_configuration_turn_and_conversation(result: dict[str, Any]) -> None:
    meta = result["meta"]
    assert meta["machine"].startswith("CPU") and meta["split"] == "test"
    assert meta["command"].startswith("vllm-kvmm bench multiturn ") and "--conversations 2" in meta["command"]
    configs = [*CONFIGS, SINGLE]
    for config in configs:
        assert set(_records(result, config)) == {(c, t) for c in range(N_CONV) for t in range(1, TURNS + 1)}
    rows = [MultiTurnRow(**r) for r in result["rows"]]
    assert {(r.config, r.turn) for r in rows} == {(c, t) for c in configs for t in range(1, TURNS + 1)}
    for r in rows:
        assert r.conversations == N_CONV and 0 <= r.lo <= r.accuracy <= r.hi <= 1
        timed = r.config != SINGLE
        assert (r.ttft_ratio is not None) == timed and (r.ttft_s is not None) == timed
        if r.config == "vanilla+pc":
            assert r.ttft_ratio == pytest.approx(1.0)
    assert all(r.policy == "snapkv" and r.budget == 0.2 for r in rows if r.config.startswith("ours"))
    # --one-process: the configurations that differ only in their requests' arguments share ours-shared's
    # engine (reset in between; the checks below hold on it); the others start their own.
    started = {t["config"]: t["engine_start_s"] for t in meta["timings"]}
    assert started["ours-reuse"] == started["ours-shared-reuse"] == 0
    assert min(started[c] for c in ("vanilla+pc", "ours-recompute", "ours-shared")) > 0
    md = table(rows)
    assert "ours-shared snapkv@0.2" in md and "ours-reuse snapkv@0.2" in md and "TTFT ×vanilla t2" in md


def test_later_turns_grow_the_prompt_and_vanilla_hits_the_previous_turn(result: dict[str, Any]) -> None:
    van = _records(result, "vanilla+pc")
    for c in range(N_CONV):
        one, two = van[c, 1], van[c, 2]
        assert two["prompt_tokens"] > one["prompt_tokens"] and one["num_cached_tokens"] == 0
        # Turn 1's whole blocks are in the cache (the images and more).
        assert two["num_cached_tokens"] >= one["prompt_tokens"] - one["prompt_tokens"] % 16 > 0
        assert two["num_cached_tokens"] > two["image_prefix"]
        # Uncompressed: every prompt token in every layer is held.
        assert all(
            r["held_token_layers"] >= r["prompt_token_layers"] and r["kv_kept"] is None for r in (one, two)
        )


def test_recompute_never_hits_and_compresses_every_turn(result: dict[str, Any]) -> None:
    van = _records(result, "vanilla+pc")
    for key, r in _records(result, "ours-recompute").items():
        assert r["num_cached_tokens"] == 0 and r["shared_prefix"] == 0
        assert r["kv_kept"] is not None and r["kv_kept"] < 0.5
        assert r["held_token_layers"] < van[key]["held_token_layers"] / 2


def test_shared_images_are_hit_from_turn_two_and_hold_at_least_recompute(result: dict[str, Any]) -> None:
    rec = _records(result, "ours-recompute")
    for (c, turn), r in _records(result, "ours-shared").items():
        assert r["image_prefix"] >= IMAGES * 64 - 16 and r["shared_prefix"] == r["image_prefix"]
        if turn == 1:
            assert r["num_cached_tokens"] == 0
        else:
            assert r["num_cached_tokens"] >= r["image_prefix"]
        assert r["held_token_layers"] >= rec[c, turn]["held_token_layers"]
        # The exact prefix is held: at least the images' token-layers.
        layers = r["prompt_token_layers"] // r["prompt_tokens"]
        assert r["held_token_layers"] >= r["image_prefix"] * layers


def test_reuse_continues_the_previous_turns_compressed_cache(result: dict[str, Any]) -> None:
    van, shared = _records(result, "vanilla+pc"), _records(result, "ours-shared")
    for (c, turn), r in _records(result, "ours-reuse").items():
        if turn == 1:
            assert r["reused"] == 0 and r["kv_kept"] is not None and r["shared_prefix"] == 0
            continue
        one = _records(result, "ours-reuse")[c, 1]
        # Turn 1's prompt (whole blocks) and more come from its compressed cache: the hit covers it too.
        assert r["reused"] >= one["prompt_tokens"] - one["prompt_tokens"] % 16 >= r["image_prefix"] > 0
        assert r["num_cached_tokens"] >= r["reused"] and r["kv_kept"] is None
        # Turn 1 compressed its images too: less than vanilla, and than keeping the images exact.
        assert r["held_token_layers"] < shared[c, turn]["held_token_layers"]
        assert r["held_token_layers"] < van[c, turn]["held_token_layers"]


def test_shared_reuse_keeps_the_images_exact_and_continues_the_previous_turn(result: dict[str, Any]) -> None:
    both = _records(result, "ours-shared-reuse")
    for (c, turn), r in both.items():
        assert r["shared_prefix"] == r["image_prefix"] > 0
        if turn > 1:
            one = both[c, 1]
            assert r["reused"] >= one["prompt_tokens"] - one["prompt_tokens"] % 16
            layers = r["prompt_token_layers"] // r["prompt_tokens"]
            assert r["held_token_layers"] >= r["image_prefix"] * layers
