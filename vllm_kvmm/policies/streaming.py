"""``streamingllm``: attention sinks plus a sliding window (Xiao et al., ICLR 2024).

Keeps the first ``sink_tokens`` tokens and the most recent ``B − sink_tokens``. Positions are NOT re-assigned
(the original's pos-shift re-rotates keys; we store keys post-RoPE and never re-rotate), which is what
KVCache-Factory's prefill variant does too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from pydantic import Field

from vllm_kvmm.ops import LayerStats
from vllm_kvmm.policies.base import PromptInfo
from vllm_kvmm.policies.decode import DecodeSpec
from vllm_kvmm.policies.parts import DecodeCadence, Sinks


class StreamingLLM(Sinks, DecodeCadence):
    name: ClassVar[str] = "streamingllm"
    summary: ClassVar[str] = "attention sinks + most recent tokens, no scoring (StreamingLLM)"

    sink_tokens: int = Field(4, ge=0, description="leading tokens always kept (attention sinks)")

    def decode_rule(self, info: PromptInfo, interval: int) -> DecodeSpec:
        # The window slides: the sinks and the newest tokens stay, whatever their scores.
        return DecodeSpec("window", interval, recent=0, sinks=self.sink_tokens)

    def scores(self, stats: Sequence[LayerStats | None], info: PromptInfo, layer: int) -> torch.Tensor:
        # Later tokens rank higher, so the prefix keeps its most recent tokens.
        pos = torch.arange(info.num_tokens, dtype=torch.float32)
        return pos.expand(info.num_kv_heads, -1)
