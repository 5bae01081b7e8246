"""The worker's state: the engine's layout, the live compressing requests, and this step's bookkeeping.

:class:`WorkerState` holds data and the step's sequence; the work itself lives next door — statistics
(``stats.py``), compaction (``compaction.py``), flushes (``flush.py``) and the compact view
(``view.py``). The hook order that drives it is in this package's docstring.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_kvmm.policies import PromptInfo
from vllm_kvmm.vllm_ext.messages import FlushJob, KVMMStepMeta, KVMMWorkerMeta, PrefillJob
from vllm_kvmm.vllm_ext.worker.compaction import compress
from vllm_kvmm.vllm_ext.worker.flush import flush
from vllm_kvmm.vllm_ext.worker.recorder import PlanRecorder
from vllm_kvmm.vllm_ext.worker.requests import LayerRef, RequestState
from vllm_kvmm.vllm_ext.worker.stats import QueryBuffers

__all__ = ["EngineLayout", "StepRows", "WorkerState", "worker_state"]


@dataclass
class EngineLayout:
    """What one engine registered with this process: its attention layers, caches and parallelism.

    ``num_kv_heads`` is this rank's; under tensor parallelism ``all_reduce`` sums a tensor over ranks.
    ``paged`` reads and writes the paged cache in the attention backend's layout (set by the backend).
    """

    layers: dict[str, LayerRef] = field(default_factory=dict)
    block_size: int = 0
    num_kv_heads: int = 0
    tp_world: int = 1
    all_reduce: Any = None
    kv_caches: dict[str, torch.Tensor] = field(default_factory=dict)
    paged: Any = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_groups(self) -> list[list[int]]:
        """Decoder layers per KV-cache group (they share a block table, hence a layout)."""
        out: dict[int, list[int]] = {}
        for ref in self.layers.values():
            out.setdefault(ref.group, []).append(ref.index)
        return [sorted(v) for _, v in sorted(out.items())]


@dataclass
class StepRows:
    """This step's rows: request id per row, query offsets and (uncompacted) lengths from the CPU copies.

    ``metadata``: attention metadata already built this step, shared by groups with the same view.
    """

    req_ids: list[str] = field(default_factory=list)
    qsl: list[int] | None = None
    seq_lens: list[int] | None = None
    metadata: dict[tuple, Any] = field(default_factory=dict)


class WorkerState:
    """One per worker process (:func:`worker_state`); see the package docstring for who calls what."""

    def __init__(self) -> None:
        self.engine = EngineLayout()
        self.requests: dict[str, RequestState] = {}
        # This step's work, from the scheduler (``begin_step``).
        self.jobs: dict[str, PrefillJob] = {}
        self.decoding: dict[str, int] = {}
        self.flushes: dict[str, FlushJob] = {}
        self.rows = StepRows()
        self.queries = QueryBuffers()
        # This step feeds queries to statistics (a compressing prefill): its attention must run outside
        # full CUDA graphs, where Python hooks do not run (read by patches.py, patch 5).
        self.eager_attention = False
        self.out = KVMMWorkerMeta()
        # Since configure(): seconds spent compressing and flushing (device-synchronised), for benchmarks.
        self.seconds_total = 0.0
        # Tests and benchmarks only: set to a PlanRecorder to keep every plan; force piecewise graphs.
        self.recorder: PlanRecorder | None = None
        self.force_piecewise = False

    # ---- set-up ------------------------------------------------------------------------------
    def configure(self, engine: EngineLayout, query_rows: int = 0) -> None:
        """Start afresh for a new engine (one compressing engine per process at a time)."""
        self.reset()
        self.engine = engine
        self.queries = QueryBuffers(query_rows)

    def reset(self) -> None:
        """Forget everything: no engine, caches or requests (``configure`` and the connector's shutdown)."""
        self.__init__()  # type: ignore[misc]

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Take the engine's layer caches; a second engine in this process is refused here.

        vLLM keeps one worker-side KV connector per process and hands it to every engine started there
        while it lives: a second in-process engine would register its caches over the first one's, and
        the first would go on compressing the second's caches.
        """
        if self.engine.kv_caches:
            raise RuntimeError(
                "vllm-kvmm: a second engine with a KV policy in this process; vLLM shares one KV connector "
                "per process between them. Shut the first engine down before starting another, or run "
                "engines in their own processes (VLLM_ENABLE_V1_MULTIPROCESSING=1, vLLM's default)"
            )
        self.engine.kv_caches = dict(kv_caches)

    # ---- per step ----------------------------------------------------------------------------
    def new_step(self, req_ids: list[str]) -> None:
        """Before any attention metadata is built: the row order, and a fresh share cache."""
        self.rows = StepRows(req_ids=req_ids)

    def note_rows(self, query_start_loc_cpu: torch.Tensor, seq_lens_cpu: torch.Tensor | None) -> None:
        """The step's query offsets and (uncompacted) lengths per row, from the first group's metadata."""
        if self.rows.qsl is None:
            self.rows.qsl = query_start_loc_cpu.tolist()
            self.rows.seq_lens = seq_lens_cpu.tolist() if seq_lens_cpu is not None else None
            self.queries.step_tokens(self.rows.qsl[-1])

    def begin_step(self, meta: KVMMStepMeta) -> None:
        """Forget dropped requests and register this step's prefill jobs, decodes and flushes."""
        self.drop(meta.dropped)
        self.jobs = meta.jobs
        self.decoding = meta.decoding
        self.flushes = meta.flushes
        for req_id, job in meta.jobs.items():
            if req_id not in self.requests or job.q_start == 0:
                self.requests[req_id] = self._new_request(job)

    def drop(self, req_ids: set[str] | list[str]) -> None:
        for r in req_ids:
            self.requests.pop(r, None)
            self.jobs.pop(r, None)
            self.decoding.pop(r, None)
            self.flushes.pop(r, None)

    def _new_request(self, job: PrefillJob) -> RequestState:
        policy = job.policy.build()
        vision = torch.zeros(job.num_prompt_tokens, dtype=torch.bool)
        for off, length in job.vision:
            vision[off : off + length] = True
        info = PromptInfo(job.num_prompt_tokens, vision, self.engine.num_layers, self.engine.num_kv_heads)
        return RequestState(policy=policy, info=info, decode=policy.decode_spec(info))

    def after_forward(self) -> None:
        """Compress prompts whose prefill ended this step, then run this step's decode-time flushes."""
        t0 = time.perf_counter()
        if self.decoding:
            self.queries.take(self)
        done = [j for j in self.jobs.values() if j.completes and j.req_id in self.requests]
        for job in done:
            compress(self, job, self.requests[job.req_id])
        flushes = [f for f in self.flushes.values() if f.req_id in self.requests]
        for job in flushes:
            flush(self, job, self.requests[job.req_id])
        if done or flushes:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # count the kernels, not just their launches
            dt = time.perf_counter() - t0
            self.out.seconds += dt
            self.seconds_total += dt
        self.jobs = {}
        self.flushes = {}

    def take_output(self) -> KVMMWorkerMeta | None:
        """What this step compressed and freed, for the scheduler (``None``: nothing)."""
        out, self.out = self.out, KVMMWorkerMeta()
        return out if out.compressed or out.seconds else None


_STATE: WorkerState | None = None


def worker_state() -> WorkerState:
    global _STATE
    if _STATE is None:
        _STATE = WorkerState()
    return _STATE
