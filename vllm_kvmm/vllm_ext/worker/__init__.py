"""The worker side of compression: one :class:`WorkerState` per worker process, driven by vLLM's hooks.

Modules, one job each:

* ``state.py`` — the live compressing requests and this step's jobs; starts and ends each step, and
  contains failures (:meth:`WorkerState.contain`);
* ``layout.py`` / ``requests.py`` — plain data: the engine's layers, caches and parallelism, a step's rows;
  what the worker keeps per layer and per request.
* ``stats.py`` — prefill queries into each request's statistics accumulators during attention; decode
  queries kept for decode-time scores (in persistent buffers that CUDA graphs replay).
* ``compaction.py`` — after a prompt's last chunk: plan every layer, move the kept KV, report freed blocks.
* ``flush.py`` — decode-time eviction: re-select, move, report freed blocks.
* ``moves.py`` — moving kept tokens within the paged cache, one gather and one write per cache tensor the
  layers share (vLLM gives per-layer groups views of one tensor).
* ``view.py`` — the compact block table and lengths attention reads for compressed requests.
* ``recorder.py`` — every plan made, for tests and benchmarks (off unless set).
* ``timing.py`` — how long each compression and flush took (CUDA events on a GPU, read a step later).

**The hooks of one engine step, in the order vLLM 0.26 calls them** (``GPUModelRunner.execute_model``;
the CPU runner inherits it):

1. ``KVMMConnector.handle_preemptions(meta)`` → :meth:`WorkerState.drop` the finished and preempted
   requests; :meth:`WorkerState.compress_pending` (:func:`compress` the prompts whose last chunk ran in
   the previous step); set ``eager_attention`` if a prefill job needs statistics (read in step 2).
2. ``CudagraphDispatcher.dispatch`` (patch 5) → no FULL graph when ``eager_attention``.
3. ``GPUModelRunner._build_attention_metadata`` (patch 2) → :meth:`WorkerState.new_step` (row →
   request id), then per KV-cache group ``CompactViewBuilder.build`` → :meth:`WorkerState.note_rows`,
   :func:`view_signature`, :func:`compact_view` (built once per distinct view, shared by groups).
4. Entering the forward: ``bind_connector_metadata(meta)`` → :meth:`WorkerState.begin_step` (this step's
   prefill jobs, decoding rows and flushes; a request's first job creates its state).
5. The forward, per attention layer: ``StatsObservingImpl.forward`` runs the stock kernel, then
   ``QueryBuffers.record`` and :func:`observe`.
6. Leaving the forward: ``wait_for_save`` → :meth:`WorkerState.after_forward` (queue the prompts whose
   last chunk ran for step 1 of the next step, then :func:`flush` every request due, all together);
   ``build_connector_worker_meta`` → :meth:`WorkerState.take_output`, which the scheduler's
   ``update_connector_output`` turns into freed blocks before its next ``schedule()``.

**Failures are contained per request.** An exception (or non-finite statistics) while observing,
planning, compacting or flushing one request fails that request's compression, not the step every
request shares: each stage writes a KV-cache group only once everything it computed for that group is
ready, so the request keeps a consistent cache (uncompressed, or the groups done before the failure),
is served on with it, and the scheduler hears ``failed`` (``vllm_kvmm:failed_compressions``, an
``error`` in the request's ``kv_transfer_params``). Under tensor parallelism the error is raised as
before: ranks must agree on every layout.

A prompt whose last chunk runs in step *t* gives its first token from that step's full-cache forward
and is compressed in step 1 of step *t + 1*, which (step 3 follows) already reads the compact view.
"""

from vllm_kvmm.vllm_ext.worker.compaction import compress
from vllm_kvmm.vllm_ext.worker.flush import flush
from vllm_kvmm.vllm_ext.worker.recorder import PlanRecorder
from vllm_kvmm.vllm_ext.worker.requests import LayerRef, RequestState
from vllm_kvmm.vllm_ext.worker.state import EngineLayout, WorkerState, worker_state
from vllm_kvmm.vllm_ext.worker.stats import QueryBuffers, observe
from vllm_kvmm.vllm_ext.worker.view import CompactView, compact_metadata, compact_view, view_signature

__all__ = [
    "CompactView",
    "EngineLayout",
    "LayerRef",
    "PlanRecorder",
    "QueryBuffers",
    "RequestState",
    "WorkerState",
    "compact_metadata",
    "compact_view",
    "compress",
    "flush",
    "observe",
    "view_signature",
    "worker_state",
]
