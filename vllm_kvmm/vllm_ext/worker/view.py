"""The compact read view: per compressed request, the block table row and length attention reads.

After compaction a request's group reads logical blocks ``live ++ [tail, …)``; the metadata builder
swaps that view into vLLM's ``CommonAttentionMetadata`` for the stock kernel (backend_common.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from vllm_kvmm.vllm_ext import internals

if TYPE_CHECKING:
    from vllm_kvmm.vllm_ext.worker.state import WorkerState

__all__ = ["CompactView", "Signature", "compact_metadata", "compact_view", "view_signature"]

# ``(row, live logical blocks, tail)`` of every compacted row of a step, in row order.
Signature = tuple[tuple[int, tuple[int, ...], int], ...]


@dataclass(frozen=True)
class CompactView:
    """A group's compact block table and lengths; ``shift`` (CPU) is what each row's length lost, and
    ``index`` (on the table's device) the gather that turns any group's table with this view compact."""

    table: torch.Tensor
    seq_lens: torch.Tensor
    shift: torch.Tensor
    index: torch.Tensor


def view_signature(state: WorkerState, group: int) -> Signature:
    """The rows of this step compacted in ``group`` (empty: none, the stock metadata applies)."""
    out = []
    for i, r in enumerate(state.rows.req_ids):
        st = state.requests.get(r)
        if st is not None and group in st.compact:
            out.append((i, *st.compact[group]))
    return tuple(out)


def compact_view(
    signature: Signature, block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int
) -> CompactView:
    """Per-row ``row[live] ++ row[tail:]`` and ``seq_len − (tail − len(live))·bs`` for compacted rows.

    Built as one gather on the table's device from an index made on the CPU, so a step costs one
    host-to-device copy per group and no device sync.
    """
    n_rows, width = block_table.shape
    index = torch.arange(width).repeat(n_rows, 1)
    shift = torch.zeros(n_rows, dtype=torch.long)
    for i, live, tail in signature:
        keep = len(live)
        index[i, :keep] = torch.tensor(live, dtype=torch.long)
        # Columns past the end of the shortened row repeat its last block; the kernel never reads them.
        index[i, keep:] = torch.arange(tail, tail + width - keep).clamp_max(width - 1)
        shift[i] = (tail - keep) * block_size
    dev = block_table.device
    index = index.to(dev, non_blocking=True)
    lens = seq_lens - shift[: seq_lens.shape[0]].to(dev, dtype=seq_lens.dtype, non_blocking=True)
    return CompactView(table=torch.gather(block_table, 1, index), seq_lens=lens, shift=shift, index=index)


def compact_metadata(cm: Any, view: CompactView) -> Any:
    """``CommonAttentionMetadata`` with a group's compact view, keeping every CPU-side copy consistent.

    ``max_seq_len`` stays the uncompacted maximum: an upper bound is all kernels need, and computing the
    exact one would read the device.
    """
    return internals.replace_common_metadata(cm, view.table, view.seq_lens, view.shift)
