"""StatsAccumulator / attention_stats / row_entropy against a dense float64 twin written here.

The twin builds the full causal attention map ``A[h, i, j]`` explicitly (N is small) and reads every
statistic off it with the definitions of ``vllm_kvmm/ops/stats.py``'s docstring and ALGORITHMS.md §2.1
(MEDA Eq. 4–6), §3.2 (HAE DAP) and §8.4. Nothing here calls the code under test to get an expected value.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vllm_kvmm.ops import StatsAccumulator, StatsRequest, attention_stats, decode_scores, row_entropy

H, H_KV, D = 4, 2, 8
ALL = StatsRequest(colsum=True, window=7, entropy=True, cross_entropy=True, t2v=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add overhead (and contention on a shared CI box).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------
# naive twin
# ---------------------------------------------------------------------------------------------------
def naive_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``[H, N, N]`` float64 causal softmax; query head ``h`` reads KV head ``h // (H / H_kv)``."""
    n, h, _ = q.shape
    g = h // k.shape[1]
    a = torch.zeros(h, n, n, dtype=torch.float64)
    for head in range(h):
        qh, kh = q[:, head].double(), k[:, head // g].double()
        for i in range(n):
            z = (kh[: i + 1] @ qh[i]) * scale
            a[head, i, : i + 1] = torch.softmax(z, dim=0)
    return a


def naive_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    g = q.shape[1] // k.shape[1]
    return torch.stack([q[:, h].double() @ k[:, h // g].double().T * scale for h in range(q.shape[1])])


def group_mean(x: torch.Tensor, h_kv: int) -> torch.Tensor:
    """``[H, ...]`` → ``[H_kv, ...]``: mean over the query heads that share each KV head."""
    g = x.shape[0] // h_kv
    return torch.stack([sum(x[h] for h in range(x.shape[0]) if h // g == kv) / g for kv in range(h_kv)])


def entropy_of(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def naive_stats(q, k, vision, scale, window, step=1, colsum_step=1):
    """Every statistic of the module docstring; the entropies over the rows at positions ``0, step, …``,
    the column sums over those at ``0, colsum_step, …`` times ``colsum_step``."""
    n = q.shape[0]
    sampled = [i for i in range(n) if i % step == 0]
    a = naive_attention(q, k, scale)
    logits = naive_logits(q, k, scale)
    vis = [bool(v) for v in vision]
    out = {}
    col_rows = [i for i in range(n) if i % colsum_step == 0]
    out["colsum"] = group_mean(a[:, col_rows].sum(1), k.shape[1]) * colsum_step
    w0 = max(0, n - window)
    out["window"] = group_mean(a[:, w0:].sum(1), k.shape[1])
    # full-map entropy: mean over (head, row) of the row entropies
    heads = range(a.shape[0])
    out["entropy"] = sum(entropy_of(a[h, i]) for h in heads for i in sampled) / (a.shape[0] * len(sampled))

    # cross-modal: per head softmax over the visible keys of the other modality, head mean, entropy
    def cross(query_is_vis: bool) -> float:
        ents = []
        for i in sampled:
            if vis[i] != query_is_vis:
                continue
            cols = [j for j in range(i + 1) if vis[j] != query_is_vis]
            if not cols:
                continue  # no visible key of the other modality: row excluded
            pm = torch.stack([torch.softmax(logits[h, i, cols], 0) for h in range(logits.shape[0])]).mean(0)
            ents.append(entropy_of(pm))
        return sum(ents) / len(ents) if ents else math.nan

    out["entropy_tv"] = cross(False)
    out["entropy_vt"] = cross(True)
    # HAE: head-mean attention from text queries after the last vision token to vision keys
    last_vis = max((i for i in range(n) if vis[i]), default=n - 1)
    t2v_sum = torch.zeros(n, dtype=torch.float64)
    t2v_max = torch.zeros(n, dtype=torch.float64)
    for i in range(last_vis + 1, n):
        abar = a[:, i].mean(0)
        for j in range(n):
            if vis[j]:
                t2v_sum[j] += abar[j]
                t2v_max[j] = max(t2v_max[j], abar[j])
    out["t2v_sum"], out["t2v_max"] = t2v_sum, t2v_max
    return out


def spans_mask(n: int, spans) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    for s, e in spans:
        m[s:e] = True
    return m


def make_qk(n: int, seed: int, h: int = H, h_kv: int = H_KV, d: int = D):
    gen = torch.Generator().manual_seed(seed)
    # spread logits a bit so the maps are neither uniform nor one-hot
    q = torch.randn(n, h, d, generator=gen) * 1.5
    k = torch.randn(n, h_kv, d, generator=gen) * 1.5
    return q, k


def assert_stats_close(got, exp, rtol=1e-5, atol=1e-6):
    for name in ("colsum", "window", "t2v_sum", "t2v_max"):
        torch.testing.assert_close(getattr(got, name).double(), exp[name], rtol=rtol, atol=atol, msg=name)
    for name in ("entropy", "entropy_tv", "entropy_vt"):
        g, e = float(getattr(got, name)), exp[name]
        if math.isnan(e):
            assert math.isnan(g), f"{name}: expected nan, got {g}"
        else:
            assert g == pytest.approx(e, rel=rtol, abs=atol), name


MASKS = {
    # several image spans with text between them and a question after the last one
    "three_images": (41, [(3, 9), (14, 22), (30, 33)]),
    # an image at position 0: its first rows see no text key (vision→text rows excluded)
    "image_first": (29, [(0, 6), (11, 20)]),
    # text before the only image: early text rows see no vision key (text→vision rows excluded)
    "one_image": (23, [(5, 15)]),
    # no text after the last vision token: HAE statistic stays zero
    "image_last": (19, [(4, 8), (12, 19)]),
}


@pytest.mark.parametrize("case", list(MASKS))
@pytest.mark.parametrize("chunk", [1, 5, 7, 64])
def test_one_shot_matches_naive(case, chunk):
    n, spans = MASKS[case]
    q, k = make_qk(n, seed=len(case) + chunk)
    vision = spans_mask(n, spans)
    scale = 1 / math.sqrt(D)
    got = attention_stats(ALL, q, k, vision, scale, chunk=chunk)
    exp = naive_stats(q, k, vision, scale, ALL.window)
    assert_stats_close(got, exp)
    assert got.colsum.shape == (H_KV, n) and got.window.shape == (H_KV, n)
    assert got.t2v_sum.shape == (n,) and got.t2v_max.shape == (n,)


def test_gqa_heads_are_grouped_not_interleaved():
    # KV head 0 carries all the signal; query heads 0,1 read it (consecutive grouping, like HF repeat_kv)
    n = 12
    q, k = make_qk(n, seed=3)
    k[:, 1] = 0.0  # KV head 1: uniform attention
    got = attention_stats(StatsRequest(colsum=True), q, k, torch.zeros(n, dtype=torch.bool), 1.0, chunk=4)
    uniform = torch.tensor([sum(1 / (i + 1) for i in range(j, n)) for j in range(n)], dtype=torch.float64)
    torch.testing.assert_close(got.colsum[1].double(), uniform, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got.colsum[0].double(), uniform, atol=1e-3)


def test_mha_and_gqa8():
    n = 17
    for h, h_kv in ((3, 3), (8, 1)):
        q, k = make_qk(n, seed=h, h=h, h_kv=h_kv)
        vision = spans_mask(n, [(2, 7), (9, 12)])
        got = attention_stats(ALL, q, k, vision, 0.3, chunk=6)
        assert_stats_close(got, naive_stats(q, k, vision, 0.3, ALL.window))


@pytest.mark.parametrize("case", list(MASKS))
def test_chunked_prefill_equals_one_call(case):
    n, spans = MASKS[case]
    q, k = make_qk(n, seed=11)
    vision = spans_mask(n, spans)
    scale = 0.4
    one = attention_stats(ALL, q, k, vision, scale, chunk=1000)
    acc = StatsAccumulator(ALL, n, H, H_KV, vision, scale, chunk=3)
    cuts = [0, 1, 6, 13, n - 2, n]  # uneven prefill chunks, keys grow with each call
    for s, e in itertools.pairwise(cuts):
        assert not acc.done
        acc.update(q[s:e], k[:e], s)
    assert acc.done
    got = acc.result()
    for name in ("colsum", "window", "t2v_sum", "t2v_max"):
        torch.testing.assert_close(getattr(got, name), getattr(one, name), rtol=1e-5, atol=1e-6)
    for name in ("entropy", "entropy_tv", "entropy_vt"):
        a, b = float(getattr(got, name)), float(getattr(one, name))
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-5)
    assert_stats_close(got, naive_stats(q, k, vision, scale, ALL.window))


@pytest.mark.parametrize("case", list(MASKS))
@pytest.mark.parametrize("step", [2, 3, 5])
def test_sampled_entropies_are_the_means_over_every_step_th_row(case, step):
    """Entropies from the rows at positions 0, s, 2s, … of the prompt, however the prefill is chunked
    (cuts and internal chunks that do not line up with the sample); every-row statistics unchanged."""
    n, spans = MASKS[case]
    q, k = make_qk(n, seed=13 + step)
    vision = spans_mask(n, spans)
    exp = naive_stats(q, k, vision, 0.4, ALL.window, step)
    for cuts, chunk in (([0, n], 1000), ([0, 1, 6, 13, n - 2, n], 3), ([0, 4, 5, n], 2)):
        request = dataclasses.replace(ALL, entropy_step=step)
        acc = StatsAccumulator(request, n, H, H_KV, vision, 0.4, chunk=chunk)
        for s, e in itertools.pairwise(cuts):
            acc.update(q[s:e], k[:e], s)
        assert_stats_close(acc.result(), exp)
    # Not the exact entropies: the sample is a different set of rows (on these prompts).
    full = naive_stats(q, k, vision, 0.4, ALL.window)
    assert exp["entropy"] != pytest.approx(full["entropy"], rel=1e-4)


@pytest.mark.parametrize("entropy_step, colsum_step", [(1, 3), (3, 3), (2, 5)])
def test_sampled_column_sums_count_every_step_th_row_step_times(entropy_step, colsum_step):
    """``colsum_step = s``: ``s · Σ`` over the rows at positions 0, s, 2s, … however the prefill is chunked;
    with its own step or the entropies' (one pass over the shared rows), every other statistic unchanged."""
    n, spans = MASKS["three_images"]
    q, k = make_qk(n, seed=31 + colsum_step)
    vision = spans_mask(n, spans)
    exp = naive_stats(q, k, vision, 0.4, ALL.window, entropy_step, colsum_step)
    request = dataclasses.replace(ALL, entropy_step=entropy_step, colsum_step=colsum_step)
    assert request.sampled_colsum and request.every_row.colsum is False
    for cuts, chunk in (([0, n], 1000), ([0, 1, 6, 13, n - 2, n], 3), ([0, 4, 5, n], 2)):
        acc = StatsAccumulator(request, n, H, H_KV, vision, 0.4, chunk=chunk)
        for s, e in itertools.pairwise(cuts):
            acc.update(q[s:e], k[:e], s)
        assert_stats_close(acc.result(), exp)
    exact = naive_stats(q, k, vision, 0.4, ALL.window)["colsum"]
    assert not torch.allclose(exp["colsum"], exact, rtol=1e-3)  # an estimate, not the sum itself
    # The scale is every row's: the estimated total attention is the exact one to within a few percent.
    assert float(exp["colsum"].sum()) == pytest.approx(float(exact.sum()), rel=0.1)


def test_sampled_column_sums_start_at_a_prefix_hit():
    # A prefix-cache hit runs the queries from `start` on: the sampled rows are the multiples of the step
    # at or after it (positions of the whole prompt, as without a hit).
    n, start, step = 23, 9, 4
    q, k = make_qk(n, seed=5)
    vision = torch.zeros(n, dtype=torch.bool)
    acc = StatsAccumulator(StatsRequest(colsum=True, colsum_step=step), n, H, H_KV, vision, 0.5, start=start)
    acc.update(q[start:], k, start)
    a = naive_attention(q, k, 0.5)
    rows = [i for i in range(start, n) if i % step == 0]
    torch.testing.assert_close(acc.result().colsum.double(), group_mean(a[:, rows].sum(1), H_KV) * step,
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_sampled_entropies_alone_and_checked():
    n, spans = MASKS["three_images"]
    q, k = make_qk(n, seed=2)
    vision = spans_mask(n, spans)
    req = StatsRequest(cross_entropy=True, entropy=True, entropy_step=4)
    assert req.sampled and not StatsRequest(window=3, entropy_step=4).sampled
    got = attention_stats(req, q, k, vision, 0.5, chunk=5)
    exp = naive_stats(q, k, vision, 0.5, 1, 4)
    for name in ("entropy", "entropy_tv", "entropy_vt"):
        assert float(getattr(got, name)) == pytest.approx(exp[name], rel=1e-5, abs=1e-6), name
    assert got.colsum is None and got.window is None
    with pytest.raises(ValueError, match="entropy_step must be >= 1"):
        StatsRequest(entropy=True, entropy_step=0)
    with pytest.raises(ValueError, match="colsum_step must be >= 1"):
        StatsRequest(colsum=True, colsum_step=0)


@pytest.mark.parametrize(
    "request_, first",
    [(StatsRequest(window=7), 20 - 7), (StatsRequest(t2v=True), 10), (StatsRequest(window=4, t2v=True), 10)],
)
def test_chunks_before_the_first_counted_query_are_skipped_unread(request_, first):
    # Window-only and text→vision statistics count only the last queries: a chunked prefill's earlier
    # chunks pass without their keys (the vLLM worker then reads no keys for them).
    n = 20
    q, k = make_qk(n, seed=7)
    vision = spans_mask(n, [(2, 10)])  # the last vision token is 9: text→vision rows start at 10
    acc = StatsAccumulator(request_, n, H, H_KV, vision, 0.5, chunk=4)
    assert acc.first_query == first
    with pytest.raises(ValueError, match=f"statistics count queries from {first}"):
        acc.skip(0, first + 1)
    acc.skip(0, 6)
    with pytest.raises(ValueError, match="expected start 6"):
        acc.skip(0, 2)
    acc.skip(6, first - 6)
    acc.update(q[first:], k, first)
    assert acc.done
    one = attention_stats(request_, q, k, vision, 0.5)
    for name in ("window", "t2v_sum", "t2v_max"):
        if getattr(one, name) is not None:
            torch.testing.assert_close(getattr(acc.result(), name), getattr(one, name), rtol=1e-5, atol=1e-6)
    assert StatsAccumulator(StatsRequest(colsum=True, window=7), n, H, H_KV, vision, 0.5).first_query == 0


def test_chunk_may_carry_more_keys_than_visible():
    # vLLM may hand over the keys of the whole prompt: future keys must stay invisible (causal)
    n = 20
    q, k = make_qk(n, seed=5)
    vision = spans_mask(n, [(3, 10)])
    acc = StatsAccumulator(ALL, n, H, H_KV, vision, 0.5, chunk=4)
    acc.update(q[:9], k, 0)
    acc.update(q[9:], k, 9)
    assert_stats_close(acc.result(), naive_stats(q, k, vision, 0.5, ALL.window))


def test_text_only_prompt():
    n = 15
    q, k = make_qk(n, seed=8)
    got = attention_stats(ALL, q, k, torch.zeros(n, dtype=torch.bool), 0.35, chunk=4)
    assert math.isnan(float(got.entropy_tv)) and math.isnan(float(got.entropy_vt))
    assert torch.equal(got.t2v_sum, torch.zeros(n)) and torch.equal(got.t2v_max, torch.zeros(n))
    assert_stats_close(got, naive_stats(q, k, torch.zeros(n, dtype=torch.bool), 0.35, ALL.window))


def test_only_requested_stats_are_filled():
    n = 10
    q, k = make_qk(n, seed=1)
    got = attention_stats(StatsRequest(window=3), q, k, spans_mask(n, [(1, 4)]), 0.5)
    assert got.window is not None
    assert got.colsum is None and got.entropy is None and got.entropy_tv is None and got.t2v_sum is None
    # window larger than the prompt: every query counts, i.e. the full column sum
    big = attention_stats(StatsRequest(colsum=True, window=50), q, k, spans_mask(n, [(1, 4)]), 0.5)
    torch.testing.assert_close(big.window, big.colsum)


def test_request_flags():
    assert StatsRequest().empty and not StatsRequest().wants_layer(0)
    r = StatsRequest(t2v=True, layers=(2,))
    assert not r.empty and r.wants_layer(2) and not r.wants_layer(0)
    assert StatsRequest(window=4).wants_layer(7)


def test_partial_result_before_done():
    n = 10
    q, k = make_qk(n, seed=2)
    acc = StatsAccumulator(
        StatsRequest(colsum=True, window=2), n, H, H_KV, torch.zeros(n, dtype=torch.bool), 0.5
    )
    res = acc.result()  # nothing seen yet: zeros of the right shape
    assert torch.equal(res.colsum, torch.zeros(H_KV, n)) and torch.equal(res.window, torch.zeros(H_KV, n))
    acc.update(q[:4], k[:4], 0)
    exp = group_mean(naive_attention(q[:4], k[:4], 0.5).sum(1), H_KV)
    torch.testing.assert_close(acc.result().colsum[:, :4].double(), exp, rtol=1e-5, atol=1e-6)
    assert torch.equal(acc.result().colsum[:, 4:], torch.zeros(H_KV, n - 4))


def test_bad_inputs_raise():
    n = 8
    q, k = make_qk(n, seed=0)
    vis = torch.zeros(n, dtype=torch.bool)
    with pytest.raises(ValueError, match="multiple"):
        StatsAccumulator(ALL, n, 3, 2, vis, 1.0)
    with pytest.raises(ValueError, match="vision_mask"):
        StatsAccumulator(ALL, n, H, H_KV, torch.zeros(n + 1, dtype=torch.bool), 1.0)
    acc = StatsAccumulator(ALL, n, H, H_KV, vis, 1.0)
    with pytest.raises(ValueError, match="in order"):
        acc.update(q[2:4], k[:4], 2)
    with pytest.raises(ValueError, match="does not fit"):
        acc.update(q[:4], k[:3], 0)  # too few keys
    acc.update(q[:5], k[:5], 0)
    with pytest.raises(ValueError, match="does not fit"):
        acc.update(torch.cat([q[5:], q[:2]]), k, 5)  # past the end of the prompt


# ---------------------------------------------------------------------------------------------------
# row_entropy
# ---------------------------------------------------------------------------------------------------
def test_row_entropy_matches_naive():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 5, 9, generator=gen, dtype=torch.float64) * 3
    mask = torch.rand(3, 5, 9, generator=gen) > 0.4
    mask[0, 0] = True
    got = row_entropy(logits, mask)
    for idx in [(a, b) for a in range(3) for b in range(5)]:
        m = mask[idx]
        if not bool(m.any()):
            assert math.isnan(float(got[idx]))
            continue
        exp = entropy_of(torch.softmax(logits[idx][m], 0))
        assert float(got[idx]) == pytest.approx(exp, rel=1e-12, abs=1e-12)


def test_row_entropy_empty_row_is_nan():
    # Docstring: nan for rows with no True entry (previously returned -inf).
    got = row_entropy(torch.zeros(2, 3), torch.tensor([[False] * 3, [True, True, False]]))
    assert math.isnan(float(got[0]))
    assert float(got[1]) == pytest.approx(math.log(2))


# ---------------------------------------------------------------------------------------------------
# memory: never N×N
# ---------------------------------------------------------------------------------------------------
class _LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_numel(request: StatsRequest, n: int, chunk: int, prefill: int) -> int:
    h, h_kv, d = 4, 2, 16
    q, k = make_qk(n, seed=0, h=h, h_kv=h_kv, d=d)
    vision = spans_mask(n, [(10, 700), (900, 1500)])
    acc = StatsAccumulator(request, n, h, h_kv, vision, 0.25, chunk=chunk)
    with _LargestTensor() as mode:
        for s in range(0, n, prefill):
            acc.update(q[s : s + prefill], k[: s + prefill], s)
    assert acc.done
    return mode.largest


def test_chunked_stats_never_materialise_n_by_n():
    n, chunk, h = 2048, 128, 4
    req = StatsRequest(colsum=True, window=32, entropy=True, cross_entropy=True, t2v=True)
    largest = _largest_numel(req, n, chunk, prefill=512)
    assert largest <= h * chunk * n, f"largest temporary {largest} > H·chunk·N = {h * chunk * n}"
    # the same probe sees the H×N×N map when the block is the whole prompt, so it can fail
    assert _largest_numel(StatsRequest(colsum=True), n, n, prefill=n) >= h * n * n


def test_decode_scores_by_hand_and_stacked_across_requests() -> None:
    """Each decode query's softmax over the stored slots it saw (position ≤ its own), summed with its
    weight, mean over the GQA group — by hand, per query and head; then two requests' rows stacked with
    their own query positions (``[H_kv, W]``) equal each request scored alone."""
    g = torch.Generator().manual_seed(3)
    h, h_kv, w, s, d = 4, 2, 3, 9, 32
    q = torch.randn(h, w, d, generator=g)
    k = torch.randn(h_kv, s, d, generator=g)
    pos = torch.stack([torch.randperm(12, generator=g)[:s] for _ in range(h_kv)])  # per-head positions
    q_pos = torch.tensor([6, 8, 11])
    weights = torch.tensor([0.81, 0.9, 1.0], dtype=torch.float64)
    got = decode_scores(q, k, pos, q_pos, 0.2, weights)
    want = torch.zeros(h_kv, s, dtype=torch.float64)
    for head in range(h):
        kv = head // (h // h_kv)
        for i in range(w):
            seen = pos[kv] <= q_pos[i]
            z = (k[kv].double() @ q[head, i].double()) * 0.2
            p = torch.zeros(s, dtype=torch.float64)
            p[seen] = torch.softmax(z[seen], 0)
            want[kv] += weights[i] * p / (h // h_kv)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)

    q2, k2 = torch.randn(h, w, d, generator=g), torch.randn(h_kv, s, d, generator=g)
    pos2 = torch.stack([torch.randperm(20, generator=g)[:s] for _ in range(h_kv)])
    q_pos2 = torch.tensor([13, 14, 19])
    alone = decode_scores(q2, k2, pos2, q_pos2, 0.2, weights)
    rows = torch.cat([q_pos.expand(h_kv, -1), q_pos2.expand(h_kv, -1)])  # [2·H_kv, W]
    stacked = decode_scores(
        torch.cat([q, q2]), torch.cat([k, k2]), torch.cat([pos, pos2]), rows, 0.2, weights
    )
    assert torch.equal(stacked, torch.cat([got, alone]))
    assert not torch.equal(got, decode_scores(q, k, pos, q_pos2, 0.2, weights))  # the positions matter


@pytest.mark.parametrize("n_q,start", [(256, 0), (256, 1800), (37, 2963)])
def test_probs_written_over_the_logits_equal_a_float64_softmax(n_q: int, start: int) -> None:
    """The map is computed in place (one fused softmax over the logits): long rows, against float64."""
    n = start + n_q
    q, k = make_qk(n, seed=n_q + start, h=8, h_kv=2, d=32)
    acc = StatsAccumulator(ALL, n, 8, 2, torch.zeros(n, dtype=torch.bool), 32**-0.5)
    got = acc._probs(q[start:], k, start)  # [H, n_q, n]
    z = torch.einsum("qhd,khd->hqk", q[start:].double(), k.double().repeat_interleave(4, 1)) * 32**-0.5
    future = torch.arange(n)[None, :] > torch.arange(start, n)[:, None]
    want = torch.softmax(z.masked_fill(future, float("-inf")), -1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert bool((got[:, future] == 0).all())  # exact zeros on future keys
