"""``streamingllm``: attention sinks plus a sliding window (Xiao et al., ICLR 2024).

Keeps the first ``sinks`` tokens and the most recent ``B − sinks``. Positions are NOT re-assigned
(the original's pos-shift re-rotates keys; we store keys post-RoPE and never re-rotate), which is what
KVCache-Factory's prefill variant does too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from pydantic import Field

from vllm_kvmm.ops import LayerStats
from vllm_kvmm.policies.base import KVPolicy, PromptInfo
from vllm_kvmm.policies.decode import DecodeSpec


class StreamingLLM(KVPolicy):
    name: ClassVar[str] = "streamingllm"
    summary: ClassVar[str] = "attention sinks + most recent tokens, no scoring (StreamingLLM)"

    sinks: int = Field(4, ge=0, description="leading tokens always kept")
    decode_interval: int | None = Field(
        None, ge=1, description="slide the window while decoding, every this many tokens (None: prefill only)"
    )

    def decode_spec(self, info: PromptInfo) -> DecodeSpec | None:
        if self.decode_interval is None or not self.compresses:
            return None
        return DecodeSpec("window", self.decode_interval, recent=0, sinks=self.sinks)

    def protected(self, info: PromptInfo, layer: int) -> torch.Tensor:
        mask = torch.zeros(info.num_tokens, dtype=torch.bool)
        mask[: self.sinks] = True
        return mask

    def scores(self, stats: Sequence[LayerStats | None], info: PromptInfo, layer: int) -> torch.Tensor:
        # Later tokens rank higher, so the prefix keeps its most recent tokens.
        pos = torch.arange(info.num_tokens, dtype=torch.float32)
        return pos.expand(info.num_kv_heads, -1)
