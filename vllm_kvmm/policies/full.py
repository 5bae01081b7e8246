"""``full``: no compression. The identity every other policy is checked against."""

from __future__ import annotations

from typing import ClassVar

from pydantic import field_validator

from vllm_kvmm.policies.base import KVPolicy


class Full(KVPolicy):
    """Keeps every token; vLLM behaves exactly as without the extension."""

    name: ClassVar[str] = "full"
    summary: ClassVar[str] = "no compression: every KV entry is kept (the identity baseline)"

    @field_validator("budget")
    @classmethod
    def _only_one(cls, v: float) -> float:
        if v != 1.0:
            raise ValueError(f"policy 'full' keeps every token; budget must be 1.0, got {v}")
        return v

    @property
    def compresses(self) -> bool:
        return False
