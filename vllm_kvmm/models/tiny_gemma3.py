"""A tiny random-weight Gemma 3 text model: sliding-window local layers next to global ones.

Gemma 3 interleaves local layers (attention over the last ``sliding_window`` tokens, their own RoPE
base) with global full-attention layers. A KV policy compresses only the global layers; the local ones
keep vLLM's sliding-window KV-cache spec (docs/models.md). The tiny model has five layers, local at
0, 2, 3 and global at 1, 4, so the global layers are not every other one and a layer-index mix-up shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vllm_kvmm.models.folders import write_folder_atomically
from vllm_kvmm.models.tiny import _llama_kwargs, _save_model, _tokenizer

__all__ = ["GEMMA3_LAYER_TYPES", "GEMMA3_SLIDING_WINDOW", "build_tiny_gemma3"]

GEMMA3_LAYER_TYPES = (
    "sliding_attention",
    "full_attention",
    "sliding_attention",
    "sliding_attention",
    "full_attention",
)
# Four 16-token blocks: prompts of a few hundred tokens run well past it, so vLLM's sliding-window
# manager frees the local layers' old blocks while the global layers hold (or compress) theirs.
GEMMA3_SLIDING_WINDOW = 64


def build_tiny_gemma3(dest: Path, *, seed: int = 0, tokenizer: Any | None = None) -> Path:
    """Random ``Gemma3ForCausalLM``: hidden 128, 4 heads × 32, 2 KV heads, layers :data:`GEMMA3_LAYER_TYPES`,
    sliding window :data:`GEMMA3_SLIDING_WINDOW`, the SmolLM2 vocabulary and chat template."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = _tokenizer(tokenizer)

    def write(tmp: Path) -> None:
        kw = _llama_kwargs(len(GEMMA3_LAYER_TYPES), len(tok), tok)
        config = Gemma3TextConfig(
            **kw,
            layer_types=list(GEMMA3_LAYER_TYPES),
            sliding_window=GEMMA3_SLIDING_WINDOW,
            query_pre_attn_scalar=kw["head_dim"],
        )
        torch.manual_seed(seed)
        model = Gemma3ForCausalLM(config).to(torch.float32).eval()
        _save_model(model, tok, tmp)
        tok.save_pretrained(tmp)

    return write_folder_atomically(dest, write, "built by vllm_kvmm.models.tiny_gemma3")
