"""HAE's decode-time recycle bin (``RecycleBin``): hand-computed scenarios and a greedy-H2O twin."""

from __future__ import annotations

import pytest
import torch

from vllm_kvmm.policies import RecycleBin

T, F = True, False


def b(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_bin_restore_purge_by_hand():
    rb = RecycleBin(num_kv_heads=2, capacity=4, bin_size=2, protect_recent=1)
    rb.start(t([[5, 1, 3, 2], [1, 4, 2, 6]]))
    assert rb.active.tolist() == [[T, T, T, T]] * 2 and rb.bin_count == 0

    # step 1: scores h0 [5, 1, 3, 2, .5], h1 [1, 4, 2, 6, .5]; the new slot 4 is protected (recent 1)
    # → each head bins its lowest older slot: h0 slot 1 (1), h1 slot 0 (1)
    ev = rb.step(t([[0, 0, 0, 0, 0.5], [0, 0, 0, 0, 0.5]]))
    assert ev.active.tolist() == [[T, F, T, T, T], [F, T, T, T, T]]
    assert ev.binned.tolist() == [[F, T, F, F, F], [T, F, F, F, F]]
    assert not ev.restored.any() and not ev.purged and ev.keep is None
    assert rb.bin_count == 1 and rb.num_slots == 5

    # step 2: h0 slot 1 recovers (1 + 3 = 4 > 3, 2, .5) → restored; slots 3 (2) and 4 (.5) binned.
    # h1 [1, 4, 2, 6, .5, .2]: slot 4 (now unprotected) binned. Bin holds 2 = bin_size → purge.
    ev = rb.step(t([[0, 3, 0, 0, 0, 0.1], [0, 0, 0, 0, 0, 0.2]]))
    assert ev.active.tolist() == [[T, T, T, F, F, T], [F, T, T, T, F, T]]
    assert ev.binned.tolist() == [[F, F, F, T, T, F], [F, F, F, F, T, F]]
    assert ev.restored.tolist() == [[F, T, F, F, F, F], [F] * 6]
    assert ev.purged and ev.keep.tolist() == [[0, 1, 2, 5], [1, 2, 3, 5]]
    # storage is compacted to the kept slots, scores follow, everything is active again
    assert rb.num_slots == 4 and rb.bin_count == 0 and rb.active.all()
    assert rb.scores.tolist() == [[5, 4, 3, 0.1], [4, 2, 6, 0.2]]

    # step 3 (renumbered slots): h0 [5, 4, 3, .1, 1] bins slot 3; h1 [4, 2, 6, 5.2, 0] bins slot 1
    ev = rb.step(t([[0, 0, 0, 0, 1], [0, 0, 0, 5, 0]]))
    assert ev.binned.tolist() == [[F, F, F, T, F], [F, T, F, F, F]]
    assert ev.active.tolist() == [[T, T, T, F, T], [T, F, T, T, T]]
    assert not ev.purged and rb.bin_count == 1


def test_restore_without_purge():
    rb = RecycleBin(num_kv_heads=2, capacity=3, bin_size=3, protect_recent=1)
    rb.start(t([[3, 2, 1], [1, 2, 3]]))
    ev = rb.step(t([[0, 0, 0, 0], [0, 0, 0, 0]]))  # [3, 2, 1, 0*] / [1, 2, 3, 0*]
    assert ev.binned.tolist() == [[F, F, T, F], [T, F, F, F]]
    # binned slot recovers above the lowest active score → swapped back in, the lowest goes to the bin
    ev = rb.step(t([[0, 0, 5, 0, 0], [0, 0, 0, 0, 0]]))  # h0 [3, 2, 6, 0, 0*]; h1 [1, 2, 3, 0, 0*]
    assert ev.restored.tolist() == [[F, F, T, F, F], [F] * 5]
    assert ev.binned.tolist() == [[F, T, F, T, F], [F, F, F, T, F]]
    assert ev.active.tolist() == [[T, F, T, F, T], [F, T, T, F, T]]
    assert not ev.purged and rb.bin_count == 2
    # third binned slot → purge
    ev = rb.step(t([[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]))
    assert ev.purged and rb.bin_count == 0
    # h0: [3, 2, 6, 0, 0, 0*] → keep 0, 2, 5; h1: [1, 2, 3, 0, 0, 0*] → keep 1, 2, 5
    assert ev.keep.tolist() == [[0, 2, 5], [1, 2, 5]]


def test_decay_and_ties():
    rb = RecycleBin(num_kv_heads=1, capacity=2, bin_size=1, protect_recent=1, decay=0.5)
    rb.start(t([[4, 2]]))
    ev = rb.step(t([[1, 1, 0]]))  # 0.5·[4, 2] + [1, 1] = [3, 2, 0*] → slot 1 binned → purged
    assert rb.scores.tolist() == [[3, 0]]
    assert ev.keep.tolist() == [[0, 2]]
    # equal scores: the older slot stays active
    rb = RecycleBin(num_kv_heads=1, capacity=3, bin_size=5, protect_recent=1)
    rb.start(t([[1, 1, 1]]))
    ev = rb.step(t([[0, 0, 0, 0]]))
    assert ev.active.tolist() == [[T, T, F, T]]
    # many ties (an unstable sort would scatter them): the oldest slots win
    rb = RecycleBin(num_kv_heads=2, capacity=11, bin_size=400, protect_recent=1)
    rb.start(torch.zeros(2, 299))
    ev = rb.step(torch.zeros(2, 300))
    assert ev.active.nonzero()[:, 1].tolist() == [*range(10), 299] * 2


def test_start_with_more_slots_than_capacity():
    rb = RecycleBin(num_kv_heads=2, capacity=3, bin_size=4, protect_recent=1)
    rb.start(t([[1, 5, 2, 4, 0], [9, 1, 1, 1, 0]]))
    # protect the newest slot, keep the 2 best others
    assert rb.active.tolist() == [[F, T, F, T, T], [T, T, F, F, T]]
    assert rb.bin_count == 2


def test_errors():
    with pytest.raises(ValueError, match="capacity"):
        RecycleBin(num_kv_heads=2, capacity=4, bin_size=2, protect_recent=4)
    rb = RecycleBin(num_kv_heads=2, capacity=4, bin_size=2, protect_recent=1)
    rb.start(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape"):
        rb.step(torch.zeros(2, 3))  # must cover the 3 stored slots plus the new one
    with pytest.raises(ValueError, match="shape"):
        rb.step(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="shape"):
        rb.step(torch.zeros(2, 4, 1))
    rb.step(torch.zeros(2, 4))  # the right shape still works after the refusals
    assert rb.num_slots == 4


def greedy_h2o(capacity: int, recent: int, decay: float, prompt: list[float], att_rows):
    """Independent greedy H2O for one head: append, accumulate, evict the argmin outside the window."""
    ids = list(range(len(prompt)))
    score = {i: float(s) for i, s in enumerate(prompt)}
    history = []
    for step, att in enumerate(att_rows):
        new = len(prompt) + step
        for i in ids:
            score[i] *= decay
        ids.append(new)
        score[new] = 0.0
        for i in ids:
            score[i] += att[i]
        while len(ids) > capacity:
            candidates = ids[: len(ids) - recent]
            victim = min(candidates, key=lambda i: score[i])
            ids.remove(victim)
        history.append(sorted(ids))
    return history


@pytest.mark.parametrize("decay", [1.0, 0.9])
def test_bin_size_zero_is_greedy_h2o(decay):
    h_kv, capacity, recent, steps = 2, 6, 2, 30
    gen = torch.Generator().manual_seed(int(decay * 10))
    prompt = torch.rand(h_kv, capacity, generator=gen, dtype=torch.float64)
    total = capacity + steps
    att = torch.rand(h_kv, total, generator=gen, dtype=torch.float64)  # attention by token id, per step
    att_steps = torch.rand(steps, h_kv, total, generator=gen, dtype=torch.float64) * att
    rb = RecycleBin(num_kv_heads=h_kv, capacity=capacity, bin_size=0, protect_recent=recent, decay=decay)
    rb.start(prompt)
    stored = [list(range(capacity)) for _ in range(h_kv)]  # token id of every stored slot, per head
    expected = [
        greedy_h2o(
            capacity, recent, decay, prompt[h].tolist(), [att_steps[s, h].tolist() for s in range(steps)]
        )
        for h in range(h_kv)
    ]
    for s in range(steps):
        new = capacity + s
        for h in range(h_kv):
            stored[h].append(new)
        row = torch.stack([att_steps[s, h, stored[h]] for h in range(h_kv)])
        ev = rb.step(row)
        # greedy: exactly one slot leaves per head per step, and it is purged at once
        assert ev.purged and ev.binned.sum(1).tolist() == [1] * h_kv and not ev.restored.any()
        stored = [[stored[h][i] for i in ev.keep[h].tolist()] for h in range(h_kv)]
        for h in range(h_kv):
            assert sorted(stored[h]) == expected[h][s], (s, h)
        assert rb.num_slots == capacity and rb.bin_count == 0


def test_random_run_invariants():
    h_kv, capacity, recent, bin_size = 3, 6, 2, 3
    gen = torch.Generator().manual_seed(0)
    rb = RecycleBin(
        num_kv_heads=h_kv, capacity=capacity, bin_size=bin_size, protect_recent=recent, decay=0.95
    )
    rb.start(torch.rand(h_kv, 4, generator=gen))
    purges = 0
    for _ in range(40):
        n = rb.num_slots + 1
        ev = rb.step(torch.rand(h_kv, n, generator=gen))
        counts = ev.active.sum(1).tolist()
        assert counts == [min(n, capacity)] * h_kv  # every head holds the same number of active slots
        net = (ev.binned.sum(1) - ev.restored.sum(1)).tolist()
        assert len(set(net)) == 1
        assert ev.active[:, n - recent :].all()  # the newest slots are never binned
        if n > capacity and not ev.purged:  # the older active slots are the best-scoring ones
            old = slice(0, n - recent)
            for h in range(h_kv):
                act = rb.scores[h, old][ev.active[h, old]]
                ina = rb.scores[h, old][~ev.active[h, old]]
                assert float(act.min()) >= float(ina.max())
        if ev.purged:
            purges += 1
            assert ev.keep.shape == (h_kv, capacity)
            assert rb.num_slots == capacity and rb.bin_count == 0
        else:
            assert rb.bin_count < bin_size
        assert rb.num_slots <= capacity + bin_size - 1
    assert purges >= 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rows_match_cpu():
    # decode attention rows live on the GPU: the state machine must follow them there
    for bin_size in (0, 2, 5):
        a = RecycleBin(num_kv_heads=2, capacity=6, bin_size=bin_size, protect_recent=1, decay=0.9)
        c = RecycleBin(num_kv_heads=2, capacity=6, bin_size=bin_size, protect_recent=1, decay=0.9)
        p = torch.rand(2, 6)
        a.start(p)
        c.start(p.cuda())
        for _ in range(25):
            x = torch.rand(2, a.num_slots + 1)
            ea, ec = a.step(x), c.step(x.cuda())
            assert ec.active.is_cuda
            assert torch.equal(ea.active, ec.active.cpu()) and torch.equal(ea.binned, ec.binned.cpu())
            assert ea.purged == ec.purged
            if ea.purged:
                assert torch.equal(ea.keep, ec.keep.cpu())
