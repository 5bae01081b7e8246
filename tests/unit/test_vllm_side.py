"""The vLLM side without an engine: the manager, the compact view, the connector's scheduler half, the
contract check. Toy specs and a real vLLM block pool; expected block ids worked out by hand.

BlockPool(10) keeps block 0 as its null block and hands out 1, 2, ... in order; freed blocks without a
hash (no prefix caching) go to the front of the free queue, in the order they were freed.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.core.block_pool import BlockPool

from vllm_kvmm.config import FULL, PolicyError, ResolvedPolicy, resolve_request, reuse_arg
from vllm_kvmm.policies import make_policy
from vllm_kvmm.vllm_ext import internals
from vllm_kvmm.vllm_ext.messages import CompressedGroup, KVMMWorkerMeta
from vllm_kvmm.vllm_ext.settings import KVMMSettings
from vllm_kvmm.vllm_ext.spec import CompressManager, CompressSpec
from vllm_kvmm.vllm_ext.worker import RequestState, WorkerState, compact_view, view_signature

BS = 16


def _pool_and_managers(
    groups: int = 1, blocks: int = 10, caching: bool = False
) -> tuple[BlockPool, list[CompressManager]]:
    pool = BlockPool(num_gpu_blocks=blocks, enable_caching=caching, hash_block_size=BS)
    mgrs = [
        CompressManager(
            CompressSpec(block_size=BS, num_kv_heads=2, head_size=32, dtype=torch.float32, group_index=g),
            block_pool=pool,
            enable_caching=caching,
            kv_cache_group_id=g,
            scheduler_block_size=BS,
        )
        for g in range(groups)
    ]
    return pool, mgrs


def _ids(mgr: CompressManager, req: str) -> list[int]:
    return [b.block_id for b in internals.req_blocks(mgr, req)]


# ---- the manager ---------------------------------------------------------------------------------
def test_release_blocks_frees_exact_ids_and_keeps_positions() -> None:
    pool, (mgr,) = _pool_and_managers()
    assert [b.block_id for b in mgr.allocate_new_blocks("a", 64, 64)] == [1, 2, 3, 4]
    assert [b.block_id for b in mgr.allocate_new_blocks("b", 32, 32)] == [5, 6]
    assert pool.get_num_free_blocks() == 3
    assert mgr.release_blocks("a", [1, 2]) == 2
    assert _ids(mgr, "a") == [1, 0, 0, 4]  # null placeholders keep logical block i at tokens [16i, 16i+16)
    assert mgr.num_held_blocks("a") == 2
    assert pool.get_num_free_blocks() == 5
    # Released blocks go back to the pool and are reused first (released from the back: 3, then 2).
    assert [b.block_id for b in mgr.allocate_new_blocks("c", 80, 80)] == [3, 2, 7, 8, 9]
    # Releasing again (overlapping, out of range) frees only what is still held.
    assert mgr.release_blocks("a", [1, 2, 3, 7]) == 1
    assert _ids(mgr, "a") == [1, 0, 0, 0]
    assert mgr.release_blocks("nobody", [0]) == 0
    for r in ("a", "b", "c"):
        mgr.free(r)
    assert pool.get_num_free_blocks() == 9  # every block but the null block


# ---- the compact view ------------------------------------------------------------------------------
def test_compact_view_gathers_live_blocks_then_the_tail() -> None:
    table = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24], [30, 31, 32, 33, 34]])
    seq_lens = torch.tensor([70, 50, 75], dtype=torch.int32)
    # row 0 keeps block 0 then reads from block 3; row 2 keeps blocks 0 and 2, tail from 4
    view = compact_view(((0, (0,), 3), (2, (0, 2), 4)), table, seq_lens, BS)
    assert view.table.tolist() == [[10, 13, 14, 14, 14], [20, 21, 22, 23, 24], [30, 32, 34, 34, 34]]
    assert view.seq_lens.tolist() == [70 - 2 * BS, 50, 75 - 2 * BS]
    assert view.seq_lens.dtype == torch.int32
    assert view.shift.tolist() == [32, 0, 32]
    # the same index compacts another group's table with the same view
    other = table + 100
    assert torch.gather(other, 1, view.index)[0].tolist() == [110, 113, 114, 114, 114]


def test_view_signature_lists_only_rows_compacted_in_that_group() -> None:
    state = WorkerState()
    state.new_step(["x", "y", "z"])
    policy = make_policy("snapkv", 0.5)
    from vllm_kvmm.policies import PromptInfo

    info = PromptInfo.text_only(64, 2, 2)
    state.requests["y"] = RequestState(policy=policy, info=info, compact={0: ((0, 1), 3)})
    state.requests["z"] = RequestState(policy=policy, info=info, compact={1: ((0,), 2)})
    assert view_signature(state, 0) == ((1, (0, 1), 3),)
    assert view_signature(state, 1) == ((2, (0,), 2),)
    assert view_signature(state, 2) == ()


# ---- one resolver for every path -------------------------------------------------------------------
def test_resolve_request_once_with_the_decode_cadence() -> None:
    engine = KVMMSettings(policy="h2o", budget=0.5, config={"decode_interval": 16})
    assert resolve_request(None, engine, 100) == ResolvedPolicy(
        "h2o", 0.5, make_policy("h2o", 0.5, {"decode_interval": 16}).model_dump(exclude={"budget"}), 16
    )
    # At budget 1 H2O never evicts, so no flush cadence: the scheduler must not schedule flushes.
    assert resolve_request({"kv_budget": 1.0}, engine, 100).decode_interval is None
    # Another policy named alone runs at its own default budget, without the engine's configuration.
    snap = resolve_request({"kv_policy": "snapkv"}, engine, 100)
    assert (snap.name, snap.budget, snap.decode_interval) == ("snapkv", make_policy("snapkv").budget, None)
    # The API process (no engine default) checks the same things with the same messages.
    assert resolve_request({}, None) == FULL
    assert resolve_request({"kv_shared_prefix": "images"}, engine, 100) == resolve_request(None, engine, 100)
    assert resolve_request({"kv_shared_prefix": 0}, None) == FULL
    assert resolve_request({"kv_reuse": True}, engine, 100) == resolve_request(None, engine, 100)
    # Over HTTP vLLM types vllm_xargs values as strings or numbers: a JSON true arrives as 1.
    assert [reuse_arg({"kv_reuse": v}) for v in (True, 1, False, 0)] == [True, True, False, False]
    assert reuse_arg({}, default=True) and not reuse_arg(None)
    for bad, msg in [
        ({"kv_budget": None}, "kv_budget must be a number in (0, 1], got null"),
        ({"kv_budget": float("nan")}, "kv_budget must be a number in (0, 1], got nan"),
        ({"kv_policy_config": {}}, "kv_policy_config needs kv_policy"),
        ({"kv_polcy": "meda"}, "unknown KV-policy request argument(s) ['kv_polcy']"),
        ({"kv_policy": "nope"}, "unknown KV policy 'nope'"),
        (
            {"kv_shared_prefix": -1},
            'kv_shared_prefix must be a number of prompt tokens (>= 0) or "images", got -1',
        ),
        ({"kv_shared_prefix": True}, "kv_shared_prefix must be a number of prompt tokens (>= 0) or"),
        ({"kv_shared_prefix": "system"}, "or \"images\", got 'system'"),
        ({"kv_shared_prefix": 1.5}, "got 1.5"),
        ({"kv_reuse": 2}, "kv_reuse must be true or false, got 2"),
        ({"kv_reuse": "yes"}, "kv_reuse must be true or false, got 'yes'"),
    ]:
        with pytest.raises(PolicyError) as e:
            resolve_request(bad, None)
        assert msg in str(e.value)


@pytest.mark.parametrize(
    "allow,extra,msg",
    [
        (
            "none",
            {"kv_budget": 0.5},
            "overrides are off on this server (--kv-overrides none); drop ['kv_budget']",
        ),
        ("budget", {"kv_policy": "full"}, "only kv_budget (--kv-overrides budget); kv_policy,"),
        (
            "budget",
            {"kv_shared_prefix": 64},
            "kv_policy_config, kv_shared_prefix and kv_reuse need --kv-overrides any",
        ),
        ("budget", {"kv_reuse": True}, "kv_shared_prefix and kv_reuse need --kv-overrides any"),
        ("none", {"kv_shared_prefix": "images"}, "drop ['kv_shared_prefix']"),
        ("none", {"kv_reuse": False}, "drop ['kv_reuse']"),
        ("budget", {"kv_budget": 0.05}, "kv_budget 0.05 is outside this server's bounds [0.1, 0.8]"),
        ("any", {"kv_policy": "snapkv", "kv_budget": 0.9}, "kv_budget 0.9 is outside this server's bounds"),
    ],
)
def test_override_rules_refuse_with_the_flag_that_allows(allow: str, extra: dict, msg: str) -> None:
    engine = KVMMSettings(policy="snapkv", budget=0.3, overrides=allow, budget_min=0.1, budget_max=0.8)
    for default in (engine, None):  # the scheduler (engine known) and the API process alike
        with pytest.raises(PolicyError) as e:
            resolve_request(extra, default, 100, engine.rules)
        assert msg in str(e.value)


def test_an_invalid_budget_gets_the_range_message_not_the_bounds() -> None:
    engine = KVMMSettings(policy="snapkv", budget=0.3, overrides="budget", budget_min=0.1, budget_max=0.8)
    for default, msg in [
        (engine, "budget: Input should be less than or equal to 1 (got 1.5)"),
        (None, "kv_budget must be a number in (0, 1], got 1.5"),
    ]:
        with pytest.raises(PolicyError) as e:
            resolve_request({"kv_budget": 1.5}, default, 100, engine.rules)
        assert msg in str(e.value)


def test_override_rules_allow_what_they_say() -> None:
    engine = KVMMSettings(policy="snapkv", budget=0.3, overrides="budget", budget_min=0.1, budget_max=0.8)
    assert resolve_request({"kv_budget": 0.1}, engine, 100, engine.rules).budget == 0.1
    assert resolve_request({"other": 1}, engine, 100, engine.rules).budget == 0.3  # no override named
    with pytest.raises(ValueError, match=r"--kv-budget-min 0\.9 exceeds --kv-budget-max 0\.5"):
        KVMMSettings(policy="snapkv", budget_min=0.9, budget_max=0.5)


def _vllm_config(settings: KVMMSettings, pp: int = 1) -> SimpleNamespace:
    """What the scheduler-side connector reads of vLLM's config."""
    return SimpleNamespace(
        kv_transfer_config=object(),
        additional_config=settings.to_additional_config(),
        cache_config=SimpleNamespace(block_size=BS),
        parallel_config=SimpleNamespace(pipeline_parallel_size=pp, tensor_parallel_size=1),
    )


def test_a_refused_override_at_admission_runs_the_engine_policy_not_full() -> None:
    from vllm_kvmm.vllm_ext.connector import KVMMConnector

    settings = KVMMSettings(policy="snapkv", budget=0.3, overrides="none")
    conn = KVMMConnector(_vllm_config(settings), KVConnectorRole.SCHEDULER)
    conn.bind_gpu_block_pool(_pool_and_managers(groups=1, blocks=8)[0])
    req = _request("a", 64, {"kv_policy": "full"})  # offline use: nothing checked it before admission
    conn.on_new_request(req)
    _, params = conn.request_finished(req, [])
    assert params == {"kvmm": {"policy": "snapkv", "budget": 0.3, "compressed": False}}


def test_under_pipeline_parallelism_a_policy_needing_every_layer_runs_the_engine_policy() -> None:
    from vllm_kvmm.vllm_ext.connector import KVMMConnector

    settings = KVMMSettings(policy="snapkv", budget=0.3)
    conn = KVMMConnector(_vllm_config(settings, pp=2), KVConnectorRole.SCHEDULER)
    conn.bind_gpu_block_pool(_pool_and_managers(groups=1, blocks=8)[0])
    for i, name in enumerate(("meda", "hae", "pyramidkv")):
        req = _request(f"r{i}", 64, {"kv_policy": name, "kv_budget": 0.5})
        conn.on_new_request(req)
        _, params = conn.request_finished(req, [])
        expected = ("pyramidkv", 0.5) if name == "pyramidkv" else ("snapkv", 0.3)
        assert (params["kvmm"]["policy"], params["kvmm"]["budget"]) == expected


def test_worker_reports_add_up_over_pipeline_stages_and_count_tensor_ranks_once() -> None:
    from vllm_kvmm.vllm_ext.messages import CompressedGroup, KVMMWorkerMeta

    def report(stage: int, groups: list[int], kept: int) -> KVMMWorkerMeta:
        m = KVMMWorkerMeta(num_layers=len(groups), stages={stage})
        m.compressed["r"] = [CompressedGroup(g, 1, 3, 20, (1, 2)) for g in groups]
        m.kept_token_layers["r"], m.prompt_tokens["r"] = kept, 64
        return m

    # Stage 0 holds groups 0-1, stage 1 groups 2-3; each stage has two tensor-parallel ranks.
    out = report(0, [0, 1], 40)
    for other in (report(0, [0, 1], 40), report(1, [2, 3], 50), report(1, [2, 3], 50)):
        out = out.aggregate(other)
    assert [g.group for g in out.compressed["r"]] == [0, 1, 2, 3]
    assert (out.kept_token_layers["r"], out.num_layers, out.stages) == (90, 4, {0, 1})


# ---- the connector's scheduler half ------------------------------------------------------------------
def _connector(policy: str, budget: float, **config: Any) -> tuple[Any, BlockPool, list[CompressManager]]:
    from vllm_kvmm.vllm_ext.connector import KVMMConnector

    settings = KVMMSettings(policy=policy, budget=budget, config=config)
    conn = KVMMConnector(_vllm_config(settings), KVConnectorRole.SCHEDULER)
    pool, mgrs = _pool_and_managers(groups=2, blocks=20)
    conn.bind_gpu_block_pool(pool)
    return conn, pool, mgrs


def _request(req_id: str, n: int, extra: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        request_id=req_id,
        sampling_params=SimpleNamespace(extra_args=extra),
        resumable=False,
        num_prompt_tokens=n,
        num_computed_tokens=0,
        num_preemptions=0,
        mm_features=[],
    )


def _step(conn: Any, scheduled: dict[str, int], finished: tuple[str, ...] = ()) -> Any:
    out = SimpleNamespace(
        finished_req_ids=set(finished), preempted_req_ids=set(), num_scheduled_tokens=scheduled
    )
    return conn.build_connector_meta(out)


def test_scheduler_metadata_chunks_completion_and_flush_cadence() -> None:
    conn, _pool, mgrs = _connector("h2o", 0.5, decode_interval=16)
    a = _request("a", 40)
    conn.on_new_request(a)
    for m in mgrs:
        m.allocate_new_blocks("a", 40, 40)
    meta = _step(conn, {"a": 32})  # first chunk
    job = meta.jobs["a"]
    assert (job.q_start, job.num_new, job.completes, job.block_ids) == (0, 32, False, None)
    assert job.policy.name == "h2o" and job.policy.decode_interval == 16
    a.num_computed_tokens = 32
    job = _step(conn, {"a": 8}).jobs["a"]  # last chunk: the block rows of both groups travel with it
    assert (job.q_start, job.num_new, job.completes, job.end) == (32, 8, True, 40)
    assert job.block_ids == [[1, 2, 3], [4, 5, 6]]  # group 0 allocated first, then group 1, one pool
    a.num_computed_tokens = 40
    meta = _step(conn, {"a": 1})
    assert meta.decoding == {"a": 41} and meta.flushes == {} and meta.jobs == {}
    a.num_computed_tokens = 55
    meta = _step(conn, {"a": 1})  # the 16th generated token: flush
    assert meta.flushes["a"].length == 56 and meta.flushes["a"].block_ids == [[1, 2, 3], [4, 5, 6]]


def test_scheduler_schedules_no_flush_when_the_policy_cannot_evict() -> None:
    conn, _, _mgrs = _connector("h2o", 0.5, decode_interval=16)
    a = _request("a", 40, {"kv_budget": 1.0})  # budget 1: H2O keeps everything, decode_spec is None
    conn.on_new_request(a)
    a.num_computed_tokens = 55
    meta = _step(conn, {"a": 1})
    assert meta.decoding == {} and meta.flushes == {}


def test_worker_report_frees_blocks_unless_stale_and_reaches_the_output() -> None:
    conn, pool, mgrs = _connector("snapkv", 0.25)
    a, b = _request("a", 64), _request("b", 64)
    for r in (a, b):
        conn.on_new_request(r)
        for m in mgrs:
            m.allocate_new_blocks(r.request_id, 64, 64)
    free0 = pool.get_num_free_blocks()
    b.num_preemptions = 1  # b was preempted after the worker compressed it: its report is stale
    meta = KVMMWorkerMeta(
        compressed={
            "a": [CompressedGroup(0, 1, 3, 32, (1, 2)), CompressedGroup(1, 1, 3, 32, (1, 2))],
            "b": [CompressedGroup(0, 1, 3, 32, (1, 2))],
        },
        prompt_tokens={"a": 64, "b": 64},
        kept_token_layers={"a": 64, "b": 64},
        epochs={"a": 0, "b": 0},
        num_layers=2,
    )
    conn.update_connector_output(SimpleNamespace(kv_connector_worker_meta=meta))
    assert pool.get_num_free_blocks() == free0 + 4
    assert _ids(mgrs[0], "a")[1:3] == [0, 0] and _ids(mgrs[0], "b")[1:3] != [0, 0]
    _, params = conn.request_finished(a, [])
    assert params == {
        "kvmm": {
            "policy": "snapkv",
            "budget": 0.25,
            "compressed": True,
            "prompt_tokens": 64,
            "kv_kept": 0.5,
            "budget_met": False,  # 0.5 > 1.1 × 0.25: a 64-token prompt's minimum exceeds the budget
        }
    }
    _, params = conn.request_finished(b, [])
    assert params == {"kvmm": {"policy": "snapkv", "budget": 0.25, "compressed": False}}
    assert conn._requests == {} and conn._policies == {}


def test_a_compression_and_a_flush_in_one_step_both_free_and_count() -> None:
    """A prompt compressed at the start of a step may flush at its end (decode interval 1): the worker
    reports the two apart and the scheduler frees both, counts both and reports the compression."""
    conn, pool, mgrs = _connector("h2o", 0.25, decode_interval=1)
    a = _request("a", 64)
    conn.on_new_request(a)
    for m in mgrs:
        m.allocate_new_blocks("a", 80, 80)  # 5 blocks: the prompt and a decode block
    free0 = pool.get_num_free_blocks()
    meta = KVMMWorkerMeta(
        compressed={"a": [CompressedGroup(0, 1, 3, 32, (1, 2)), CompressedGroup(1, 1, 3, 32, (1, 2))]},
        flushed={"a": [CompressedGroup(0, 1, 4, 20, (3,))]},
        prompt_tokens={"a": 64},
        kept_token_layers={"a": 64},
        epochs={"a": 0},
        num_layers=2,
    )
    conn.update_connector_output(SimpleNamespace(kv_connector_worker_meta=meta))
    conn.update_connector_output(SimpleNamespace(kv_connector_worker_meta=meta))  # patch 6, then vLLM
    assert pool.get_num_free_blocks() == free0 + 5
    assert _ids(mgrs[0], "a")[1:4] == [0, 0, 0] and _ids(mgrs[1], "a")[1:3] == [0, 0]
    stats = conn.get_kv_connector_stats()
    assert stats is not None
    got = {k: stats.data[k] for k in ("blocks_freed", "decode_flushes", "compressed_requests")}
    assert got == {"blocks_freed": 5, "decode_flushes": 1, "compressed_requests": 1}
    _, params = conn.request_finished(a, [])
    assert params["kvmm"]["compressed"] is True and params["kvmm"]["kv_kept"] == 0.5


def test_a_contained_failure_stops_flushes_is_counted_and_reaches_the_output() -> None:
    conn, _pool, mgrs = _connector("h2o", 0.5, decode_interval=16)
    a, b = _request("a", 40), _request("b", 40)
    for r in (a, b):
        conn.on_new_request(r)
        for m in mgrs:
            m.allocate_new_blocks(r.request_id, 40, 40)
    b.num_preemptions = 1  # b's failure report is from before its preemption: stale, ignored
    meta = KVMMWorkerMeta(
        failed={"a": "flush: ValueError: boom", "b": "compression: ValueError: old"},
        epochs={"a": 0, "b": 0},
        durations=[0.25, 0.5],
    )
    conn.update_connector_output(SimpleNamespace(kv_connector_worker_meta=meta))
    stats = conn.get_kv_connector_stats()
    assert stats is not None and stats.data["failed_compressions"] == 1
    assert stats.data["compression_durations"] == [0.25, 0.5]
    assert stats.reduce() == {"failed_compressions": 1, "compression_seconds": 0.0}  # lists stay out of logs
    a.num_computed_tokens = b.num_computed_tokens = 55
    meta = _step(conn, {"a": 1, "b": 1})  # both at their 16th generated token
    assert set(meta.flushes) == {"b"} and set(meta.decoding) == {"b"}
    _, params = conn.request_finished(a, [])
    assert params == {
        "kvmm": {"policy": "h2o", "budget": 0.5, "compressed": False, "error": "flush: ValueError: boom"}
    }


def test_stats_aggregate_counts_and_observations() -> None:
    from vllm_kvmm.vllm_ext.metrics import KVMMStats

    a = KVMMStats({"blocks_freed": 3, "compression_durations": [0.1]})
    b = KVMMStats({"blocks_freed": 2, "compression_durations": [0.2, 0.3], "failed_compressions": 1})
    assert a.aggregate(b).data == {
        "blocks_freed": 5,
        "compression_durations": [0.1, 0.2, 0.3],
        "failed_compressions": 1,
    }


# ---- the contract check ----------------------------------------------------------------------------------
def test_contract_check_names_a_renamed_internal() -> None:
    assert internals.check_reads() == []  # this vLLM has every attribute we read

    def renamed(owner: str) -> set[str]:
        real = {a.split(".", 1)[1] for a in internals.READS if a.startswith(owner + ".")}
        return real - {"_seq_lens_cpu"} | {"_seq_lens_on_cpu"}  # as if vLLM renamed one field

    assert internals.check_reads(renamed) == ["CommonAttentionMetadata._seq_lens_cpu is gone"]


def test_start_up_refuses_when_vllm_moved_an_internal(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_kvmm.vllm_ext import patches

    real = internals._provided

    def moved(owner: str) -> set[str]:  # as if vLLM renamed the manager's req_to_blocks
        return real(owner) - {"req_to_blocks"} if owner == "SingleTypeKVCacheManager" else real(owner)

    monkeypatch.setattr(internals, "_provided", moved)
    with pytest.raises(
        RuntimeError, match=r"vLLM internals moved: SingleTypeKVCacheManager\.req_to_blocks is gone"
    ):
        patches.check_vllm_internals()


# ---- compressed reuse (vllm_ext/reuse.py) ----------------------------------------------------------
def _reuse_setup() -> tuple[Any, BlockPool, list[CompressManager]]:
    """A scheduler-side connector (snapkv 0.25) over two groups of one caching pool of 20 blocks."""
    from vllm_kvmm.vllm_ext.connector import KVMMConnector

    settings = KVMMSettings(policy="snapkv", budget=0.25)
    groups = SimpleNamespace(kv_cache_groups=[None, None])
    conn = KVMMConnector(_vllm_config(settings), KVConnectorRole.SCHEDULER, groups)
    pool, mgrs = _pool_and_managers(groups=2, blocks=20, caching=True)
    conn.bind_gpu_block_pool(pool)
    return conn, pool, mgrs


def _chat_request(req_id: str, tokens: int, prompt: int, extra: dict | None) -> SimpleNamespace:
    """A request whose whole blocks hash to ``h0, h1, ...`` (the same tokens, the same hashes)."""
    r = _request(req_id, prompt, extra)
    r.num_tokens = tokens
    r.block_hashes = [f"h{i}".encode() for i in range(tokens // BS)]
    return r


def _admit(conn: Any, mgrs: list[CompressManager], r: Any) -> int:
    """vLLM's admission of a new request with no local hit: connector tokens, block count, placement."""
    ext, load_async = conn.get_num_new_matched_tokens(r, 0)
    assert not load_async
    counts = {
        m.get_num_blocks_to_allocate(r.request_id, r.num_tokens, [], ext, 0, r.num_tokens) for m in mgrs
    }
    for m in mgrs:
        m.add_local_computed_blocks(r.request_id, [], 0, ext)
    if ext:
        for m in mgrs:
            m.allocate_external_computed_blocks(r.request_id, 0, ext)
    for m in mgrs:
        m.allocate_new_blocks(r.request_id, r.num_tokens, r.num_tokens)
    conn.update_state_after_alloc(r, None, ext)
    r.num_computed_tokens = ext
    (count,) = counts
    return count


def test_a_finished_compressed_row_is_an_entry_a_follow_up_takes_without_fresh_blocks() -> None:
    conn, pool, mgrs = _reuse_setup()
    a = _chat_request("a", 80, 64, None)  # 64 prompt tokens, 16 generated
    conn.on_new_request(a)
    for m in mgrs:
        m.allocate_new_blocks("a", 80, 80)  # group 0: blocks 1-5, group 1: 6-10
    done = [CompressedGroup(g, 1, 3, 40, (1, 2)) for g in (0, 1)]  # keep block 0, tail from block 3
    meta = KVMMWorkerMeta(compressed={"a": done}, prompt_tokens={"a": 64}, kept_token_layers={"a": 80},
                          epochs={"a": 0}, num_layers=2)  # fmt: skip
    conn.update_connector_output(SimpleNamespace(kv_connector_worker_meta=meta))
    a.num_computed_tokens = 79  # the last token's KV was never computed: 4 whole blocks
    conn.request_finished(a, [])
    for m in mgrs:
        m.free("a")
    assert pool.get_num_free_blocks() == 19  # the entry holds nothing

    # B: A's 80 tokens and 20 more, asking for reuse under the same policy.
    b = _chat_request("b", 100, 100, {"kv_reuse": True})
    conn.on_new_request(b)
    # vLLM would count 7 fresh blocks per group; the entry brings 4, of which 2 real ones leave the queue.
    assert _admit(conn, mgrs, b) == 5
    assert _ids(mgrs[0], "b")[:4] == [1, 0, 0, 4] and _ids(mgrs[1], "b")[:4] == [6, 0, 0, 9]
    assert b.num_computed_tokens == 64 and pool.get_num_free_blocks() == 19 - 4 - 2 * 3
    meta = _step(conn, {"b": 36})
    assert meta.jobs == {} and meta.adopted["b"].layout == {0: (1, 3), 1: (1, 3)}
    assert _step(conn, {"b": 1}).adopted == {}  # told once per epoch
    # C: the same tokens under another budget never takes it; D without kv_reuse neither.
    for rid, extra in (("c", {"kv_budget": 0.5, "kv_reuse": True}), ("d", None)):
        r = _chat_request(rid, 100, 100, extra)
        conn.on_new_request(r)
        assert conn.get_num_new_matched_tokens(r, 0) == (0, False)
        conn.request_finished(r, [])
    _, params = conn.request_finished(b, [])
    assert params["kvmm"]["reused"] == 64 and params["kvmm"]["compressed"] is False
    for m in mgrs:
        m.free("b")
    assert pool.get_num_free_blocks() == 19
    # Reallocating one of the entry's blocks ends it: E finds nothing.
    for m in mgrs:
        m.allocate_new_blocks("x", 16 * 9, 16 * 9)
    e = _chat_request("e", 100, 100, {"kv_reuse": True})
    conn.on_new_request(e)
    assert conn.get_num_new_matched_tokens(e, 0) == (0, False)
