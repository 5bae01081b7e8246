"""Dense oracle: a Hugging Face model run with a KV policy on a dense, per-layer cache (no vLLM import)."""

from vllm_kvmm.reference.dense import DenseReference, ReferenceOutput
from vllm_kvmm.reference.prompts import PromptInput, prompt_from_messages, prompt_from_text, vision_token_ids

__all__ = [
    "DenseReference",
    "PromptInput",
    "ReferenceOutput",
    "prompt_from_messages",
    "prompt_from_text",
    "vision_token_ids",
]
