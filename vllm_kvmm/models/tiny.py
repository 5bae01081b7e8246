"""Tiny random-weight models (Llama, LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen3-VL) saved as Hugging Face folders.

They exercise the mechanics (GQA, image placeholders, M-RoPE, per-layer caches) in tests and in the
vLLM CPU build, where a real multimodal checkpoint cannot be downloaded. All of them:

* use the real SmolLM2 tokenizer (49152 tokens, ChatML template), plus the model's special tokens;
* have ``head_dim = 32`` (vLLM's CPU attention needs ``head_dim >= 32``) and GQA (2 KV heads of 4);
* are float32 and deterministic for a given ``seed`` (weights drawn after ``torch.manual_seed(seed)``);
* load in transformers (``AutoModelForCausalLM`` / ``AutoModelForImageTextToText`` + ``AutoProcessor``)
  and in vLLM 0.26 CPU.

Weights use ``initializer_range = 0.1`` (5× the usual 0.02) so that logits are far from ties: greedy
tokens then agree between implementations whose float32 rounding differs (HF vs vLLM).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from vllm_kvmm.models.folders import write_folder_atomically
from vllm_kvmm.models.smollm2 import load_smollm2_tokenizer

__all__ = [
    "build_tiny_llama",
    "build_tiny_llava",
    "build_tiny_qwen2vl",
    "build_tiny_qwen3vl",
    "build_tiny_qwen25vl",
]

_INIT_RANGE = 0.1
HIDDEN = 128
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 32
INTERMEDIATE = 256
MAX_POSITIONS = 4096

# ChatML like SmolLM2's own template; ``image_text`` is what one {"type": "image"} item renders to,
# ``video_text`` one {"type": "video"} item.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ 'IMAGE_TEXT' }}"
    "{% elif item['type'] == 'video' %}{{ 'VIDEO_TEXT' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_template(image_text: str, video_text: str = "") -> str:
    """The ChatML template of the tiny models; an image item renders to ``image_text``, a video item to
    ``video_text`` (nothing for models without video)."""
    return _CHAT_TEMPLATE.replace("IMAGE_TEXT", image_text).replace("VIDEO_TEXT", video_text)


def _tokenizer(tokenizer: Any | None) -> Any:
    # A private copy: builders add special tokens to it.
    return copy.deepcopy(tokenizer) if tokenizer is not None else load_smollm2_tokenizer()


def _llama_kwargs(num_layers: int, vocab_size: int, tok: Any) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": num_layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": _INIT_RANGE,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def _save_model(model: torch.nn.Module, tok: Any, tmp: Path) -> None:
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(tmp)


def build_tiny_llama(dest: Path, *, num_layers: int = 4, seed: int = 0, tokenizer: Any | None = None) -> Path:
    """Random ``LlamaForCausalLM``: hidden 128, 4 heads × 32, 2 KV heads, SmolLM2 vocabulary, 4k context.

    ``tokenizer``: a SmolLM2 tokenizer to reuse (copied); loaded with :func:`load_smollm2_tokenizer` if
    omitted.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(tokenizer)

    def write(tmp: Path) -> None:
        config = LlamaConfig(**_llama_kwargs(num_layers, len(tok), tok))
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
        _save_model(model, tok, tmp)
        tok.save_pretrained(tmp)

    return write_folder_atomically(dest, write, "built by vllm_kvmm.models.tiny")


def build_tiny_llava(
    dest: Path, *, seed: int = 0, num_layers: int = 4, image_size: int = 112, tokenizer: Any | None = None
) -> Path:
    """Random ``LlavaForConditionalGeneration``: CLIP tower (patch 14, hidden 64, 2 layers) + tiny Llama.

    An image is resized/cropped to ``image_size`` (112 → 8×8 = 64 patches; the CLS feature is dropped by
    the ``default`` select strategy), so the processor expands each ``<image>`` into 64 image tokens.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = _tokenizer(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token_id = tok.convert_tokens_to_ids("<image>")
    patch = 14

    def write(tmp: Path) -> None:
        vision = CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            projection_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
            initializer_range=_INIT_RANGE,
        )
        text = LlamaConfig(**_llama_kwargs(num_layers, len(tok), tok))
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=image_token_id,
            image_seq_length=(image_size // patch) ** 2,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            projector_hidden_act="gelu",
        )
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
        _save_model(model, tok, tmp)
        _legacy_clip_keys(tmp)
        template = chat_template("<image>\n")
        tok.chat_template = template
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            do_center_crop=True,
            do_convert_rgb=True,
        )
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=patch,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS token
            chat_template=template,
            image_token="<image>",
        )
        processor.save_pretrained(tmp)

    return write_folder_atomically(dest, write, "built by vllm_kvmm.models.tiny")


def _legacy_clip_keys(folder: Path) -> None:
    """Rename ``vision_tower.*`` to ``vision_tower.vision_model.*`` in the saved weights.

    transformers 5.16 saves the CLIP tower without its ``vision_model.`` prefix, which vLLM 0.26's
    LLaVA loader rejects ("no module or parameter named 'vision_tower.embeddings'"). The prefixed layout
    is the one of the published llava-hf checkpoints, and transformers maps it back on load.
    """
    from safetensors.torch import load_file, save_file

    for shard in folder.glob("*.safetensors"):
        sd = load_file(shard)
        renamed = {
            (
                "vision_tower.vision_model." + k[len("vision_tower.") :]
                if k.startswith("vision_tower.")
                else k
            ): v
            for k, v in sd.items()
        }
        save_file(renamed, shard, metadata={"format": "pt"})


QWEN2VL_SPECIAL = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def build_tiny_qwen2vl(
    dest: Path,
    *,
    seed: int = 0,
    num_layers: int = 4,
    min_pixels: int = 28 * 28 * 4,
    max_pixels: int = 28 * 28 * 64,
    tokenizer: Any | None = None,
) -> Path:
    """Random ``Qwen2VLForConditionalGeneration``: 2-block vision tower (patch 14, merge 2) + tiny Qwen2.

    M-RoPE sections ``[4, 6, 6]`` cover ``head_dim / 2 = 16`` frequencies (temporal, height, width).
    Images and video frames are resized to between ``min_pixels`` and ``max_pixels`` (4 to 64 tokens of
    28×28 px; a video's frames go two at a time into one temporal patch).
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    vision = {"depth": 2, "embed_dim": 64, "hidden_size": HIDDEN, "mlp_ratio": 2, "num_heads": 2}
    return _build_tiny_qwen_vl(
        dest, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, vision,
        seed=seed, num_layers=num_layers, min_pixels=min_pixels, max_pixels=max_pixels, tokenizer=tokenizer,
    )  # fmt: skip


def build_tiny_qwen25vl(
    dest: Path,
    *,
    seed: int = 0,
    num_layers: int = 4,
    min_pixels: int = 28 * 28 * 4,
    max_pixels: int = 28 * 28 * 64,
    tokenizer: Any | None = None,
) -> Path:
    """Random ``Qwen2_5_VLForConditionalGeneration``: Qwen2.5-VL's vision tower (window attention in block
    0, full attention in block 1, RMSNorm, gated MLP) + tiny Qwen2 with M-RoPE ``[4, 6, 6]``; the same
    processor sizes as :func:`build_tiny_qwen2vl`.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    vision = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "out_hidden_size": HIDDEN,
        "window_size": 56,  # 2×2 merged patches a window: images of 4 to 64 tokens span several windows
        "fullatt_block_indexes": [1],
        # Frames without metadata count as 24 fps: 2/24 s per temporal patch. transformers 5.16 truncates
        # that to an integer before scaling (int(2/24) = 0) where vLLM scales then floors; at 1 token per
        # second both give every frame of a short video temporal position 0, so HF and vLLM agree.
        "tokens_per_second": 1,
    }
    return _build_tiny_qwen_vl(
        dest, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, vision,
        seed=seed, num_layers=num_layers, min_pixels=min_pixels, max_pixels=max_pixels, tokenizer=tokenizer,
    )  # fmt: skip


def build_tiny_qwen3vl(
    dest: Path,
    *,
    seed: int = 0,
    num_layers: int = 4,
    min_pixels: int = 32 * 32 * 4,
    max_pixels: int = 32 * 32 * 64,
    tokenizer: Any | None = None,
) -> Path:
    """Random ``Qwen3VLForConditionalGeneration``: Qwen3-VL's vision tower (patch 16, merge 2, learned
    position embeddings, DeepStack features of block 0 added to the first text layer) + a tiny Qwen3 text
    model (q/k norms) with *interleaved* M-RoPE ``[6, 5, 5]`` over ``head_dim / 2 = 16`` frequencies.

    Images and video frames of 4 to 64 tokens of 32×32 px; a video's frames go two at a time into one
    temporal patch, each patch after a ``<t seconds>`` timestamp in the prompt (Qwen3-VL's video format).
    """
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tok = _tokenizer(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN2VL_SPECIAL)})
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL}

    def write(tmp: Path) -> None:
        text = _llama_kwargs(num_layers, len(tok), tok)
        for key in ("tie_word_embeddings", "bos_token_id", "eos_token_id"):
            text.pop(key)
        rope = {"rope_type": "default", "rope_theta": 10000.0}
        text["rope_parameters"] = {**rope, "mrope_section": [6, 5, 5], "mrope_interleaved": True}
        vision = {
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": HIDDEN,
            "num_position_embeddings": 256,  # a 16×16 grid, interpolated to each image's patches
            "deepstack_visual_indexes": [0],
            "initializer_range": _INIT_RANGE,
        }
        config = Qwen3VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config).to(torch.float32).eval()
        _save_model(model, tok, tmp)
        template = chat_template(
            "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
        )
        tok.chat_template = template
        size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        processor = Qwen3VLProcessor(
            image_processor=Qwen2VLImageProcessor(size=size, patch_size=16, merge_size=2),
            tokenizer=tok,
            # Qwen3-VL bounds a video's pixels over all its frames: room for 16 frames of max_pixels.
            video_processor=Qwen3VLVideoProcessor(
                size={**size, "longest_edge": 16 * max_pixels},
                patch_size=16,
                merge_size=2,
                do_sample_frames=False,
            ),
            chat_template=template,
        )
        processor.save_pretrained(tmp)

    return write_folder_atomically(dest, write, "built by vllm_kvmm.models.tiny")


def _build_tiny_qwen_vl(
    dest: Path,
    config_cls: Any,
    model_cls: Any,
    processor_cls: Any,
    vision: dict[str, Any],
    *,
    seed: int,
    num_layers: int,
    min_pixels: int,
    max_pixels: int,
    tokenizer: Any | None,
) -> Path:
    """The Qwen-VL family's common part: tokens, tiny Qwen2 text model, processor with images and video."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tok = _tokenizer(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN2VL_SPECIAL)})
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL}

    def write(tmp: Path) -> None:
        text = _llama_kwargs(num_layers, len(tok), tok)
        text.pop("head_dim")  # Qwen2 derives it from hidden_size / heads (= 32)
        text.pop("tie_word_embeddings")
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
        common = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
        config = config_cls(
            text_config=text,
            vision_config={**vision, **common, "initializer_range": _INIT_RANGE},
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32).eval()
        _save_model(model, tok, tmp)
        template = chat_template(
            "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
        )
        tok.chat_template = template
        pix = {"min_pixels": min_pixels, "max_pixels": max_pixels}
        processor = processor_cls(
            image_processor=Qwen2VLImageProcessor(**pix),
            tokenizer=tok,
            video_processor=Qwen2VLVideoProcessor(**pix),
            chat_template=template,
        )
        processor.save_pretrained(tmp)

    return write_folder_atomically(dest, write, "built by vllm_kvmm.models.tiny")
