"""Model builders: tiny random models load in transformers with the right geometry; SmolLM2 converts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from vllm_kvmm.models import build_tiny_llama, smollm2_gguf_path, verify_smollm2
from vllm_kvmm.reference import prompt_from_messages


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - safe_open is not a dict
    return out


def test_tiny_llama_geometry(tiny_llama_dir: Path, smollm2_tokenizer: Any) -> None:
    cfg = AutoConfig.from_pretrained(tiny_llama_dir)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers) == ("llama", 128, 4)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 32)
    assert cfg.max_position_embeddings == 4096
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert cfg.vocab_size == len(tok) == len(smollm2_tokenizer) == 49152
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


def test_tiny_builders_deterministic_and_idempotent(tmp_path: Path, smollm2_tokenizer: Any) -> None:
    a = build_tiny_llama(tmp_path / "a", num_layers=2, seed=3, tokenizer=smollm2_tokenizer)
    b = build_tiny_llama(tmp_path / "b", num_layers=2, seed=3, tokenizer=smollm2_tokenizer)
    c = build_tiny_llama(tmp_path / "c", num_layers=2, seed=4, tokenizer=smollm2_tokenizer)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert wa.keys() == wb.keys() == wc.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(
        wa["model.layers.0.self_attn.q_proj.weight"], wc["model.layers.0.self_attn.q_proj.weight"]
    )
    # A complete folder is returned untouched; nothing is rewritten.
    before = (a / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_llama(a, num_layers=2, seed=99, tokenizer=smollm2_tokenizer) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == before
    # An incomplete leftover (no completion marker) is replaced by a fresh build.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    build_tiny_llama(broken, num_layers=2, seed=3, tokenizer=smollm2_tokenizer)
    assert all(torch.equal(wa[k], v) for k, v in _weights(broken).items())
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind


def test_tiny_llava_processor_expands_image(tiny_llava_dir: Path, images: list) -> None:
    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir, dtype=torch.float32)
    cfg = model.config
    assert cfg.text_config.head_dim == 32 and cfg.text_config.num_key_value_heads == 2
    assert proc.image_token_id == cfg.image_token_id == proc.tokenizer.convert_tokens_to_ids("<image>")
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Hi"}]}
    ]
    p = prompt_from_messages(proc, msgs, images[:2])
    # 112 px crops in 14 px patches, CLS dropped by the "default" strategy: 8·8 = 64 tokens per image.
    assert int((p.input_ids == cfg.image_token_id).sum()) == 2 * 64
    out = model(input_ids=p.input_ids[None], **p.mm_inputs)  # the feature count must match the tokens
    assert out.logits.shape == (1, p.num_tokens, cfg.text_config.vocab_size)
    # vLLM 0.26 loads the CLIP tower only under the llava-hf key layout.
    keys = _weights(tiny_llava_dir).keys()
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)
    assert not any(k.startswith("vision_tower.") and ".vision_model." not in k for k in keys)


def test_tiny_qwen2vl_ids_and_mrope(tiny_qwen2vl_dir: Path, images: list) -> None:
    proc = AutoProcessor.from_pretrained(tiny_qwen2vl_dir)
    cfg = AutoConfig.from_pretrained(tiny_qwen2vl_dir)
    tok = proc.tokenizer
    for attr, token in [
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ]:
        assert getattr(cfg, attr) == tok.convert_tokens_to_ids(token) != tok.unk_token_id
    text = cfg.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert head_dim == 32 and text.num_key_value_heads == 2
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert text.vocab_size == len(tok)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    p = prompt_from_messages(proc, msgs, images[1:2])
    grid = p.mm_inputs["image_grid_thw"][0]
    assert int((p.input_ids == cfg.image_token_id).sum()) == int(grid.prod()) // 4  # 2×2 merge
    assert 4 <= int(grid.prod()) // 4 <= 64  # min/max_pixels keep images tiny


@pytest.mark.slow
def test_smollm2_converted(smollm2_dir: Path) -> None:
    assert smollm2_gguf_path() is not None
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 8192
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
    assert cfg["dtype"] == "float32"
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.chat_template and tok.eos_token_id == cfg["eos_token_id"] == 2
    assert "Paris" in verify_smollm2(smollm2_dir)
