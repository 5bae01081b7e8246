"""Compaction after a prompt's last prefill chunk: plan every layer, move the kept KV, report freed blocks.

Per KV-cache group the kept prefix is written into logical blocks ``[0, keep)`` and the recent tail stays
in place from block ``tail``; blocks ``[keep, tail)`` are reported to the scheduler, which frees them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vllm_kvmm.ops import LayerStats
from vllm_kvmm.policies import LayerPlan, MergeSpec, apply_plan, plan_compression
from vllm_kvmm.vllm_ext.messages import CompressedGroup, PrefillJob
from vllm_kvmm.vllm_ext.paged_kv import flat_slots
from vllm_kvmm.vllm_ext.worker.moves import MOVE_BYTES, Move, chunked, move_kv
from vllm_kvmm.vllm_ext.worker.requests import RequestState

if TYPE_CHECKING:
    from vllm_kvmm.vllm_ext.worker.layout import EngineLayout
    from vllm_kvmm.vllm_ext.worker.state import WorkerState

__all__ = ["check_finite", "compress"]


def compress(state: WorkerState, job: PrefillJob, st: RequestState) -> None:
    """Plan every layer of ``job``'s prompt, then compact and report what each KV-cache group freed.

    Without merging only the kept prefixes move, groups in runs of at most :data:`MOVE_BYTES` (one gather
    and one write per cache tensor the run's layers share: :func:`move_kv`); a merging policy computes
    and writes group by group. Failure-safe by construction (:meth:`WorkerState.contain`): nothing is
    written before every layer is planned and every group's layout checked, and a run (or group) is
    written only once all its layers' kept KV is gathered (computed), so a failure leaves each group
    either untouched or fully compacted (and reported).
    """
    engine = state.engine
    if engine.paged is None:
        raise RuntimeError("kvmm: no KV-cache accessor: the attention backend is not vllm-kvmm's")
    info, policy = st.info, st.policy
    n, bs = info.num_tokens, engine.block_size
    stats = [st.accs[i].result() if i in st.accs else None for i in range(engine.num_layers)]
    st.accs.clear()
    check_finite(stats)
    plans = plan_compression(
        policy,
        stats,
        info,
        granularity=bs,
        groups=engine.layer_groups(),
        layers=engine.local_layers,
        frozen=st.shared,
    )
    if state.recorder is not None:
        state.recorder.plans[job.req_id] = plans
    merge = policy.merge_spec(info)
    assert job.block_ids is not None
    members = engine.members()
    done: list[CompressedGroup] = []
    kept = n * len(engine.layers)  # this stage's layers (pipeline stages' reports add up)
    try:
        layouts = {group: _group_layout(plans, layers, bs, group) for group, layers in members.items()}
        # Decode-time state, computed before anything is written: a run is written whole or not at all.
        decode = (
            {
                i: _decode_state(engine.num_kv_heads, plans[i], stats[i], n, job.end)
                for layers in members.values()
                for _, i in layers
            }
            if st.decode is not None
            else {}
        )
        ids = {g: torch.tensor(job.block_ids[g][: -(-n // bs)], dtype=torch.long) for g in members}
        if merge is None:  # only the kept prefix moves: groups in runs, one gather and write per cache tensor
            moves = {
                g: [m for name, i in layers if (m := _kept_move(engine, name, plans[i], ids[g])) is not None]
                for g, layers in members.items()
            }
            sizes = ((g, sum(m.nbytes(engine) for m in moves[g])) for g in sorted(members))
            runs = chunked(sizes, MOVE_BYTES)
        else:
            runs = [[g] for g in sorted(members)]
        for run in runs:
            if merge is None:
                move_kv(engine, [m for g in run for m in moves[g]])
            else:
                (group,) = run
                # Compute every layer of the group first, then write: a failure leaves the group untouched.
                merged = [
                    (name, _merged_kv(engine, name, plans[i], ids[group], n, merge))
                    for name, i in members[group]
                ]
                for name, write in merged:
                    if write is not None:
                        engine.paged.write(engine.kv_caches[name], *write)
            for group in run:
                layers, (keep, tail) = members[group], layouts[group]
                for _, i in layers:
                    if i in decode:
                        st.positions[i], st.scores[i] = decode[i]
                        st.capacity[i] = plans[i].num_kept
                if keep < tail or st.decode is not None:
                    st.compact[group] = (tuple(range(keep)), tail)
                if keep < tail:
                    freed = tuple(range(keep, tail))
                    done.append(CompressedGroup(group, keep, tail, plans[layers[0][1]].num_kept, freed))
                    kept -= sum(n - plans[i].num_kept for _, i in layers)
    finally:
        # What was compacted is reported even when a later group failed: its blocks are no longer read.
        if done:
            out = state.out
            out.compressed[job.req_id] = done
            out.prompt_tokens[job.req_id] = n
            out.kept_token_layers[job.req_id] = kept
            out.epochs[job.req_id] = job.epoch
            out.num_layers = len(engine.layers)
            out.stages.add(engine.stage)
    # Reached only when every group is done: this epoch's layout is final (an entry may be made of it).
    state.out.settled[job.req_id] = job.epoch


def check_finite(stats: list[LayerStats | None]) -> None:
    """Raise ``FloatingPointError`` naming the first statistics that hold a non-finite value.

    Scores (column sums, windows, text→vision sums) must be finite; entropies may be ``nan`` by contract
    (a map with no rows) but never infinite. One device sync for all layers.
    """
    named = []
    for layer, st in enumerate(stats):
        if st is None:
            continue
        for field in ("colsum", "window", "t2v_sum", "t2v_max"):
            t = getattr(st, field)
            if t is not None:
                named.append((f"layer {layer} {field}", torch.isfinite(t).all()))
        for field in ("entropy", "entropy_tv", "entropy_vt"):
            t = getattr(st, field)
            if t is not None:
                named.append((f"layer {layer} {field}", ~torch.isinf(t).any()))
    if not named or bool(torch.stack([ok.cpu() for _, ok in named]).all()):
        return
    bad = [name for name, ok in named if not bool(ok)]
    raise FloatingPointError(f"non-finite statistics ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")


def _group_layout(
    plans: list[LayerPlan], layers: list[tuple[str, int]], bs: int, group: int
) -> tuple[int, int]:
    """``(keep, tail)`` in blocks, which every layer of a group must share."""
    shapes = {(plans[i].prefix_keep // bs, plans[i].tail_start // bs) for _, i in layers}
    if len(shapes) != 1:
        raise RuntimeError(f"kvmm: layers of group {group} planned different layouts {sorted(shapes)}")
    return next(iter(shapes))


def _kept_move(engine: EngineLayout, name: str, plan: LayerPlan, ids: torch.Tensor) -> Move | None:
    """The move that compacts one layer without merging (``None``: nothing moves): only the kept prefix,
    and only its tokens are read (ρ of the prompt, not all of it). The frozen prefix stays in place
    unchanged (``apply_plan``), so its slots are not written at all: other requests may read its blocks;
    the tail is unchanged too."""
    if plan.is_identity or plan.prefix_keep == plan.tail_start:
        return None
    f = min(plan.frozen, plan.prefix_keep)
    if f == plan.prefix_keep:
        return None
    bs = engine.block_size
    src = plan.keep[:, f : plan.prefix_keep]  # [H_kv, K]: the kept prefix, per head
    return Move(name, flat_slots(ids, src, bs), flat_slots(ids, torch.arange(f, plan.prefix_keep), bs))


def _merged_kv(
    engine: EngineLayout, name: str, plan: LayerPlan, ids: torch.Tensor, n: int, merge: MergeSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(slots, keys, values)`` that compact one layer of a merging policy (``None``: nothing changes):
    evicted tokens are folded into kept ones (the tail's included), so the whole row is read, and the kept
    prefix and the tail are written — all but the frozen prefix, which stays as it was."""
    if plan.is_identity or plan.prefix_keep == plan.tail_start:
        return None
    bs = engine.block_size
    k, v = engine.paged.read(engine.kv_caches[name], ids, n)  # [N, H_kv, d]
    k2, v2 = apply_plan(plan, k.transpose(0, 1), v.transpose(0, 1), merge)  # [H_kv, K_total, d]
    # Destination slots: the kept prefix fills logical blocks [0, keep); the tail stays in place.
    pos = torch.cat([torch.arange(plan.prefix_keep), torch.arange(plan.tail_start, n)])
    f = min(plan.frozen, plan.num_kept)
    pos, k2, v2 = pos[f:], k2[:, f:], v2[:, f:]
    return flat_slots(ids, pos, bs), k2.transpose(0, 1), v2.transpose(0, 1)


def _decode_state(h: int, plan: LayerPlan, stats: Any, n: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and H2O scores ``[H_kv, S]`` of the slots kept by prefill, in the compact view's slot
    order (``n``: prompt tokens; ``end``: tokens computed so far)."""
    head = plan.keep[:, : plan.prefix_keep]
    tail = torch.arange(plan.tail_start, max(end, n)).expand(h, -1)  # a recompute may reach past N
    positions = torch.cat([head, tail], 1)
    score = torch.zeros(positions.shape, dtype=torch.float64)
    col = stats.colsum if stats is not None else None
    if col is not None:
        known = plan.keep.shape[1]  # prompt slots; tokens past the prompt start at zero
        score[:, :known] = torch.gather(col.double().cpu(), 1, plan.keep)
    return positions, score
