"""Compaction after a prompt's last prefill chunk: plan every layer, move the kept KV, report freed blocks.

Per KV-cache group the kept prefix is written into logical blocks ``[0, keep)`` and the recent tail stays
in place from block ``tail``; blocks ``[keep, tail)`` are reported to the scheduler, which frees them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vllm_kvmm.policies import LayerPlan, apply_plan, plan_compression
from vllm_kvmm.vllm_ext.messages import CompressedGroup, PrefillJob
from vllm_kvmm.vllm_ext.worker.requests import RequestState

if TYPE_CHECKING:
    from vllm_kvmm.vllm_ext.worker.state import WorkerState

__all__ = ["compress"]


def compress(state: WorkerState, job: PrefillJob, st: RequestState) -> None:
    engine = state.engine
    if engine.paged is None:
        raise RuntimeError("kvmm: no KV-cache accessor: the attention backend is not vllm-kvmm's")
    info, policy = st.info, st.policy
    n, bs = info.num_tokens, engine.block_size
    stats = [st.accs[i].result() if i in st.accs else None for i in range(engine.num_layers)]
    plans = plan_compression(policy, stats, info, granularity=bs, groups=engine.layer_groups())
    st.accs.clear()
    if state.recorder is not None:
        state.recorder.plans[job.req_id] = plans
    merge = policy.merge_spec(info)
    assert job.block_ids is not None
    report: dict[int, CompressedGroup] = {}
    for name, ref in engine.layers.items():
        plan = plans[ref.index]
        keep, tail = plan.prefix_keep // bs, plan.tail_start // bs
        prev = report.get(ref.group)
        if prev is not None and (prev.keep, prev.tail) != (keep, tail):
            raise RuntimeError(f"kvmm: layers of group {ref.group} planned different layouts")
        report[ref.group] = CompressedGroup(ref.group, keep, tail, plan.num_kept, tuple(range(keep, tail)))
        if st.decode is not None:
            _start_decode_state(st, engine.num_kv_heads, ref.index, plan, stats[ref.index], job.end)
            st.compact[ref.group] = (tuple(range(keep)), tail)
        if plan.is_identity or keep == tail:
            continue
        ids = torch.tensor(job.block_ids[ref.group][: -(-n // bs)], dtype=torch.long)
        cache = engine.kv_caches[name]
        k, v = engine.paged.read(cache, ids, n)  # [N, H_kv, d]
        k2, v2 = apply_plan(plan, k.transpose(0, 1), v.transpose(0, 1), merge)  # [H_kv, K_total, d]
        # Destination slots: the kept prefix fills logical blocks [0, keep); the tail stays in place.
        pos = torch.cat([torch.arange(plan.prefix_keep), torch.arange(plan.tail_start, n)])
        slots = ids[pos // bs] * bs + pos % bs
        engine.paged.write(cache, slots, k2.transpose(0, 1), v2.transpose(0, 1))
        st.compact[ref.group] = (tuple(range(keep)), tail)
    groups = [g for g in report.values() if g.keep < g.tail]
    if groups:
        out = state.out
        out.compressed[job.req_id] = groups
        out.prompt_tokens[job.req_id] = n
        out.kept_token_layers[job.req_id] = sum(p.num_kept for p in plans)
        out.epochs[job.req_id] = job.epoch
        out.num_layers = engine.num_layers


def _start_decode_state(st: RequestState, h: int, layer: int, plan: LayerPlan, stats: Any, end: int) -> None:
    """Positions and H2O scores of the slots kept by prefill, in the compact view's slot order."""
    n = st.info.num_tokens
    head = plan.keep[:, : plan.prefix_keep]
    tail = torch.arange(plan.tail_start, max(end, n)).expand(h, -1)  # a recompute may reach past N
    st.positions[layer] = torch.cat([head, tail], 1)
    score = torch.zeros(st.positions[layer].shape, dtype=torch.float64)
    col = stats.colsum if stats is not None else None
    if col is not None:
        known = plan.keep.shape[1]  # prompt slots; tokens past the prompt start at zero
        score[:, :known] = torch.gather(col.double().cpu(), 1, plan.keep)
    st.scores[layer] = score
    st.capacity[layer] = plan.num_kept
