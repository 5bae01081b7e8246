"""The worker's state: the engine's layout, the live compressing requests, and this step's bookkeeping.

:class:`WorkerState` holds data and the step's sequence; the work itself lives next door — statistics
(``stats.py``), compaction (``compaction.py``), flushes (``flush.py``) and the compact view
(``view.py``). The hook order that drives it is in this package's docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from vllm.logger import init_logger

from vllm_kvmm.policies import PromptInfo
from vllm_kvmm.vllm_ext.messages import Adoption, FlushJob, KVMMStepMeta, KVMMWorkerMeta, PrefillJob
from vllm_kvmm.vllm_ext.worker.compaction import compress
from vllm_kvmm.vllm_ext.worker.flush import flush
from vllm_kvmm.vllm_ext.worker.layout import EngineLayout, StepRows
from vllm_kvmm.vllm_ext.worker.recorder import PlanRecorder
from vllm_kvmm.vllm_ext.worker.requests import RequestState
from vllm_kvmm.vllm_ext.worker.stats import QueryBuffers
from vllm_kvmm.vllm_ext.worker.timing import StageTimer

__all__ = ["EngineLayout", "StepRows", "WorkerState", "worker_state"]

logger = init_logger(__name__)


class WorkerState:
    """One per worker process (:func:`worker_state`); see the package docstring for who calls what."""

    def __init__(self) -> None:
        self.engine = EngineLayout()
        self.requests: dict[str, RequestState] = {}
        # This step's work, from the scheduler (``begin_step``).
        self.jobs: dict[str, PrefillJob] = {}
        self.decoding: dict[str, int] = {}
        self.flushes: dict[str, FlushJob] = {}
        # Prompts whose prefill ended last step: compressed at the start of this one (compress_pending).
        self.pending: dict[str, PrefillJob] = {}
        self.rows = StepRows()
        self.queries = QueryBuffers()
        # This step feeds queries to statistics (a compressing prefill): its attention must run outside
        # full CUDA graphs, where Python hooks do not run (read by patches.py, patch 5).
        self.eager_attention = False
        self.out = KVMMWorkerMeta()
        self.timer = StageTimer()
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

    def adopt(self, adoptions: dict[str, Adoption]) -> None:
        """Follow-ups starting from a compressed entry: their state, with the entry's compact layout, before
        this step's attention metadata is built (their first step already reads the compact view)."""
        for req_id, ad in adoptions.items():
            info = self._prompt_info(ad.num_prompt_tokens, [])  # never compressed again: no statistics
            compact = {g: (tuple(range(keep)), tail) for g, (keep, tail) in ad.layout.items()}
            self.requests[req_id] = RequestState(policy=ad.policy.build(), info=info, compact=compact)

    def begin_step(self, meta: KVMMStepMeta) -> None:
        """Forget dropped requests and register this step's prefill jobs, decodes and flushes."""
        # A request preempted and admitted again from an entry in the same step keeps its new state.
        self.drop(meta.dropped - meta.adopted.keys())
        self.adopt({r: a for r, a in meta.adopted.items() if r not in self.requests})
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
            self.pending.pop(r, None)

    def _new_request(self, job: PrefillJob) -> RequestState:
        policy = job.policy.build()
        info = self._prompt_info(job.num_prompt_tokens, job.vision)
        return RequestState(
            policy=policy, info=info, cached=job.cached, shared=job.shared, decode=policy.decode_spec(info)
        )

    def _prompt_info(self, num_prompt_tokens: int, vision_runs: list[tuple[int, int]]) -> PromptInfo:
        """A prompt as policies see it: its length, vision mask (from ``(offset, length)`` runs) and shape."""
        vision = torch.zeros(num_prompt_tokens, dtype=torch.bool)
        for off, length in vision_runs:
            vision[off : off + length] = True
        return PromptInfo(num_prompt_tokens, vision, self.engine.num_layers, self.engine.num_kv_heads)

    def compress_pending(self) -> None:
        """Compress the prompts whose prefill ended last step, before this step builds attention metadata.

        Off the path of the first token: it is sampled from the prefill's logits, which the compression
        cannot change, so the step that ran the last chunk returns it at once and the work waits for the
        next step, which reads the compact view (and later ones too). The cost moves to the second token;
        a request that ended with its first token is dropped before this and never compressed (its
        cache would never be read again). Called after :meth:`drop`, so the blocks of a request that
        finished or was preempted meanwhile (and may already be another request's) are not touched.
        """
        pending, self.pending = self.pending, {}
        for job in pending.values():
            if self._healthy(job.req_id):
                self._timed("compression", lambda job=job: self._contained(compress, job, "compression"))

    def after_forward(self) -> None:
        """Queue the prompts whose prefill ended this step for compression (:meth:`compress_pending`), then
        run this step's decode-time flushes (all of them together: flush.py)."""
        if self.decoding:
            self.queries.take(self)
        done = {j.req_id: j for j in self.jobs.values() if j.completes and self._healthy(j.req_id)}
        self.pending.update(done)
        # A request whose compression failed may still have a flush scheduled (the scheduler learns of the
        # failure from this step's output): it has no decode state, so it is skipped.
        batch = [
            (f, self.requests[f.req_id])
            for f in self.flushes.values()
            if self._healthy(f.req_id) and self._decodes(f.req_id)
        ]
        if batch:
            self._timed("flush", lambda: flush(self, batch))  # contains each request's failure itself
        self.jobs = {}
        self.flushes = {}

    def _contained(self, work: Any, job: PrefillJob, stage: str) -> None:
        """Run one request's ``work``; its failure is contained (:meth:`contain`), not raised."""
        try:
            work(self, job, self.requests[job.req_id])
        except Exception as e:
            self.contain(job.req_id, job.epoch, stage, e)

    def _timed(self, stage: str, work: Callable[[], None]) -> None:
        """Run one compression or this step's flushes, timed for metrics (on a GPU by events, read in a
        later step: timing.py), as a named range in profiles (bench profile-decode)."""
        with torch.profiler.record_function(f"kvmm.{stage}"), self.timer(self.engine.cuda):
            work()

    @property
    def seconds_total(self) -> float:
        """Seconds spent compressing and flushing since :meth:`configure` (benchmarks; on a GPU this waits
        for the device to finish what was timed)."""
        return self.timer.drain()

    def take_output(self) -> KVMMWorkerMeta | None:
        """What this step compressed, freed and failed, and the compression time known by now, for the
        scheduler (``None``: nothing)."""
        for dt in self.timer.finished():
            self.out.seconds += dt
            self.out.durations.append(dt)
        out, self.out = self.out, KVMMWorkerMeta()
        return out if out.compressed or out.flushed or out.seconds or out.failed or out.settled else None

    # ---- failures ----------------------------------------------------------------------------
    def _healthy(self, req_id: str) -> bool:
        st = self.requests.get(req_id)
        return st is not None and st.failed is None

    def _decodes(self, req_id: str) -> bool:
        return self.requests[req_id].decode is not None

    def contain(self, req_id: str, epoch: int, stage: str, error: BaseException) -> None:
        """Fail one request's compression instead of the engine step that every request shares.

        Each stage changes the cache only once everything it computed for a KV-cache group is ready
        (compaction.py, flush.py), so the request is left consistent: uncompressed if statistics or
        planning failed, with the groups done before the failure compressed otherwise. It keeps that
        layout, is neither compressed nor flushed again, and the scheduler hears ``failed`` (a metric,
        and an ``error`` in the request's ``kv_transfer_params``).

        Under tensor parallelism the error is raised: ranks decide layouts together, and a failure on
        one rank alone would leave them with different caches for the same blocks.
        """
        if self.engine.tp_world > 1:
            raise error
        why = f"{stage}: {type(error).__name__}: {error}"[:500]
        logger.error(
            "vllm-kvmm: request %s: %s; serving it without further compression", req_id, why, exc_info=error
        )
        st = self.requests.get(req_id)
        if st is not None:
            st.failed = why
            st.accs.clear()
            st.decode = None
            st.positions.clear()
            st.queries.clear()
        self.out.failed[req_id] = why
        self.out.epochs.setdefault(req_id, epoch)


_STATE: WorkerState | None = None


def worker_state() -> WorkerState:
    global _STATE
    if _STATE is None:
        _STATE = WorkerState()
    return _STATE
