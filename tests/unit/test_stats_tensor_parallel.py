"""Statistics split over tensor-parallel ranks (heads sharded) equal the single-device statistics."""

from __future__ import annotations

import threading

import torch

from vllm_kvmm.ops import StatsAccumulator, StatsRequest


class _Ranks:
    """An in-process all-reduce (sum) for ``world`` threads, each one standing for a rank."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.parts: list[torch.Tensor | None] = [None] * world

    def all_reduce(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = t.clone()
            self.barrier.wait()
            total = torch.stack([p for p in self.parts if p is not None]).sum(0)
            self.barrier.wait()
            return total

        return reduce


def test_sharded_heads_give_single_device_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    n, h, h_kv, d, world = 96, 8, 4, 32, 2
    q, k = torch.randn(n, h, d, generator=g), torch.randn(n, h_kv, d, generator=g)
    vision = torch.zeros(n, dtype=torch.bool)
    vision[10:40] = True
    vision[50:70] = True
    req = StatsRequest(colsum=True, window=16, entropy=True, cross_entropy=True, t2v=True)
    full = StatsAccumulator(req, n, h, h_kv, vision, 0.2, chunk=24)
    for s in range(0, n, 40):  # chunked prefill
        full.update(q[s : s + 40], k[: s + 40], s)
    ref = full.result()

    ranks, results = _Ranks(world), [None] * world
    hs, hks = h // world, h_kv // world

    def run(r: int) -> None:
        acc = StatsAccumulator(
            req, n, hs, hks, vision, 0.2, chunk=24, all_reduce=ranks.all_reduce(r), world=world
        )
        for s in range(0, n, 40):
            acc.update(q[s : s + 40, r * hs : (r + 1) * hs], k[: s + 40, r * hks : (r + 1) * hks], s)
        results[r] = acc.result()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, st in enumerate(results):
        assert st is not None
        for name in ("entropy", "entropy_tv", "entropy_vt"):
            assert torch.allclose(getattr(st, name), getattr(ref, name), rtol=1e-5), name
        assert torch.allclose(st.t2v_sum, ref.t2v_sum, atol=1e-6)
        assert torch.allclose(st.t2v_max, ref.t2v_max, atol=1e-6)
        sl = slice(r * hks, (r + 1) * hks)  # per-KV-head statistics stay local to the rank's heads
        assert torch.allclose(st.colsum, ref.colsum[sl], atol=1e-5)
        assert torch.allclose(st.window, ref.window[sl], atol=1e-5)
