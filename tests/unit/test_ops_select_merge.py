"""select_topk / pool1d / reduce_heads / complement / nearest_kept / merge_kv against hand loops.

Expected values come from plain Python loops over tokens written from the docstrings' equations
(``vllm_kvmm/ops/merge.py``, ALGORITHMS.md §1.1–1.2 and §2.2), never from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvmm.ops import complement, merge_kv, nearest_kept, pool1d, reduce_heads, select_topk


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------
# select_topk
# ---------------------------------------------------------------------------------------------------
def naive_topk(scores: torch.Tensor, k: int, protected: torch.Tensor | None) -> list[list[int]]:
    h, n = scores.shape
    out = []
    for head in range(h):
        prot = [False] * n if protected is None else [bool(x) for x in protected.expand(h, n)[head]]
        ranked = sorted(
            range(n), key=lambda j, head=head, prot=prot: (not prot[j], -float(scores[head, j]), j)
        )
        out.append(sorted(ranked[:k]))
    return out


def test_select_topk_hand_case():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.2], [3.0, 1.0, 2.0, 0.0, 2.0]])
    # ties go to the lower index: head 0 keeps 1 (0.9) and 3 (0.9) before 2; head 1 keeps 2 before 4
    assert select_topk(scores, 3).tolist() == [[1, 2, 3], [0, 2, 4]]
    assert select_topk(scores, 2).tolist() == [[1, 3], [0, 2]]
    # a protected token outranks every score
    prot = torch.tensor([True, False, False, False, False])
    assert select_topk(scores, 2, prot).tolist() == [[0, 1], [0, 2]]
    # per-head protection
    prot2 = torch.tensor([[False, False, False, False, True], [False, False, False, True, False]])
    assert select_topk(scores, 2, prot2).tolist() == [[1, 4], [0, 3]]


def test_select_topk_more_protected_than_k():
    scores = torch.tensor([[5.0, 1.0, 4.0, 2.0, 9.0, 3.0]])
    prot = torch.tensor([True, True, False, True, False, True])
    # 4 protected, keep 2: the 2 best-scoring protected ones (5.0 at 0, 3.0 at 5), not 9.0 (unprotected)
    assert select_topk(scores, 2, prot).tolist() == [[0, 5]]
    # ties among protected go to the lower index
    assert select_topk(torch.zeros(1, 6), 3, prot).tolist() == [[0, 1, 3]]


@pytest.mark.parametrize("seed", range(6))
def test_select_topk_random_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    h, n = 3, 23
    scores = torch.randint(0, 5, (h, n), generator=gen).float()  # many ties
    prot = torch.rand(n, generator=gen) < 0.3 if seed % 2 else torch.rand(h, n, generator=gen) < 0.3
    for k in (0, 1, 4, 11, 22, 23):
        for p in (None, prot):
            got = select_topk(scores, k, p)
            assert got.dtype == torch.int64 and got.shape == (h, k)
            assert got.tolist() == naive_topk(scores, k, p), (k, p is None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_select_topk_wide_rows_with_infinities_and_close_values(dtype):
    # Longer rows than the hand cases: many tied values, -inf / +inf scores (a masked-out or forced
    # token), values one float64 ulp apart (the text prior's two tiers), protection on some heads.
    gen = torch.Generator().manual_seed(7)
    h, n = 4, 301
    scores = torch.randint(0, 9, (h, n), generator=gen).to(torch.float64)
    scores[:, ::13] = float("-inf")
    scores[1, ::17] = float("inf")
    scores[2, 50:60] = 1.0 + torch.arange(10, dtype=torch.float64) * 2.0**-52
    scores = scores.to(dtype)
    prot = torch.rand(h, n, generator=gen) < 0.1
    prot[3] = False
    for k in (1, 7, 60, 150, 299, 300):
        for p in (None, prot):
            got = select_topk(scores, k, p)
            assert got.tolist() == naive_topk(scores.to(torch.float64), k, p), (k, p is None)


def test_select_topk_bounds():
    with pytest.raises(ValueError):
        select_topk(torch.zeros(2, 4), 5)
    with pytest.raises(ValueError):
        select_topk(torch.zeros(2, 4), -1)


# ---------------------------------------------------------------------------------------------------
# pool1d / reduce_heads / complement
# ---------------------------------------------------------------------------------------------------
def naive_pool(x: torch.Tensor, kernel: int, kind: str) -> torch.Tensor:
    h, n = x.shape
    p = kernel // 2
    out = torch.zeros(h, n, dtype=torch.float64)
    for head in range(h):
        for j in range(n):
            window = [float(x[head, t]) for t in range(j - p, j + p + 1) if 0 <= t < n]
            # SnapKV's avg pool counts the zero padding: divide by the kernel, not the window
            out[head, j] = sum(window) / kernel if kind == "avg" else max(window)
    return out


@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("kernel", [3, 5, 7])
@pytest.mark.parametrize("n", [2, 9])
def test_pool1d_matches_loop(kind, kernel, n):
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(n + kernel)) - 0.3
    torch.testing.assert_close(
        pool1d(x, kernel, kind).double(), naive_pool(x, kernel, kind), rtol=1e-6, atol=1e-7
    )


def test_pool1d_identity_and_errors():
    x = torch.randn(2, 6)
    assert torch.equal(pool1d(x, 5, "none"), x)
    assert torch.equal(pool1d(x, 1, "avg"), x)
    assert pool1d(torch.zeros(2, 0), 5).shape == (2, 0)
    with pytest.raises(ValueError, match="odd"):
        pool1d(x, 4)


def test_reduce_heads():
    x = torch.arange(6 * 3, dtype=torch.float32).view(6, 3)  # H = 6 query heads
    got = reduce_heads(x, 2)  # groups {0,1,2} and {3,4,5}
    exp = torch.stack([x[0:3].mean(0), x[3:6].mean(0)])
    assert torch.equal(got, exp)
    assert torch.equal(reduce_heads(x, 2, "max"), torch.stack([x[2], x[5]]))
    assert torch.equal(reduce_heads(x, 6), x)
    with pytest.raises(ValueError, match="multiple"):
        reduce_heads(x, 4)


def test_complement():
    keep = torch.tensor([[0, 3, 4], [1, 2, 6]])
    assert complement(keep, 7).tolist() == [[1, 2, 5, 6], [0, 3, 4, 5]]
    assert complement(torch.arange(5).expand(2, 5), 5).shape == (2, 0)
    assert complement(torch.zeros(2, 0, dtype=torch.long), 3).tolist() == [[0, 1, 2]] * 2


# ---------------------------------------------------------------------------------------------------
# nearest_kept / merge_kv
# ---------------------------------------------------------------------------------------------------
def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def naive_nearest(keys, keep, evict):
    """Per head and evicted slot: (position in keep of the cosine-nearest kept key, that cosine)."""
    target, sim = [], []
    for h in range(keys.shape[0]):
        t_row, s_row = [], []
        for i in evict[h].tolist():
            sims = [cos(keys[h, i], keys[h, j]) for j in keep[h].tolist()]
            best = max(range(len(sims)), key=lambda a, sims=sims: sims[a])
            t_row.append(best)
            s_row.append(sims[best])
        target.append(t_row)
        sim.append(s_row)
    return target, sim


def naive_merge(keys, values, keep, evict, kind, merge_keys=True, similarity_filter=False, misaligned=False):
    """Explicit loops: for kept j with assigned set N_j, apply the module docstring's equation."""
    h_kv, _, d = keys.shape
    target, sim = naive_nearest(keys, keep, evict)
    e = evict.shape[1]
    slots = list(range(e))
    if similarity_filter:
        head_mean = [sum(sim[h][i] for h in range(h_kv)) / h_kv for i in range(e)]
        overall = sum(sum(row) for row in sim) / (h_kv * e)
        slots = [i for i in range(e) if head_mean[i] >= overall]
    outs = []
    for x, merged in ((keys, merge_keys), (values, True)):
        out = torch.zeros(h_kv, keep.shape[1], d, dtype=torch.float64)
        for h in range(h_kv):
            for a, j in enumerate(keep[h].tolist()):
                xj = x[h, j].double()
                if not merged:
                    out[h, a] = xj
                    continue
                # (source token, weight) pairs assigned to kept slot a
                assigned = []
                for m, slot in enumerate(slots):
                    if target[h][slot] != a:
                        continue
                    # MEDA's bug: the m-th filtered target receives the m-th evicted token
                    src = evict[h, m] if misaligned else evict[h, slot]
                    assigned.append((x[h, src].double(), sim[h][slot]))
                acc = xj.clone()
                for xi, s in assigned:
                    if kind == "average":
                        acc += xi
                    elif kind == "pivot":
                        acc += (xi + xj) / 2
                    else:
                        acc += s * xi
                out[h, a] = acc / (1 + len(assigned))
        outs.append(out)
    return outs[0], outs[1]


def make_kv(h=2, n=14, d=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(h, n, d, generator=gen), torch.randn(h, n, d, generator=gen)


def random_split(h, n, k, seed):
    gen = torch.Generator().manual_seed(seed + 100)
    keep = torch.stack([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(h)])
    return keep, complement(keep, n)


def test_nearest_kept_matches_loop():
    keys, _ = make_kv(n=20, seed=1)
    keep, evict = random_split(2, 20, 6, 1)
    for chunk in (1, 3, 1024):
        target, sim = nearest_kept(keys, keep, evict, chunk=chunk)
        exp_t, exp_s = naive_nearest(keys, keep, evict)
        assert target.tolist() == exp_t
        torch.testing.assert_close(
            sim.double(), torch.tensor(exp_s, dtype=torch.float64), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("kind", ["average", "pivot", "weighted"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_kv_matches_equations(kind, seed):
    keys, values = make_kv(n=16, seed=seed)
    keep, evict = random_split(2, 16, 5, seed)
    k_out, v_out = merge_kv(keys, values, keep, evict, kind, chunk=4)
    ek, ev = naive_merge(keys, values, keep, evict, kind)
    torch.testing.assert_close(k_out.double(), ek, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v_out.double(), ev, rtol=1e-5, atol=1e-6)


def test_merge_hand_example():
    # one head, 1-D-ish keys: kept {0, 2}; evicted 1 is nearest to 0, evicted 3 nearest to 2
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.2, 1.0]]])
    values = torch.tensor([[[2.0, 0.0], [4.0, 0.0], [10.0, 0.0], [20.0, 0.0]]])  # same head dim as keys
    keep, evict = torch.tensor([[0, 2]]), torch.tensor([[1, 3]])
    _, v = merge_kv(keys, values, keep, evict, "average")
    assert v[0, :, 0].tolist() == pytest.approx([(2 + 4) / 2, (10 + 20) / 2])
    _, v = merge_kv(keys, values, keep, evict, "pivot")
    assert v[0, :, 0].tolist() == pytest.approx([(2 + (4 + 2) / 2) / 2, (10 + (20 + 10) / 2) / 2])
    _, v = merge_kv(keys, values, keep, evict, "weighted")
    s1, s3 = 1 / math.sqrt(1.01), 1 / math.sqrt(1.04)
    assert v[0, :, 0].tolist() == pytest.approx([(2 + s1 * 4) / 2, (10 + s3 * 20) / 2])
    k, _ = merge_kv(keys, values, keep, evict, "average")
    assert k[0].tolist() == [pytest.approx([1.0, 0.05]), pytest.approx([0.1, 1.0])]


def test_merge_keys_false_leaves_keys_untouched():
    keys, values = make_kv(n=12, seed=3)
    keep, evict = random_split(2, 12, 4, 3)
    k_out, v_out = merge_kv(keys, values, keep, evict, "pivot", merge_keys=False)
    assert torch.equal(k_out, torch.gather(keys, 1, keep.unsqueeze(-1).expand(-1, -1, keys.shape[-1])))
    _, ev = naive_merge(keys, values, keep, evict, "pivot", merge_keys=False)
    torch.testing.assert_close(v_out.double(), ev, rtol=1e-5, atol=1e-6)
    # and the values did change (the merge happened)
    assert not torch.allclose(v_out, torch.gather(values, 1, keep.unsqueeze(-1).expand(-1, -1, 5)))


@pytest.mark.parametrize("kind", ["average", "weighted"])
@pytest.mark.parametrize("seed", [4, 5, 6])
def test_similarity_filter(kind, seed):
    keys, values = make_kv(n=18, seed=seed)
    keep, evict = random_split(2, 18, 6, seed)
    k_out, v_out = merge_kv(keys, values, keep, evict, kind, similarity_filter=True, chunk=5)
    ek, ev = naive_merge(keys, values, keep, evict, kind, similarity_filter=True)
    torch.testing.assert_close(k_out.double(), ek, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v_out.double(), ev, rtol=1e-5, atol=1e-6)
    # the filter actually dropped something here, so this differs from the unfiltered merge
    ek_all, _ = naive_merge(keys, values, keep, evict, kind)
    assert not torch.allclose(ek, ek_all)


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_misaligned_source_pairs_first_evicted_tokens(seed):
    keys, values = make_kv(n=18, seed=seed)
    keep, evict = random_split(2, 18, 6, seed)
    k_out, v_out = merge_kv(
        keys, values, keep, evict, "average", similarity_filter=True, misaligned_source=True
    )
    ek, ev = naive_merge(keys, values, keep, evict, "average", similarity_filter=True, misaligned=True)
    torch.testing.assert_close(k_out.double(), ek, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v_out.double(), ev, rtol=1e-5, atol=1e-6)
    # the bug is observable: it differs from the intended filtered merge
    ek_ok, _ = naive_merge(keys, values, keep, evict, "average", similarity_filter=True)
    assert not torch.allclose(ek, ek_ok)


def test_misaligned_hand_example():
    # one head; kept {0}, evicted {1, 2, 3}. Slot 0 (token 1) is far from kept, slots 1, 2 close:
    # the filter keeps slots {1, 2} but the bug sums tokens 1 and 2 (the first two evicted ones).
    keys = torch.tensor([[[1.0, 0.0], [-1.0, 0.2], [1.0, 0.05], [1.0, 0.1]]])
    values = torch.tensor([[[0.0, 0.0], [100.0, 0.0], [10.0, 0.0], [1.0, 0.0]]])
    keep, evict = torch.tensor([[0]]), torch.tensor([[1, 2, 3]])
    _, v_ok = merge_kv(keys, values, keep, evict, "average", similarity_filter=True)
    _, v_bug = merge_kv(keys, values, keep, evict, "average", similarity_filter=True, misaligned_source=True)
    assert float(v_ok[0, 0, 0]) == pytest.approx((0 + 10 + 1) / 3)
    assert float(v_bug[0, 0, 0]) == pytest.approx((0 + 100 + 10) / 3)


def test_merge_edge_cases():
    keys, values = make_kv(n=6, seed=0)
    keep = torch.tensor([[0, 2, 4], [1, 3, 5]])
    none = torch.zeros(2, 0, dtype=torch.long)
    k_out, v_out = merge_kv(keys, values, keep, none, "average")
    gk = keep.unsqueeze(-1).expand(-1, -1, 5)
    assert torch.equal(k_out, torch.gather(keys, 1, gk)) and torch.equal(v_out, torch.gather(values, 1, gk))
    with pytest.raises(ValueError, match="similarity_filter"):
        merge_kv(keys, values, keep, complement(keep, 6), "average", misaligned_source=True)
    with pytest.raises(ValueError, match="unknown merge kind"):
        merge_kv(keys, values, keep, complement(keep, 6), "median")  # type: ignore[arg-type]


def test_merge_preserves_dtype():
    keys, values = make_kv(n=10, seed=2)
    keep, evict = random_split(2, 10, 4, 2)
    k_out, v_out = merge_kv(keys.bfloat16(), values.bfloat16(), keep, evict, "pivot")
    assert k_out.dtype == torch.bfloat16 and v_out.dtype == torch.bfloat16
    _, ev = naive_merge(keys.bfloat16(), values.bfloat16(), keep, evict, "pivot")
    torch.testing.assert_close(v_out.double(), ev, rtol=1e-2, atol=1e-2)
