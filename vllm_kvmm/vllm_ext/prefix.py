"""Prefix caching with compression: which prompt prefix of a compressing request stays exact and shared.

A compressing request's *shared prefix* ``P`` (tokens, a whole number of blocks) is fixed when each of its
epochs (first admission, each resumption after preemption) is first scheduled:

    P = max(tokens found in vLLM's prefix cache, the prefix the request marks as shared)

Tokens ``[0, P)`` are never written by compaction or decode-time flushes (``LayerPlan.frozen``), so their
blocks keep their hashes and can be shared; no block from ``P`` on ever gets a token hash (compaction
rewrites them), so no other request can hit KV that compression changed (compressed reuse, reuse.py, keys
them apart). Requests that never compress (``full``) are cached exactly as vLLM caches them. See
docs/design.md, "Prefix caching".

One :class:`SharedPrefixes` per engine, found through the engine's block pool: the scheduler-side connector
admits requests into it, and the KV-cache managers (:class:`~vllm_kvmm.vllm_ext.spec.CompressManager`)
read it when vLLM asks them to cache a request's blocks. Both ask :meth:`SharedPrefixes.protected`, which
fixes ``P`` the first time either asks in an epoch, so they cannot disagree.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

__all__ = ["SharedPrefixes", "shared_prefixes"]


@dataclass
class _Entry:
    mark: int  # tokens the request marks as shared, rounded down to whole blocks
    epoch: int = -1  # the preemption count P was fixed at
    protected: int = 0
    cached: int = 0  # tokens found in the prefix cache in that epoch


class SharedPrefixes:
    """The shared prefix of every compressing request of one engine (scheduler side)."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def admit(self, req_id: str, mark: int) -> None:
        """A compressing request arrived; ``mark``: tokens it marks as shared (whole blocks of its prompt)."""
        self._entries[req_id] = _Entry(mark)

    def forget(self, req_id: str) -> None:
        self._entries.pop(req_id, None)

    def compresses(self, req_id: str) -> bool:
        return req_id in self._entries

    def protected(self, request: Any, cached: int) -> int | None:
        """Tokens ``[0, P)`` kept exact in ``request``'s current epoch (``None``: it never compresses, so
        every block may be cached as vLLM does).

        ``cached``: the prefix-cache hit, in tokens, as the caller sees it at the epoch's first scheduling
        (used only by the first caller of an epoch).
        """
        entry = self._entries.get(request.request_id)
        if entry is None:
            return None
        epoch = request.num_preemptions
        if entry.epoch != epoch:
            entry.epoch, entry.cached = epoch, cached
            entry.protected = max(cached, entry.mark)
        return entry.protected

    def fix(self, request: Any, protected: int, cached: int) -> None:
        """Fix the current epoch's shared prefix to ``protected`` ahead of the usual first caller (a
        follow-up taking a compressed entry keeps the entry's, vllm_ext/reuse.py)."""
        entry = self._entries.get(request.request_id)
        if entry is not None:
            entry.epoch, entry.protected, entry.cached = request.num_preemptions, protected, cached

    def unfix(self, req_id: str) -> None:
        """Let the next caller fix the current epoch's prefix again (an admission that did not happen)."""
        entry = self._entries.get(req_id)
        if entry is not None:
            entry.epoch = -1

    def shared(self, req_id: str) -> int:
        """The current epoch's shared prefix in tokens (0 before it is fixed or for other requests)."""
        entry = self._entries.get(req_id)
        return entry.protected if entry is not None else 0

    def cached(self, req_id: str) -> int:
        """Tokens of the current epoch found in the prefix cache (their queries never ran)."""
        entry = self._entries.get(req_id)
        return entry.cached if entry is not None else 0


_BY_POOL: weakref.WeakKeyDictionary[Any, SharedPrefixes] = weakref.WeakKeyDictionary()


def shared_prefixes(block_pool: Any) -> SharedPrefixes:
    """The engine's :class:`SharedPrefixes` (one per block pool, created on first use)."""
    found = _BY_POOL.get(block_pool)
    if found is None:
        found = _BY_POOL[block_pool] = SharedPrefixes()
    return found
