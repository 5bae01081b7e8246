"""What the scheduler-side and worker-side connector halves tell each other every step.

Plain, picklable dataclasses: with multiprocessing they cross process boundaries (msgspec/pickle), so
they hold ints, strings and lists only — never tensors or vLLM objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from vllm_kvmm.config import ResolvedPolicy

__all__ = ["Adoption", "CompressedGroup", "FlushJob", "KVMMStepMeta", "KVMMWorkerMeta", "PrefillJob"]


@dataclass
class PrefillJob:
    """A compressing request with prompt tokens scheduled this step.

    ``q_start``/``num_new``: positions ``[q_start, q_start + num_new)`` are computed this step.
    ``vision``: ``(offset, length)`` runs of vision tokens in the prompt (from the placeholder ranges).
    ``block_ids``: per KV-cache group, the request's block ids (only when ``completes``).
    ``policy``: resolved once when the request arrived (validated, decode cadence fixed).
    ``cached``: prompt tokens of this epoch found in the prefix cache (their queries never run);
    ``shared``: the shared prefix ``[0, shared)`` kept exact (vllm_ext/prefix.py), ``≥ cached``.
    """

    req_id: str
    num_prompt_tokens: int
    q_start: int
    num_new: int
    policy: ResolvedPolicy
    vision: list[tuple[int, int]]
    completes: bool
    block_ids: list[list[int]] | None = None
    epoch: int = 0  # the request's preemption count when scheduled: a report for an older epoch is stale
    end: int = 0  # tokens stored once this step ran (past the prompt when a preempted request recomputes)
    cached: int = 0
    shared: int = 0


@dataclass
class FlushJob:
    """Decode-time eviction of one request after this step's forward (docs/decode-eviction.md).

    ``length``: tokens stored once this step ran. ``block_ids``: per group, the request's logical row.
    """

    req_id: str
    length: int
    block_ids: list[list[int]]
    epoch: int = 0


@dataclass
class Adoption:
    """A follow-up that starts from a compressed entry (vllm_ext/reuse.py), in its epoch's first step.

    ``layout``: per group, ``(keep, tail)`` of the entry's row (groups not listed are whole); the worker
    reads that compact view from this step on and never compresses the request again.
    """

    req_id: str
    policy: ResolvedPolicy
    num_prompt_tokens: int
    layout: dict[int, tuple[int, int]]
    epoch: int = 0


@dataclass
class KVMMStepMeta(KVConnectorMetadata):
    """Scheduler → worker, one per step."""

    jobs: dict[str, PrefillJob] = field(default_factory=dict)
    adopted: dict[str, Adoption] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)  # finished, aborted or preempted: forget them
    decoding: dict[str, int] = field(default_factory=dict)  # decode-evicting requests -> length after step
    flushes: dict[str, FlushJob] = field(default_factory=dict)


@dataclass(frozen=True)
class CompressedGroup:
    """Logical blocks of one group no longer read (``freed``): the scheduler frees them.

    After prefill compression they are ``[keep, tail)``; after a decode-time flush, whatever blocks the
    new layout left out.
    """

    group: int
    keep: int
    tail: int
    kept_tokens: int
    freed: tuple[int, ...] = ()


@dataclass
class KVMMWorkerMeta(KVConnectorWorkerMetadata):
    """Worker → scheduler, one per step: what each compressed request gave back, and its cost."""

    compressed: dict[str, list[CompressedGroup]] = field(default_factory=dict)  # prompt compressions
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    kept_token_layers: dict[str, int] = field(default_factory=dict)  # Σ over layers of kept tokens
    epochs: dict[str, int] = field(default_factory=dict)
    # Decode-time flushes, apart: a request compressed at the start of a step may flush at its end (a
    # decode interval of 1, or a recompute whose first decode step falls on the cadence).
    flushed: dict[str, list[CompressedGroup]] = field(default_factory=dict)
    # Requests whose compression or flush failed (contained: see WorkerState.contain) -> what failed.
    failed: dict[str, str] = field(default_factory=dict)
    # Requests whose prompt compression ran to its end this step, whether or not it freed anything
    # (``compressed`` lists only those that did) -> epoch: their layout is final (compressed reuse).
    settled: dict[str, int] = field(default_factory=dict)
    num_layers: int = 0  # the compressed layers the kept counts cover (this stage's, then summed)
    stages: set[int] = field(default_factory=set)  # pipeline stages whose compressions this holds
    seconds: float = 0.0
    durations: list[float] = field(default_factory=list)  # seconds of each compression or flush
    applied: bool = False  # the scheduler has taken this report (it is offered twice: patches.py, 6)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        # Tensor-parallel ranks decide identical layouts (head-averaged statistics are all-reduced before
        # any budget is computed), so one copy of each report is enough; pipeline stages compress
        # different layers (different groups), so their reports add up.
        assert isinstance(other, KVMMWorkerMeta)
        _merge_groups(self.compressed, other.compressed)
        _merge_groups(self.flushed, other.flushed)
        new_stage = bool(self.stages) and not other.stages <= self.stages
        for req, kept in other.kept_token_layers.items():
            if new_stage:
                self.kept_token_layers[req] = self.kept_token_layers.get(req, 0) + kept
            else:
                self.kept_token_layers.setdefault(req, kept)
        if new_stage:
            self.num_layers += other.num_layers
        else:
            self.num_layers = max(self.num_layers, other.num_layers)
        self.stages |= other.stages
        self.prompt_tokens.update(other.prompt_tokens)
        self.epochs.update(other.epochs)
        for req, why in other.failed.items():
            self.failed.setdefault(req, why)
        self.settled.update(other.settled)
        self.seconds = max(self.seconds, other.seconds)
        self.durations = self.durations or list(other.durations)
        return self


def _merge_groups(mine: dict[str, list[CompressedGroup]], other: dict[str, list[CompressedGroup]]) -> None:
    """Add ``other``'s groups per request: a group appears once per tensor-parallel rank (one copy kept)
    and on one pipeline stage only."""
    for req, groups in other.items():
        have = {g.group for g in mine.get(req, [])}
        mine[req] = [*mine.get(req, []), *(g for g in groups if g.group not in have)]
