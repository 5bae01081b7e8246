"""Moving kept tokens inside the paged cache, batched over the layers that share one cache tensor.

With one KV-cache group per layer (the default under a policy) vLLM allocates one tensor that every
layer's cache views, and the groups draw their blocks from one pool, so their block ids never overlap: the
moves of many layers are then one gather and one write, not one of each per layer (a compaction's or a
flush's cost on a GPU is mostly such small launches). With several layers a group (``--kv-groups``) vLLM
allocates one tensor per layer slot of a group, shared by the i-th layers of every group: moves are one
gather and one write per such tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from vllm_kvmm.vllm_ext.worker.layout import EngineLayout

__all__ = ["MOVE_BYTES", "Move", "chunked", "move_kv", "tensor_key"]

# Gathered KV held at once: a run of groups is gathered before any of it is written. One layer's kept
# prefix of an 8k prompt at ρ 0.2 on LLaVA-1.5-7B (32 KV heads, fp16) is ~26 MiB, so all 32 layers at
# once would be a transient of ~0.8 GiB beyond what vLLM budgeted; runs of ~10 such layers stay small.
MOVE_BYTES = 256 << 20

T = TypeVar("T")


@dataclass(frozen=True, slots=True, eq=False)  # tensors: compared by identity
class Move:
    """Copy ``src`` to ``dst`` in one layer's cache: ``src`` ``[H_kv, n]`` flat slots (a token per KV head),
    ``dst`` ``[n]`` flat slots (all heads)."""

    layer: str
    src: torch.Tensor
    dst: torch.Tensor

    def nbytes(self, engine: EngineLayout) -> int:
        """Bytes this move's gather holds: the keys and values, and the accessor's own temporaries."""
        assert engine.paged is not None
        return engine.paged.gather_bytes(engine.kv_caches[self.layer], self.src.numel())


def tensor_key(cache: torch.Tensor) -> tuple:
    """What identifies the cache tensor a layer's cache views: layers with equal keys share one tensor (one
    gather or write serves them all)."""
    return (cache.data_ptr(), tuple(cache.shape), cache.stride(), cache.dtype)


def chunked(units: Iterable[tuple[T, int]], budget: int) -> list[list[T]]:
    """``units`` (an item and its bytes) in order, cut into runs of at most ``budget`` bytes (a unit larger
    than the budget is a run alone): the groups moved together, every gather of a run before its writes."""
    runs: list[list[T]] = []
    size = 0
    for item, nbytes in units:
        if not runs or size + nbytes > budget:
            runs.append([])
            size = 0
        runs[-1].append(item)
        size += nbytes
    return runs


def move_kv(engine: EngineLayout, moves: Sequence[Move]) -> None:
    """Carry out ``moves``: every gather (a copy) before any write, as a destination may be another move's
    source; one gather and one write per cache tensor the moves' layers share.

    What can fail short of a device fault (a layout error, memory for the gathered copies) fails before the
    first write; the writes allocate no more than their slot indices (the accessors' gathers return what the
    writes store), so the moves are carried out whole or not at all."""
    paged = engine.paged
    assert paged is not None
    by_tensor: dict[tuple, list[Move]] = {}
    for m in moves:
        if m.dst.numel():
            by_tensor.setdefault(tensor_key(engine.kv_caches[m.layer]), []).append(m)
    gathered = []
    for ms in by_tensor.values():
        cache = engine.kv_caches[ms[0].layer]
        src = torch.cat([m.src for m in ms], 1) if len(ms) > 1 else ms[0].src
        dst = torch.cat([m.dst for m in ms]) if len(ms) > 1 else ms[0].dst
        if len(ms) > 1 and dst.unique().numel() != dst.numel():
            # Groups' blocks never overlap, so neither can their slots: a collision means a layout is
            # wrong, and an indexed write with repeated slots would store either value.
            raise RuntimeError(f"kvmm: moves of layers {[m.layer for m in ms]} write one slot twice")
        gathered.append((cache, dst, *paged.gather(cache, src)))
    for cache, dst, k, v in gathered:
        paged.write(cache, dst, k, v)
