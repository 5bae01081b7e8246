"""Compressed reuse across turns: a follow-up request continues from a finished request's compressed cache.

A chat's next turn sends the previous prompt, the model's answer and a new question. With prefix caching
alone (``prefix.py``) only the shared prefix is found again and everything after it is re-prefilled and
re-compressed. With reuse (``vllm_xargs: {"kv_reuse": true}`` or ``--kv-reuse``) the follow-up takes the
earlier request's *compressed* blocks as they are and prefills only what follows them: it sees the cache
the earlier request would have seen had it gone on decoding the new tokens. That is a different cache
from compressing the whole new prompt from scratch, hence opt-in; ``bench multiturn`` measures it.

**Entries.** When a compressing request ends (``record``), its row — whole computed blocks ``[0, h)`` of
every group, the compacted prefix, the freed middle as null blocks, the exact tail and the answer — becomes
an *entry*. Every real block of it gets one more key in vLLM's own prefix-cache table, derived from the
entry's id (never from tokens, so no ordinary lookup can hit it), and vLLM then frees the blocks as usual:
they sit in its free queue, counted free, until vLLM reallocates them, which drops their keys. So an entry
costs no memory, vLLM's eviction and reference counting govern its blocks, and nothing can leak: an entry
is usable exactly while every one of its blocks still carries its key (``find`` checks).

**Keys.** An entry is found under ``(block hash of its block h'−1, policy key)`` for every ``h'`` from the
end of its prompt (whole blocks; and at least its last compacted group's tail) to ``h``: the compacted
blocks hold what the prompt's compression chose, and every block from the tail on holds exact tokens at
their own positions, so any such ``h'`` is a valid prefix of it; a follow-up must carry the whole earlier
prompt (a chat template that re-tokenises the answer still matches through it). vLLM's block hashes chain
every token and multimodal hash before them, so a follow-up finds the entry whose tokens its prompt starts
with, under the same resolved policy (name, budget, fields) only.

**Adoption.** ``find`` runs in the connector's ``get_num_new_matched_tokens``; the tokens past the local
prefix-cache hit are reported as the connector's ("external"), and vLLM's coordinator then asks each
group's manager to place them (:meth:`CompressManager.allocate_external_computed_blocks`), which appends
the entry's blocks (touched: reference + 1) and nulls instead of fresh blocks. The follow-up's worker state
starts with the entry's compact layout, so its first step already reads the compact view; it is not
compressed again (its KV grows by the new turn). See docs/design.md, "Prefix caching", layer 2.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

from vllm_kvmm.config import ResolvedPolicy
from vllm_kvmm.vllm_ext import internals

__all__ = ["CompressedEntries", "Entry", "Layout", "compressed_entries", "policy_key"]

# group -> (compacted prefix blocks ``keep``, first block of the in-place tail); groups not listed are whole.
Layout = dict[int, tuple[int, int]]

# Entries remembered per engine (a few hundred bytes each; the blocks are the pool's).
MAX_ENTRIES = 4096


def policy_key(policy: ResolvedPolicy) -> str:
    """What must match for a follow-up to reuse an entry: the resolved policy, budget and fields."""
    return json.dumps(asdict(policy), sort_keys=True, default=str)


@dataclass(frozen=True)
class Entry:
    """A finished request's compressed row: blocks ``[0, blocks)`` of every group."""

    ident: bytes
    blocks: int
    layout: Layout
    shared: int  # tokens of the exact shared prefix at its start (prefix.py)
    policy: str  # policy_key
    prompt: int  # whole blocks of the prompt whose compression it holds

    def is_null(self, group: int, j: int) -> bool:
        keep, tail = self.layout.get(group, (0, 0))
        return keep <= j < tail

    def key(self, group: int, j: int) -> bytes:
        """Block ``j`` of ``group``'s key in vLLM's prefix-cache table."""
        digest = hashlib.sha256(b"vllm-kvmm/entry" + self.ident + j.to_bytes(4, "big")).digest()
        return internals.block_key(digest, group)

    @property
    def first_valid(self) -> int:
        """The shortest prefix (blocks) it is reused at: its whole prompt, and every compacted group's tail
        (a shorter prefix would hand out a compression chosen by queries the follow-up does not share)."""
        return max(1, self.prompt, *(tail for _, tail in self.layout.values()))


@dataclass(frozen=True)
class Match:
    entry: Entry
    blocks: int  # blocks of the entry the follow-up takes (``h'``)


@dataclass
class Tracked:
    """What reuse knows of one live compressing request (epochs: its preemption count at the time)."""

    wants: bool  # it asked for reuse (kv_reuse, or the server's --kv-reuse)
    layout: tuple[int, Layout] = field(default_factory=lambda: (-1, {}))  # (epoch, its compression's)
    adopted: tuple[int, Match] | None = None  # the entry it started from, and in which epoch
    announced: int = -1  # the epoch in which the worker was told of that adoption


class CompressedEntries:
    """One engine's entries and the live compressing requests that may leave or take one (scheduler side),
    with the adoptions under way in this ``schedule()`` (``pending``)."""

    def __init__(self) -> None:
        self._index: OrderedDict[tuple[bytes, str], tuple[Entry, int]] = OrderedDict()
        self._count = 0
        self.pending: dict[str, Match] = {}
        self.requests: dict[str, Tracked] = {}

    # ---- the requests' side (called by the connector) ----------------------------------------------
    def admit(self, req_id: str, wants: bool) -> None:
        """A compressing request arrived; ``wants``: it asked for reuse."""
        self.requests[req_id] = Tracked(wants)

    def wants(self, req_id: str) -> bool:
        tracked = self.requests.get(req_id)
        return tracked is not None and tracked.wants

    def reported(self, req_id: str, epoch: int, layout: Layout) -> None:
        """The worker compressed ``layout``'s groups of the request in ``epoch`` (a part of them under
        pipeline parallelism; ``{}``: its compression ended, whatever it freed: the layout is final)."""
        tracked = self.requests.get(req_id)
        if tracked is None:
            return
        known = tracked.layout[1] if tracked.layout[0] == epoch else {}
        tracked.layout = (epoch, {**known, **layout})

    def placed(self, request: Any, num_external_tokens: int) -> Match | None:
        """vLLM allocated the request (``update_state_after_alloc``): the match it took, if any."""
        match = self.pending.pop(request.request_id, None)
        tracked = self.requests.get(request.request_id)
        if match is None or num_external_tokens <= 0 or tracked is None:
            return None
        tracked.adopted = (request.num_preemptions, match)
        return match

    def adoption(self, request: Any) -> tuple[Match | None, bool]:
        """The entry the request started from in its current epoch (``None``: it is compressed as usual),
        and whether the worker is yet to hear of it (true once per epoch)."""
        tracked = self.requests.get(request.request_id)
        epoch = request.num_preemptions
        if tracked is None or tracked.adopted is None or tracked.adopted[0] != epoch:
            return None, False
        first = tracked.announced != epoch
        tracked.announced = epoch
        return tracked.adopted[1], first

    def finish(
        self, request: Any, policy: ResolvedPolicy | None, shared: int, mgrs: dict[int, Any]
    ) -> Match | None:
        """The request ends (before vLLM frees its blocks): with ``policy`` (``None``: it may not leave
        one), make its row an entry when its layout is known for its current epoch; forget it. Returns the
        entry it had started from, for its report."""
        self.pending.pop(request.request_id, None)
        tracked = self.requests.pop(request.request_id, None)
        if tracked is None:
            return None
        epoch = request.num_preemptions
        adopted = tracked.adopted
        if policy is not None and adopted is not None and adopted[0] == epoch:
            self.record(request, policy, adopted[1].entry.layout, adopted[1].entry.shared, mgrs)
        elif policy is not None and tracked.layout[0] == epoch:
            self.record(request, policy, tracked.layout[1], shared, mgrs)
        return adopted[1] if adopted is not None else None

    # ---- entries ----------------------------------------------------------------------------------
    def record(
        self,
        request: Any,
        policy: ResolvedPolicy,
        layout: Layout,
        shared: int,
        mgrs: dict[int, Any],
    ) -> Entry | None:
        """Make ``request``'s row (before vLLM frees it) an entry; ``None`` when it cannot be one (no whole
        block past its prompt's, or a row that is not what ``layout`` says).

        ``layout``: what its compression (or the entry it adopted) left in each group.
        """
        pool = next(iter(mgrs.values())).block_pool
        bs = next(iter(mgrs.values())).block_size
        hashes = internals.block_hashes(request)
        h = min(request.num_computed_tokens // bs, len(hashes))
        self._count += 1
        ident = hashlib.sha256(
            f"{request.request_id}/{request.num_preemptions}/{self._count}".encode()
        ).digest()
        entry = Entry(ident, h, dict(layout), shared, policy_key(policy), request.num_prompt_tokens // bs)
        if h < entry.first_valid:
            return None
        null = internals.null_block(next(iter(mgrs.values())))
        rows = {g: internals.req_blocks(m, request.request_id)[:h] for g, m in mgrs.items()}
        for g, row in rows.items():
            # The row must be what the layout says (a request that finished in the step that compressed it
            # has not had its middle freed yet: it is not recorded).
            if len(row) < h or any((b is null) != entry.is_null(g, j) for j, b in enumerate(row)):
                return None
        for g, row in rows.items():
            for j, block in enumerate(row):
                if block is not null:
                    internals.cache_block(pool, entry.key(g, j), block)
        for n in range(entry.first_valid, h + 1):
            self._index[(hashes[n - 1], entry.policy)] = (entry, n)
            self._index.move_to_end((hashes[n - 1], entry.policy))
        while len(self._index) > MAX_ENTRIES * 8:
            self._index.popitem(last=False)
        return entry

    def find(self, request: Any, policy: ResolvedPolicy, local: int, mgrs: dict[int, Any]) -> Match | None:
        """The longest usable entry whose tokens ``request`` starts with, under the same policy.

        ``local``: tokens vLLM's own prefix cache found (exact blocks). An entry is usable when its blocks
        all still carry their keys, it leaves at least one token to compute, and the local hit lies inside
        its exact shared prefix (a longer exact hit is better than any compressed entry).
        """
        bs = next(iter(mgrs.values())).block_size
        pool = next(iter(mgrs.values())).block_pool
        hashes = internals.block_hashes(request)
        key = policy_key(policy)
        top = min(len(hashes), (request.num_tokens - 1) // bs)
        for n in range(top, local // bs, -1):
            found = self._index.get((hashes[n - 1], key))
            if found is None:
                continue
            entry, at = found
            if at != n or local > entry.shared:
                continue
            if all(
                entry.is_null(g, j) or internals.cached_block(pool, entry.key(g, j)) is not None
                for g in mgrs
                for j in range(local // bs, n)
            ):
                self._index.move_to_end((hashes[n - 1], key))
                return Match(entry, n)
            del self._index[(hashes[n - 1], key)]  # a block was reallocated: never usable again
        return None

    def blocks_taken(self, manager: Any, request_id: str, start: int) -> int | None:
        """Blocks of ``manager``'s group the pending match takes out of the free queue from logical block
        ``start`` on (``None``: nothing pending); the others are in use already, or null."""
        match = self.pending.get(request_id)
        if match is None:
            return None
        g = manager.kv_cache_group_id
        taken = 0
        for j in range(start, match.blocks):
            if not match.entry.is_null(g, j):
                block = internals.cached_block(manager.block_pool, match.entry.key(g, j))
                taken += block is not None and block.ref_cnt == 0
        return taken

    def adopt(self, manager: Any, request_id: str, row: list[Any]) -> bool:
        """Append the pending match's blocks of ``manager``'s group to ``row`` (touched); ``False``: none
        pending for this request."""
        match = self.pending.get(request_id)
        if match is None:
            return False
        g = manager.kv_cache_group_id
        null = internals.null_block(manager)
        blocks = []
        for j in range(len(row), match.blocks):
            if match.entry.is_null(g, j):
                blocks.append(null)
                continue
            block = internals.cached_block(manager.block_pool, match.entry.key(g, j))
            if block is None:  # checked by find in this same schedule(); nothing allocates in between
                raise RuntimeError(f"vllm-kvmm: compressed entry block {j} of group {g} vanished")
            blocks.append(block)
        manager.block_pool.touch([b for b in blocks if b is not null])
        row.extend(blocks)
        return True


_BY_POOL: weakref.WeakKeyDictionary[Any, CompressedEntries] = weakref.WeakKeyDictionary()


def compressed_entries(block_pool: Any) -> CompressedEntries:
    """The engine's :class:`CompressedEntries` (one per block pool, created on first use)."""
    found = _BY_POOL.get(block_pool)
    if found is None:
        found = _BY_POOL[block_pool] = CompressedEntries()
    return found
