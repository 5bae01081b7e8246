"""Model folders for speed benchmarks: real architectures, no weights (vLLM's ``load_format="dummy"``).

Text architectures are the language models of the multimodal models the papers evaluate:
``llama2-7b-mha`` (LLaVA-1.5/NeXT-7B: MHA, 32 KV heads, 512 KiB of bf16 KV per token) and
``qwen2-7b-gqa`` (Qwen2-VL-7B: GQA, 4 KV heads, 56 KiB per token). ``images=True`` wraps the text model
in ``LlavaForConditionalGeneration`` with LLaVA-1.5's CLIP ViT-L/14 tower at 336 px (576 image tokens an
image), so prompts carry real image-token spans and modality-aware policies see them. That folder needs a
tokenizer and a processor: the SmolLM2 tokenizer plus ``<image>`` (the text vocabulary becomes its
49,153 tokens instead of Llama-2's 32,064: +0.5 % of a 7B model's per-token work, same KV).

``scale="tiny"`` shrinks every dimension (same code paths) so the CPU test suite can run the benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vllm_kvmm.models.folders import is_complete, write_folder_atomically

__all__ = ["ARCHS", "ModelFolder", "write_model"]

ARCHS: dict[str, dict[str, Any]] = {
    "llama2-7b-mha": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0, torch_dtype="bfloat16",
    ),
    "qwen2-7b-gqa": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, torch_dtype="bfloat16",
        tie_word_embeddings=False, sliding_window=None, use_sliding_window=False,
    ),
}  # fmt: skip

CLIP_L14_336: dict[str, Any] = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
    patch_size=14, projection_dim=768, hidden_act="quick_gelu",
)  # fmt: skip

_TINY_TEXT = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=32,
    max_position_embeddings=8192, torch_dtype="float32",
)  # fmt: skip
_TINY_VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=112,
    patch_size=14, projection_dim=64,
)  # fmt: skip


class ModelFolder:
    """A written folder and what prompts need to know about it."""

    def __init__(self, path: Path, image_token_id: int | None, image_tokens: int, layers: int) -> None:
        self.path = path
        self.image_token_id = image_token_id  # None: text-only
        self.image_tokens = image_tokens  # tokens one image expands into
        self.layers = layers


def _text_config(arch: str, scale: str) -> dict[str, Any]:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHS)}")
    cfg = dict(ARCHS[arch])
    if scale == "tiny":
        mha = cfg["num_key_value_heads"] == cfg["num_attention_heads"]
        cfg.update(_TINY_TEXT, num_key_value_heads=4 if mha else 2)
    elif scale != "full":
        raise ValueError(f"scale must be 'full' or 'tiny', not {scale!r}")
    return cfg


def write_model(root: Path, arch: str, *, images: bool, scale: str = "full") -> ModelFolder:
    """Write (once) the config-only folder of ``arch`` under ``root``; ``images`` wraps it in LLaVA."""
    text = _text_config(arch, scale)
    name = f"{arch}{'-llava' if images else ''}{'-tiny' if scale == 'tiny' else ''}"
    dest = Path(root) / name
    vision = dict(CLIP_L14_336 if scale == "full" else _TINY_VISION)
    n_img = (vision["image_size"] // vision["patch_size"]) ** 2
    if not images:
        if not is_complete(dest):
            write_folder_atomically(dest, lambda tmp: _dump(tmp / "config.json", text), "vllm-kvmm bench")
        return ModelFolder(dest, None, 0, text["num_hidden_layers"])
    if not is_complete(dest):
        write_folder_atomically(dest, lambda tmp: _write_llava(tmp, text, vision), "vllm-kvmm bench")
    image_id = json.loads((dest / "config.json").read_text())["image_token_index"]
    return ModelFolder(dest, image_id, n_img, text["num_hidden_layers"])


def _dump(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=1))


def _write_llava(tmp: Path, text: dict[str, Any], vision: dict[str, Any]) -> None:
    from transformers import AutoConfig, CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaProcessor

    from vllm_kvmm.models.smollm2 import load_smollm2_tokenizer
    from vllm_kvmm.models.tiny import chat_template

    tok = load_smollm2_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = dict(text, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    kind = text.pop("model_type")
    text_cfg = AutoConfig.for_model(kind, **{k: v for k, v in text.items() if k != "architectures"})
    patch, size = vision["patch_size"], vision["image_size"]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=text_cfg,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(size // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        torch_dtype=text.get("torch_dtype", "bfloat16"),
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(tmp)
    template = chat_template("<image>\n")
    tok.chat_template = template
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True
        ),
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
        image_token="<image>",
    )
    processor.save_pretrained(tmp)
