"""Token-slot reads and writes of the paged caches round-trip exactly, for every dtype and layout; a per-head
gather, a keys-only read and a keys-only gather return exactly what a full read holds at those places."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size,head_size", [(16, 64), (32, 128), (128, 64), (16, 512), (32, 256)])
def test_cpu_round_trip(dtype: torch.dtype, block_size: int, head_size: int) -> None:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from vllm_kvmm.vllm_ext.paged_kv import CpuPagedKV

    isa = _get_attn_isa(dtype, block_size, head_size)
    io = CpuPagedKV(dtype, block_size, head_size, isa)
    h, n = 2, 2 * block_size + 5
    cache = torch.zeros(6, h, block_size, 2 * head_size, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(n, h, head_size, generator=g).to(dtype)
    v = torch.randn(n, h, head_size, generator=g).to(dtype)
    blocks = torch.tensor([4, 1, 3])  # out of order, as a block table is
    slots = (blocks.repeat_interleave(block_size) * block_size + torch.arange(block_size).repeat(3))[:n]
    io.write(cache, slots, k, v)
    k2, v2 = io.read(cache, blocks, n)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    assert cache[[0, 2, 5]].abs().sum() == 0  # nothing else was touched
    assert torch.equal(io.read_keys(cache, blocks, n), k)
    _check_gather(io, cache, slots, k, v)


def _check_gather(
    io: object, cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """``gather`` at per-head positions (different tokens per head, unordered, repeated) equals ``k``/``v``
    there."""
    n, h = k.shape[0], k.shape[1]
    pos = torch.stack([torch.tensor([n - 1, 0, 7, 7, 3]), torch.tensor([2, n - 2, 0, 5, 1])])[:h]  # [H, K]
    gk, gv = io.gather(cache, slots[pos])  # type: ignore[attr-defined]
    assert gk.shape == (pos.shape[1], h, k.shape[2])
    for head in range(h):
        assert torch.equal(gk[:, head], k[pos[head], head]) and torch.equal(gv[:, head], v[pos[head], head])
    # Whole tokens (every head's key at the same slots), as a decode-time flush reads them.
    tokens = torch.tensor([n - 1, 0, 7, 7, 3, 2])
    assert torch.equal(io.gather_keys(cache, slots[tokens]), k[tokens])  # type: ignore[attr-defined]


def test_flash_layout_round_trip() -> None:
    from vllm_kvmm.vllm_ext.paged_kv import FlashPagedKV

    bs, h, d, n = 16, 2, 64, 40
    # FlashAttention's logical shape [num_blocks, H, bs, 2·d] over an NHD memory order.
    cache = torch.zeros(5, bs, h, 2 * d).permute(0, 2, 1, 3)
    io = FlashPagedKV(bs, d)
    k, v = torch.randn(n, h, d), torch.randn(n, h, d)
    blocks = torch.tensor([3, 0, 4])
    slots = (blocks.repeat_interleave(bs) * bs + torch.arange(bs).repeat(3))[:n]
    io.write(cache, slots, k, v)
    k2, v2 = io.read(cache, blocks, n)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    key_cache, value_cache = cache.transpose(1, 2).split(d, dim=-1)  # what FlashAttention's forward reads
    assert torch.equal(key_cache[3, 0], k[0]) and torch.equal(value_cache[0, 1], v[bs + 1])
    assert torch.equal(io.read_keys(cache, blocks, n), k)
    _check_gather(io, cache, slots, k, v)
