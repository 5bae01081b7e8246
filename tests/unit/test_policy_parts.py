"""The shared policy parts (policies/parts.py), over the registry: new policies built of parts are covered."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vllm_kvmm.policies import (
    POLICIES,
    DecodeCadence,
    Merging,
    PromptInfo,
    SampledScores,
    Sinks,
    block_tail_start,
    layout,
    make_policy,
)

SINKS = [n for n, c in POLICIES.items() if issubclass(c, Sinks)]
CADENCE = [n for n, c in POLICIES.items() if issubclass(c, DecodeCadence)]
MERGING = [n for n, c in POLICIES.items() if issubclass(c, Merging)]
SAMPLED = [n for n, c in POLICIES.items() if issubclass(c, SampledScores)]


def _info(n: int = 64) -> PromptInfo:
    vision = torch.zeros(n, dtype=torch.bool)
    vision[8:40] = True
    return PromptInfo(n, vision, num_layers=2, num_kv_heads=2)


def test_parts_are_where_the_docs_say() -> None:
    assert SINKS == ["meda", "meda-paper", "meda-released", "lookm", "streamingllm"]
    assert CADENCE == ["hae", "h2o", "streamingllm"]
    assert MERGING == ["meda", "meda-paper", "meda-released", "lookm"]
    assert SAMPLED == ["meda", "meda-paper", "meda-released", "lookm", "h2o"]


@pytest.mark.parametrize("name", SAMPLED)
def test_score_step_samples_the_column_sums_a_policy_asks_for(name: str) -> None:
    info = _info()
    # meda scores by its question window by default: sampled accumulated scores need that switched.
    config = {"scoring": "accumulated"} if name == "meda" else {}
    exact = make_policy(name, 0.25, config).stats_request(info)
    sampled = make_policy(name, 0.25, {**config, "score_step": 4}).stats_request(info)
    assert exact.colsum and exact.colsum_step == 1 and not exact.sampled_colsum
    assert sampled.sampled_colsum and sampled.colsum_step == 4
    assert dataclasses.replace(sampled, colsum_step=1) == exact  # nothing else changes
    with pytest.raises(ValueError, match="score_step"):
        make_policy(name, 0.25, {"score_step": 0})


def test_score_step_is_refused_where_nothing_is_accumulated() -> None:
    with pytest.raises(ValueError, match="score_step samples accumulated attention; with scoring='window'"):
        make_policy("meda", 0.25, {"score_step": 4})


@pytest.mark.parametrize("name", SINKS)
def test_sinks_add_the_first_tokens_to_what_the_policy_protects(name: str) -> None:
    info = _info()
    without = make_policy(name, 0.25, {"sink_tokens": 0}).protected(info, 1)
    with_sinks = make_policy(name, 0.25, {"sink_tokens": 3}).protected(info, 1)
    assert with_sinks is not None
    expected = torch.zeros(info.num_tokens, dtype=torch.bool) if without is None else without.clone()
    expected[:3] = True
    assert torch.equal(with_sinks, expected)


@pytest.mark.parametrize("name", CADENCE)
def test_decode_cadence_is_the_configured_interval(name: str) -> None:
    info = _info()
    config = {"decode_interval": 7, **({"decode_budget": 0.3} if name == "hae" else {})}
    spec = make_policy(name, 0.5, config).decode_spec(info)
    assert spec is not None and spec.interval == 7
    assert make_policy(name, 0.5).decode_spec(info) is None


@pytest.mark.parametrize("name", CADENCE)
def test_no_decode_eviction_at_budget_one_unless_the_policy_has_its_own_decode_budget(name: str) -> None:
    spec = make_policy(name, 1.0, {"decode_interval": 7}).decode_spec(_info())
    # HAE's recycle bin runs on its own budget (decode_budget), whatever prefill kept; the others evict
    # nothing at budget 1, so they may not while decoding (the scheduler would plan flushes for nothing).
    assert (spec is not None) == (name == "hae")


@pytest.mark.parametrize("name", MERGING)
def test_merging_none_drops_and_the_misaligned_bug_needs_the_filter(name: str) -> None:
    assert make_policy(name, 0.5, {"merge": "none"}).merge_spec(_info()) is None
    spec = make_policy(name, 0.5, {"merge": "average", "merge_keys": False}).merge_spec(_info())
    assert spec is not None and (spec.kind, spec.merge_keys) == ("average", False)
    with pytest.raises(ValueError, match="misaligned_source reproduces a bug of the filtered merge"):
        make_policy(name, 0.5, {"misaligned_source": True, "similarity_filter": False})


@pytest.mark.parametrize(
    ("length", "recent", "g", "start"),
    [
        (100, 10, 1, 90),
        (100, 10, 16, 80),
        (100, 0, 16, 96),
        (100, 200, 16, 0),
        (100, -3, 16, 96),
        (64, 16, 16, 48),
    ],
)
def test_block_tail_start(length: int, recent: int, g: int, start: int) -> None:
    assert block_tail_start(length, recent, g) == start


def test_layout_tail_starts_where_flushes_put_it() -> None:
    # Prefill layout and decode flushes share the formula: with room for the whole recent window the
    # layout's tail starts exactly at block_tail_start.
    for n, recent in [(300, 40), (257, 16), (512, 100)]:
        tail_start, _ = layout(n, recent, budget=n * 0.5, granularity=16)
        assert tail_start == block_tail_start(n, recent, 16)
