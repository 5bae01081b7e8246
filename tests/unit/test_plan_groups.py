"""Layers sharing a KV-cache group share one layout (mean of their budgets) but select their own tokens."""

from __future__ import annotations

import pytest
import torch

from vllm_kvmm.ops import LayerStats, select_topk
from vllm_kvmm.policies import PromptInfo, make_policy, plan_compression


def _stats(n: int, layers: int, h: int) -> list[LayerStats]:
    g = torch.Generator().manual_seed(0)
    return [
        LayerStats(window=torch.rand(h, n, generator=g), colsum=torch.rand(h, n, generator=g))
        for _ in range(layers)
    ]


def test_group_layout_is_the_mean_budget_and_selection_stays_per_layer() -> None:
    n, layers, h = 200, 4, 2
    info = PromptInfo.text_only(n, layers, h)
    policy = make_policy("pyramidkv", 0.5, {"window": 8})
    solo = plan_compression(policy, _stats(n, layers, h), info)
    grouped = plan_compression(policy, _stats(n, layers, h), info, groups=[[0, 1], [2, 3]])
    budgets = policy.layer_budgets(_stats(n, layers, h), info)
    assert budgets[0] > budgets[1] > budgets[2] > budgets[3]  # PyramidKV: really per layer
    for members in ([0, 1], [2, 3]):
        mean = round(sum(budgets[m] for m in members) / 2)
        for m in members:
            assert grouped[m].num_kept == mean
            assert grouped[m].tail_start == n - 8
        assert not torch.equal(grouped[members[0]].keep, grouped[members[1]].keep)  # own tokens per layer
    assert [p.num_kept for p in solo] == budgets
    assert sum(p.num_kept for p in grouped) == sum(budgets)


def test_groups_must_partition_the_layers() -> None:
    info = PromptInfo.text_only(50, 4, 2)
    with pytest.raises(ValueError, match="groups must partition the 4 layers"):
        plan_compression(make_policy("snapkv", 0.5), _stats(50, 4, 2), info, groups=[[0, 1], [1, 2, 3]])


def test_group_order_does_not_change_the_plans():
    # The block-rounding carry runs in layer order whatever order the groups are listed in (vLLM lists
    # them by KV-cache group id): permuted lists must give identical plans.
    from vllm_kvmm.policies import PromptInfo, make_policy, plan_compression

    n, layers = 230, 4
    pinfo = PromptInfo.text_only(n, layers, 2)
    pol = make_policy("snapkv", 0.25)
    gen = torch.Generator().manual_seed(0)
    stats = [LayerStats(window=torch.rand(2, n, generator=gen)) for _ in range(layers)]
    plans = plan_compression(pol, stats, pinfo, granularity=16, groups=[[0], [1], [2], [3]])
    assert len({p.num_kept for p in plans}) > 1, "the carry gives some layer one more block"
    for order in ([[2], [0], [3], [1]], [[3], [2], [1], [0]]):
        other = plan_compression(pol, stats, pinfo, granularity=16, groups=order)
        assert [torch.equal(a.keep, b.keep) for a, b in zip(plans, other, strict=True)] == [True] * layers


@pytest.mark.parametrize(
    "name, config, groups, frozen, layouts",
    [
        ("snapkv", {"window": 8}, None, 0, 2),  # uniform budget; block rounding carried: 48, 64, 48, 48
        ("pyramidkv", {"window": 8}, [[0, 1], [2, 3]], 0, 2),  # two layouts of two layers
        ("pyramidkv", {"window": 8}, None, 40, 4),  # four layouts, a frozen prefix protected in each
        ("lookm", {}, None, 0, 2),  # float64 text-prior scores, sinks protected
    ],
)
def test_selection_batched_by_layout_equals_layer_by_layer(
    name: str, config: dict, groups: list[list[int]] | None, frozen: int, layouts: int
) -> None:
    n, layers, h = 200, 4, 2
    vision = torch.zeros(n, dtype=torch.bool)
    vision[20:120] = True
    info = PromptInfo(n, vision, layers, h)
    policy = make_policy(name, 0.3, config)
    stats = _stats(n, layers, h)
    plans = plan_compression(policy, stats, info, granularity=16, groups=groups, frozen=frozen)
    assert len({(p.tail_start, p.prefix_keep) for p in plans}) == layouts
    for layer, plan in enumerate(plans):
        prot = policy.protected(info, layer)
        if frozen:
            prot = torch.zeros(n, dtype=torch.bool) if prot is None else prot.clone()
            prot[:frozen] = True
        t = plan.tail_start
        scores = policy.scores(stats, info, layer)[:, :t]
        alone = select_topk(scores, plan.prefix_keep, None if prot is None else prot[:t])
        assert torch.equal(plan.keep[:, : plan.prefix_keep], alone), layer
