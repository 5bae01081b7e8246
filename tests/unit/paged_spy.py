"""A FlashAttention-layout accessor that records which of its reads were called (unit tests of the worker)."""

from __future__ import annotations

from typing import Any

from vllm_kvmm.vllm_ext.paged_kv import FlashPagedKV


class SpyPagedKV(FlashPagedKV):
    """:class:`FlashPagedKV` on CPU tensors; ``calls``: ``read`` / ``read_keys`` / ``gather`` /
    ``gather_keys`` / ``write``, in order."""

    def __init__(self, block_size: int, head_size: int) -> None:
        super().__init__(block_size, head_size)
        self.calls: list[str] = []

    def read(self, *a: Any) -> Any:
        self.calls.append("read")
        return super().read(*a)

    def read_keys(self, *a: Any) -> Any:
        self.calls.append("read_keys")
        return super().read_keys(*a)

    def gather(self, *a: Any) -> Any:
        self.calls.append("gather")
        return super().gather(*a)

    def gather_keys(self, *a: Any) -> Any:
        self.calls.append("gather_keys")
        return super().gather_keys(*a)

    def write(self, *a: Any) -> None:
        self.calls.append("write")
        super().write(*a)
