"""The keys statistics see: earlier steps' read back from the paged cache, this step's as the backend wrote
them — equal to reading the whole row back, with no read at all for a prompt prefilled in one step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.unit.paged_spy import SpyPagedKV
from vllm_kvmm.vllm_ext.paged_kv import flat_slots
from vllm_kvmm.vllm_ext.worker.stats import _keys

BS, H, D = 4, 2, 32
ROWS = torch.tensor([[5, 2, 7, 0, 0], [3, 1, 6, 4, 8]])  # two requests' block rows (0: unused)


@pytest.mark.parametrize("q_start", [0, 4, 6])
def test_step_keys_come_from_the_forward_and_only_earlier_ones_from_the_cache(q_start: int) -> None:
    g = torch.Generator().manual_seed(q_start)
    seq_len = 17  # row 1 holds positions [0, 17) once this step ran
    cache = torch.zeros(9, BS, H, 2 * D).permute(0, 2, 1, 3)  # logical [blocks, H, bs, 2d]
    io = SpyPagedKV(BS, D)
    stored = torch.randn(seq_len, H, D, generator=g)
    io.write(cache, flat_slots(ROWS[1], torch.arange(seq_len), BS), stored, torch.zeros_like(stored))
    # The step: row 0 decodes one token, row 1 runs positions [q_start, seq_len) (the backend wrote them).
    n_new = seq_len - q_start
    qsl = [0, 1, 1 + n_new]
    key = torch.cat([torch.randn(1, H, D, generator=g), stored[q_start:]])
    engine = SimpleNamespace(block_size=BS, paged=io)
    md = SimpleNamespace(block_table=ROWS)
    io.calls.clear()
    got = _keys(engine, 1, key, cache, md, q_start, qsl, seq_len)
    assert torch.equal(got, io.read_keys(cache, ROWS[1, :5], seq_len))
    assert io.calls == (["read_keys"] if q_start else []) + ["read_keys"]  # the last: the check above
    # No keys from the forward (a layer whose backend gave none): the whole row is read back.
    io.calls.clear()
    assert torch.equal(_keys(engine, 1, None, cache, md, q_start, qsl, seq_len), got)
    assert io.calls == ["read_keys"]
