"""Teacher forcing inside vLLM, for perplexity through the serving path.

A request whose ``SamplingParams.extra_args`` holds ``force_tokens`` samples exactly those tokens, one per
step. With ``logprobs=k`` vLLM reports, in its default ``raw_logprobs`` mode, log-probabilities computed
from the model's logits *before* any logits processor (vLLM 0.26 ``v1/sample/sampler.py``,
``Sampler.forward``): the entry of the sampled token is the model's log-probability of the forced token,
and the rank-1 entry its argmax. So one forced generation gives the perplexity of a true continuation and
the next-token argmax at every position, over whatever the KV policy left in the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

__all__ = ["ForceTokens", "forced_logprobs"]


class ForceTokens(AdapterLogitsProcessor):
    """``LLM(..., logits_processors=[ForceTokens])``; per request ``extra_args={"force_tokens": [...]}``."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(
        self, params: Any
    ) -> Callable[[list[int], torch.Tensor], torch.Tensor] | None:
        force = (params.extra_args or {}).get("force_tokens")
        if not force:
            return None
        force = [int(t) for t in force]

        def apply(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            # ``output_ids`` is vLLM's live list of this request's tokens, so its length is the step
            # (also after a preemption, which replays the request with its tokens so far).
            step = len(output_ids)
            if step < len(force):
                logits.fill_(float("-inf"))
                logits[force[step]] = 0.0
            return logits

        return apply


def forced_logprobs(output: Any, forced: list[int]) -> tuple[list[float], list[int]]:
    """``(log p(forced[i]), argmax_i)`` per position from a vLLM ``CompletionOutput`` of a forced request.

    Raises ``RuntimeError`` if vLLM did not sample the forced tokens (the processor was not installed).
    """
    got = list(output.token_ids)
    if got != forced:
        raise RuntimeError(
            f"teacher forcing failed: vLLM sampled {got[:8]}... instead of {forced[:8]}... "
            "(is ForceTokens in LLM(logits_processors=...)?)"
        )
    logp, top1 = [], []
    for tok, entries in zip(forced, output.logprobs, strict=True):
        logp.append(float(entries[tok].logprob))
        top1.append(next(t for t, e in entries.items() if e.rank == 1))
    return logp, top1
