"""Parts several policies share, composed rather than re-written per policy.

Each part is a :class:`~vllm_kvmm.policies.base.KVPolicy` subclass that adds its fields and one hook; a
policy lists the parts it is made of as bases, e.g. ``class StreamingLLM(Sinks, DecodeCadence)``. Hooks
call ``super()``, so parts stack in any order (the MRO chains them) and a policy's own override can still
call ``super()`` to get what its parts decided.

* :class:`Sinks` — the first ``sink_tokens`` prompt tokens are protected in every layer (attention sink);
* :class:`Merging` — evicted tokens folded into their nearest kept key (:class:`MergeSpec`);
* :class:`SampledScores` — accumulated attention estimated from every ``score_step``-th query row;
* :class:`DecodeCadence` — eviction while decoding every ``decode_interval`` generated tokens; the policy
  only says *how* (:meth:`DecodeCadence.decode_rule`), the part says *when* and whether at all.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from vllm_kvmm.ops import StatsRequest
from vllm_kvmm.policies.base import KVPolicy, MergeSpec, PromptInfo
from vllm_kvmm.policies.decode import DecodeSpec

__all__ = ["DecodeCadence", "Merging", "SampledScores", "Sinks", "union"]


def union(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """``a | b`` for ``[N]`` bool masks where ``None`` means "none protected"."""
    if a is None or b is None:
        return b if a is None else a
    return a | b


class Sinks(KVPolicy):
    """Protects the first ``sink_tokens`` tokens of the prompt in every layer.

    Protected rather than scored: under the paged layout a small layer's budget can round to its recent
    blocks alone, where no score would save the sink; a protected token makes the layer keep one more
    block instead (docs/notes/meda_review_2026-11-23.md).
    """

    sink_tokens: int = Field(0, ge=0, description="the first tokens every layer keeps (attention sink)")

    def protected(self, info: PromptInfo, layer: int) -> torch.Tensor | None:
        own = super().protected(info, layer)
        if not self.sink_tokens:
            return own
        return union(own, torch.arange(info.num_tokens) < self.sink_tokens)


class Merging(KVPolicy):
    """Evicted tokens merged into their cosine-nearest kept key (:mod:`vllm_kvmm.ops.merge`)."""

    merge: Literal["pivot", "average", "weighted", "none"] = Field(
        "none", description="how an evicted token joins its nearest kept one (none: dropped)"
    )
    merge_keys: bool = Field(True, description="merge keys too (False is safer with M-RoPE models)")
    similarity_filter: bool = Field(False, description="released code's merge filter (mean best sim)")
    misaligned_source: bool = Field(False, description="reproduce the released MEDA code's merge index bug")

    def model_post_init(self, context: object) -> None:
        if self.misaligned_source and not self.similarity_filter:
            msg = "misaligned_source reproduces a bug of the filtered merge; set similarity_filter"
            raise ValueError(f"{self.name}: {msg}")
        super().model_post_init(context)

    def merge_spec(self, info: PromptInfo) -> MergeSpec | None:
        if self.merge == "none":
            return None
        return MergeSpec(
            self.merge,
            merge_keys=self.merge_keys,
            similarity_filter=self.similarity_filter,
            misaligned_source=self.misaligned_source,
        )


class SampledScores(KVPolicy):
    """Accumulated attention (``colsum``) from the queries at every ``score_step``-th position.

    H2O-style scores ``Σ_i A[i, j]`` need every query against every key, the most expensive statistic
    there is (on a CPU ~1.7× the forward itself); a systematic sample of the rows, scaled by the step,
    costs ~1/step of it. An estimate: near-tied tokens can trade places (docs/benchmarks.md measures the
    kept sets and the answers against every row). Its hook asks for the column sums at :attr:`score_step`
    (:class:`~vllm_kvmm.ops.StatsRequest`'s ``colsum_step``); a policy that scores otherwise too (the MEDA
    family) builds its own request with the same step.
    """

    score_step: int = Field(
        1,
        ge=1,
        description="accumulated attention from the queries at every `score_step`-th position, scaled by it "
        "(1 = every query, the paper; s ≈ 1/s of the statistics' cost)",
    )

    def stats_request(self, info: PromptInfo) -> StatsRequest:
        return StatsRequest(colsum=True, colsum_step=self.score_step)


class DecodeCadence(KVPolicy):
    """Eviction while decoding, every ``decode_interval`` generated tokens (``None``: prefill only).

    The one place that decides whether a request flushes at all; the scheduler (flush points) and the
    worker (what a flush keeps) both read :meth:`decode_spec`, so they cannot disagree.
    """

    decode_interval: int | None = Field(
        None, ge=1, description="evict while decoding, every this many generated tokens (None: prefill only)"
    )

    def decodes(self) -> bool:
        """Whether a configured cadence applies: by default only when the prompt is compressed at all
        (at budget 1 nothing is evicted, so nothing may be while decoding either)."""
        return self.compresses

    def decode_rule(self, info: PromptInfo, interval: int) -> DecodeSpec:
        """The policy's flush rule (kind, recent window, sinks, capacity) at cadence ``interval``."""
        raise NotImplementedError

    def decode_spec(self, info: PromptInfo) -> DecodeSpec | None:
        if self.decode_interval is None or not self.decodes():
            return None
        return self.decode_rule(info, self.decode_interval)
