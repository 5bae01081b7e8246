"""Tiny random-weight image-tiling models (InternVL, LLaVA-NeXT, LLaVA-OneVision) as Hugging Face folders.

Each splits an image into several tiles of the vision tower's input size plus a whole-image view, so an
image's token count depends on its size and aspect ratio: the prompt's placeholder count is the processor's
computation, in vLLM and in transformers alike. The same conventions as :mod:`vllm_kvmm.models.tiny`:
the SmolLM2 tokenizer, ``head_dim = 32`` with GQA, float32 weights drawn after ``torch.manual_seed(seed)``
with ``initializer_range = 0.1``; small tiles keep a two-image prompt at a few hundred tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vllm_kvmm.models.folders import write_folder_atomically
from vllm_kvmm.models.tiny import (
    _INIT_RANGE,
    _legacy_clip_keys,
    _llama_kwargs,
    _save_model,
    _tokenizer,
    chat_template,
)

__all__ = ["build_tiny_internvl", "build_tiny_llava_next", "build_tiny_llava_onevision"]

_NOTE = "built by vllm_kvmm.models.tiny_tiling"

# InternVL's named special tokens: the processor reads them from the tokenizer's attributes.
_INTERNVL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


def build_tiny_internvl(
    dest: Path,
    *,
    seed: int = 0,
    num_layers: int = 4,
    image_size: int = 112,
    max_tiles: int = 6,
    tokenizer: Any | None = None,
) -> Path:
    """Random HF-format ``InternVLForConditionalGeneration``: InternViT tower (patch 14, hidden 64, 2 layers,
    layer scale) + pixel-shuffle projector + tiny Qwen2. vLLM 0.26 serves this architecture with its
    ``InternS1ForConditionalGeneration`` (``interns1.py``).

    An image is cut into 1 to ``max_tiles`` tiles of ``image_size`` px on the grid closest to its aspect
    ratio, plus a thumbnail of the whole image when there are several; each tile gives
    ``(image_size / 14)² / 4`` tokens (112 px: 8×8 patches, pixel-shuffled to 16 tokens), written as
    ``<img>`` + ``<IMG_CONTEXT>`` × 16·tiles + ``</img>``; only the ``<IMG_CONTEXT>`` tokens carry features.
    """
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    tok = _tokenizer(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": list(_INTERNVL_TOKENS.values())})
    # InternVLProcessor reads ``tokenizer.start_image_token`` etc.; registering them as named special
    # tokens also writes them to tokenizer_config.json, where both transformers and vLLM find them again.
    tok._set_model_specific_special_tokens(_INTERNVL_TOKENS)
    patch = 14
    tokens_per_tile = (image_size // patch) ** 2 // 4  # downsample_ratio 0.5 in both directions

    def write(tmp: Path) -> None:
        text = _llama_kwargs(num_layers, len(tok), tok)
        text.pop("head_dim")  # Qwen2 derives it from hidden_size / heads (= 32)
        vision = {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": [image_size, image_size],
            "patch_size": [patch, patch],
            "initializer_range": _INIT_RANGE,
        }
        config = InternVLConfig(
            vision_config=vision,
            text_config={"model_type": "qwen2", **text},
            image_token_id=tok.convert_tokens_to_ids(_INTERNVL_TOKENS["context_image_token"]),
            image_seq_length=tokens_per_tile,
            downsample_ratio=0.5,
            tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config).to(torch.float32).eval()
        _save_model(model, tok, tmp)
        template = chat_template("<IMG_CONTEXT>\n", "<video>\n")
        tok.chat_template = template
        size = {"height": image_size, "width": image_size}
        processor = InternVLProcessor(
            image_processor=GotOcr2ImageProcessor(
                size=size, crop_to_patches=True, min_patches=1, max_patches=max_tiles
            ),
            tokenizer=tok,
            video_processor=InternVLVideoProcessor(size=size),
            image_seq_length=tokens_per_tile,
            chat_template=template,
        )
        processor.save_pretrained(tmp)

    return write_folder_atomically(dest, write, _NOTE)


def _pinpoints(tile: int, max_tiles: int) -> list[list[int]]:
    """Every ``[height, width]`` grid of ``tile`` px tiles with at most ``max_tiles`` tiles."""
    return [
        [rows * tile, cols * tile]
        for rows in range(1, max_tiles + 1)
        for cols in range(1, max_tiles + 1)
        if rows * cols <= max_tiles
    ]


def build_tiny_llava_next(
    dest: Path,
    *,
    seed: int = 0,
    num_layers: int = 4,
    image_size: int = 56,
    max_tiles: int = 4,
    tokenizer: Any | None = None,
) -> Path:
    """Random ``LlavaNextForConditionalGeneration``: CLIP tower (patch 14, hidden 64, 2 layers) + tiny Llama.

    "anyres": an image is resized (aspect kept, padded) to the best of the grids of up to ``max_tiles``
    tiles of ``image_size`` px and cut into them, plus one base tile of the whole image. Each tile gives
    ``(image_size / 14)²`` features (56 px: 4×4, CLIP's CLS dropped); the grid's features lose the rows or
    columns that are only padding and get one ``image_newline`` per row, all as ``<image>`` tokens.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = _tokenizer(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    patch = 14
    pinpoints = _pinpoints(image_size, max_tiles)

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
        config = LlavaNextConfig(
            vision_config=vision,
            text_config=LlamaConfig(**_llama_kwargs(num_layers, len(tok), tok)),
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            image_grid_pinpoints=pinpoints,
            image_seq_length=(image_size // patch) ** 2,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(config).to(torch.float32).eval()
        _save_model(model, tok, tmp)
        _legacy_clip_keys(tmp)
        template = chat_template("<image>\n")
        tok.chat_template = template
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=pinpoints,
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=patch,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS token
            chat_template=template,
            image_token="<image>",
        )
        processor.save_pretrained(tmp)

    return write_folder_atomically(dest, write, _NOTE)


def build_tiny_llava_onevision(
    dest: Path,
    *,
    seed: int = 0,
    num_layers: int = 4,
    image_size: int = 56,
    max_tiles: int = 4,
    tokenizer: Any | None = None,
) -> Path:
    """Random ``LlavaOnevisionForConditionalGeneration``: SigLIP tower (patch 14, hidden 64, 2 layers, no
    CLS) + tiny Qwen2.

    Images: "anyres" tiling as in :func:`build_tiny_llava_next` (grids of up to ``max_tiles`` tiles of
    ``image_size`` px plus the base tile, ``(image_size / 14)²`` features each). Video frames are resized
    to one tile and their features pooled 2×2 (56 px: 2×2 = 4 tokens a frame), plus one newline token per
    video, all ``<video>`` tokens.
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        SiglipVisionConfig,
    )

    tok = _tokenizer(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    patch = 14
    pinpoints = _pinpoints(image_size, max_tiles)

    def write(tmp: Path) -> None:
        text = _llama_kwargs(num_layers, len(tok), tok)
        text.pop("head_dim")  # Qwen2 derives it from hidden_size / heads (= 32)
        vision = SiglipVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
            vision_use_head=False,  # LLaVA-OneVision reads the patch features, never SigLIP's pooled head
            initializer_range=_INIT_RANGE,
        )
        config = LlavaOnevisionConfig(
            vision_config=vision,
            text_config={"model_type": "qwen2", **text},
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            video_token_index=tok.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=pinpoints,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config).to(torch.float32).eval()
        _save_model(model, tok, tmp)
        _legacy_clip_keys(tmp)  # the same prefix vLLM's SigLIP tower expects as its CLIP one
        template = chat_template("<image>\n", "<video>\n")
        tok.chat_template = template
        size = {"height": image_size, "width": image_size}
        processor = LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
            tokenizer=tok,
            video_processor=LlavaOnevisionVideoProcessor(size=size),
            num_image_tokens=(image_size // patch) ** 2,
            vision_feature_select_strategy="full",
            chat_template=template,
        )
        processor.save_pretrained(tmp)

    return write_folder_atomically(dest, write, _NOTE)
