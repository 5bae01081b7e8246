"""Read and write whole token slots of a layer's paged KV cache, whatever the backend's memory layout.

Writes always go through the backend's own cache-write kernel (the one vLLM uses for new tokens), so a
compacted token is stored exactly as if it had been computed there. Reads need the layout: the CPU
attention stores keys in an ISA-specific packed order inside each (block, head) page, which we learn
once by *probing* — writing known values through the kernel and seeing where they land — instead of
hard-coding it, so a different ISA or a vLLM change cannot silently corrupt a read.
"""

from __future__ import annotations

from functools import cache

import torch

__all__ = ["CpuPagedKV", "FlashPagedKV", "flat_slots"]


def flat_slots(ids: torch.Tensor, pos: torch.Tensor, bs: int) -> torch.Tensor:
    """Flat cache slots ``block_id·bs + offset`` of logical positions ``pos`` in a row of blocks ``ids``
    (``[nb]``; or rows ``[L, nb]`` with positions ``[n]``: ``[L, n]``, one row of slots per row of blocks)."""
    return ids[..., pos // bs] * bs + pos % bs


@cache
def _cpu_page_orders(
    dtype: torch.dtype, block_size: int, head_size: int, isa: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[bs·d]`` storage offsets of logical ``(token, dim)`` inside one (block, head) page, for K and V.

    Keys are packed for the vector ISAs, and values too for AMX; both orders are learned the same way.
    """
    from vllm import _custom_ops as ops

    if block_size > 256:
        raise ValueError(f"block size {block_size} > 256 cannot be probed exactly in {dtype}")

    def probe(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype)
        k_cache, v_cache = kv.view(1, 1, 2 * block_size, head_size).chunk(2, dim=2)
        x = values.view(block_size, 1, head_size).to(dtype)
        ops.cpu_attn_reshape_and_cache(x, x, k_cache, v_cache, torch.arange(block_size), isa)
        return k_cache[0, 0].reshape(-1).float().round().long(), v_cache[0, 0].reshape(
            -1
        ).float().round().long()

    # Small integers only (< 256: exact in bf16/fp16): which token, and which dim (as dim // 128 and
    # dim % 128, so head sizes up to 512 stay exact), sits at each storage offset.
    tok = torch.arange(block_size).repeat_interleave(head_size).float()
    dim = torch.arange(head_size).repeat(block_size)
    tk, tv = probe(tok)
    lk, lv = probe((dim % 128).float())
    hk, hv = probe((dim // 128).float())
    orders = []
    for t, lo, hi, name in ((tk, lk, hk, "key"), (tv, lv, hv, "value")):
        logical = t * head_size + hi * 128 + lo
        if not torch.equal(logical.sort().values, torch.arange(block_size * head_size)):
            raise RuntimeError(f"could not probe the CPU {name}-cache layout for isa={isa!r}, dtype={dtype}")
        order = torch.empty_like(logical)
        order[logical] = torch.arange(logical.numel())
        orders.append(order)
    return orders[0], orders[1]


class CpuPagedKV:
    """Token-slot access to one CPU-attention layer cache ``[num_blocks, H_kv, bs, 2·d]``."""

    def __init__(self, dtype: torch.dtype, block_size: int, head_size: int, isa: str) -> None:
        self.block_size = block_size
        self.head_size = head_size
        self.isa = isa
        self.key_order, self.value_order = _cpu_page_orders(dtype, block_size, head_size, isa)

    def _split(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nb, h, bs, _ = kv_cache.shape
        return kv_cache.view(nb, h, 2 * bs, self.head_size).chunk(2, dim=2)

    def read(
        self, kv_cache: torch.Tensor, block_ids: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[n, H_kv, d]`` of the first ``n`` tokens stored in ``block_ids`` (in order)."""
        k_cache, v_cache = self._split(kv_cache)
        return self._unpack(k_cache, block_ids, n, self.key_order), self._unpack(
            v_cache, block_ids, n, self.value_order
        )

    def read_keys(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, n: int) -> torch.Tensor:
        """Keys ``[n, H_kv, d]`` only (:meth:`read` without the values: half the traffic)."""
        return self._unpack(self._split(kv_cache)[0], block_ids, n, self.key_order)

    def _unpack(
        self, cache: torch.Tensor, block_ids: torch.Tensor, n: int, order: torch.Tensor
    ) -> torch.Tensor:
        bs, d = self.block_size, self.head_size
        nb, h = len(block_ids), cache.shape[1]
        x = cache[block_ids].reshape(nb, h, bs * d)[:, :, order].view(nb, h, bs, d)
        return x.permute(0, 2, 1, 3).reshape(-1, h, d)[:n]

    def gather(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[K, H_kv, d]`` at flat slots ``slots`` ``[H_kv, K]`` — a different token per head
        (a compaction's kept set), reading only those tokens' ``d`` elements, never whole pages."""
        bs, d = self.block_size, self.head_size
        return self._gather_half(kv_cache, slots, self.key_order, 0), self._gather_half(
            kv_cache, slots, self.value_order, bs * d
        )

    def gather_keys(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Keys ``[n, H_kv, d]`` of every head at flat slots ``slots`` ``[n]`` (whole tokens)."""
        return self._gather_half(kv_cache, slots.expand(kv_cache.shape[1], -1), self.key_order, 0)

    def _gather_half(
        self, kv_cache: torch.Tensor, slots: torch.Tensor, order: torch.Tensor, half: int
    ) -> torch.Tensor:
        """``[K, H_kv, d]`` of one half (keys: ``half`` 0, values: ``bs·d``) at ``slots`` ``[H_kv, K]``."""
        _, h, bs, _ = kv_cache.shape
        d = self.head_size
        # Flat offsets into the contiguous cache (one 1-D index_select is far faster on the CPU than
        # indexing four dimensions at once): each (block, head) holds its key page, then its value page.
        page = (slots // bs * h + torch.arange(h).unsqueeze(1)) * (2 * bs * d) + half  # [H_kv, K]
        x = kv_cache.view(-1).index_select(0, (page.unsqueeze(-1) + order.view(bs, d)[slots % bs]).view(-1))
        # [K, H_kv, d] contiguous: what write() stores, so a write after it copies nothing.
        return x.view(h, -1, d).transpose(0, 1).contiguous()

    def gather_bytes(self, kv_cache: torch.Tensor, n: int) -> int:
        """Memory :meth:`gather` holds for ``n`` slots (all heads): the keys and values, one half's copy in
        flight, and one half's int64 element offsets (twice: the page order's and their sum)."""
        e = n * self.head_size
        return 3 * e * kv_cache.element_size() + 16 * e

    def write(self, kv_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` ``[n, H_kv, d]`` into flat slots ``block_id·bs + offset`` (``[n]``)."""
        from vllm import _custom_ops as ops

        k_cache, v_cache = self._split(kv_cache)
        ops.cpu_attn_reshape_and_cache(
            k.to(kv_cache.dtype).contiguous(),
            v.to(kv_cache.dtype).contiguous(),
            k_cache,
            v_cache,
            slots.to(torch.long),
            self.isa,
        )


class FlashPagedKV:
    """Token-slot access to one FlashAttention layer cache, logical ``[num_blocks, H_kv, bs, 2·d]``.

    The memory order is plain (keys then values in the last dimension), exactly what FlashAttention's
    forward reads through ``kv_cache.transpose(1, 2).split(d, -1)``, so reads and writes index it directly.
    """

    def __init__(self, block_size: int, head_size: int) -> None:
        self.block_size = block_size
        self.head_size = head_size

    def _split(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)  # [nb, bs, H, d] each
        return k, v

    def read(
        self, kv_cache: torch.Tensor, block_ids: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k_cache, v_cache = self._split(kv_cache)
        ids = block_ids.to(kv_cache.device)
        return self._rows(k_cache, ids, n), self._rows(v_cache, ids, n)

    def read_keys(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, n: int) -> torch.Tensor:
        return self._rows(self._split(kv_cache)[0], block_ids.to(kv_cache.device), n)

    def _rows(self, cache: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
        """The first ``n`` tokens ``[n, H_kv, d]`` of blocks ``ids`` in one half (keys or values)."""
        return cache[ids].reshape(-1, cache.shape[2], self.head_size)[:n]

    def gather(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[K, H_kv, d]`` at flat slots ``slots`` ``[H_kv, K]`` (a token per head)."""
        k_cache, v_cache = self._split(kv_cache)  # [nb, bs, H, d]
        slots = slots.to(kv_cache.device)
        blk, off = slots // self.block_size, slots % self.block_size
        head = torch.arange(slots.shape[0], device=kv_cache.device).unsqueeze(1)
        return k_cache[blk, off, head].transpose(0, 1), v_cache[blk, off, head].transpose(0, 1)

    def gather_keys(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Keys ``[n, H_kv, d]`` of every head at flat slots ``slots`` ``[n]`` (whole tokens)."""
        slots = slots.to(kv_cache.device)
        return self._split(kv_cache)[0][slots // self.block_size, slots % self.block_size]

    def gather_bytes(self, kv_cache: torch.Tensor, n: int) -> int:
        """Memory :meth:`gather` holds for ``n`` slots (all heads): the keys and values and three int64
        indices per slot."""
        return 2 * n * self.head_size * kv_cache.element_size() + 24 * n

    def write(self, kv_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        k_cache, v_cache = self._split(kv_cache)
        slots = slots.to(kv_cache.device)
        blocks, offsets = slots // self.block_size, slots % self.block_size
        k_cache[blocks, offsets] = k.to(kv_cache.dtype)
        v_cache[blocks, offsets] = v.to(kv_cache.dtype)
