"""Per-request policy validation in the API process, through vLLM's logits-processor ``validate_params``.

vLLM calls ``validate_params`` on every configured logits processor while it checks a request's
``SamplingParams``, before the request reaches the engine; a ``ValueError`` there becomes an HTTP 400 with
our message (and a plain exception in offline use), so a bad ``vllm_xargs`` never gets near the scheduler.
The processor itself leaves logits untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.platforms import current_platform
from vllm.sampling_params import SamplingType
from vllm.v1.sample.logits_processor.interface import LogitsProcessor

from vllm_kvmm.config import OverrideRules, PolicyError, resolve_request

__all__ = ["KVPolicyParams", "check_request_args", "check_sampling", "set_override_rules"]

# The operator's limits on overrides in this (API) process, set from `vllm serve`'s flags when they are
# parsed here (patches.apply_cli_args); the scheduler checks the same rules again at admission.
_RULES: OverrideRules | None = None


def set_override_rules(rules: OverrideRules | None) -> None:
    global _RULES
    _RULES = rules


def check_request_args(extra: dict[str, Any] | None) -> None:
    """Raise ``ValueError`` with a clear message for malformed or refused per-request KV-policy arguments.

    The same resolver the scheduler runs at admission, without the engine's default policy (which this
    process does not know): a budget-only override is range-checked, the rest is checked in full, and the
    operator's override rules apply when this process parsed them.
    """
    try:
        resolve_request(extra, None, rules=_RULES)
    except PolicyError as e:
        raise ValueError(str(e)) from None


def check_sampling(sampling_params: Any) -> None:
    """Refuse what would kill the engine rather than fail one request: seeded random sampling on CPU.

    vLLM 0.26's model runner rewinds a seeded request's generator after a partial (chunked) prefill step
    with ``set_offset``, which only CUDA-like generators have; on the CPU backend it raises ``CPU Generator
    does not use offset`` inside the engine core, which then dies and fails every in-flight request
    (vanilla vLLM too; found by ``vllm-kvmm bench soak``). Whether a prompt will be chunked is not known
    here, so every such request is refused with a 400 instead. GPUs serve it.
    """
    if current_platform.is_cpu() and sampling_params.sampling_type == SamplingType.RANDOM_SEED:
        raise ValueError(
            "`seed` with temperature > 0 is refused on the CPU backend: vLLM 0.26 cannot rewind a CPU "
            "generator after a chunked prefill step and the engine would stop; leave out `seed` or use "
            "temperature 0"
        )


class KVPolicyParams(LogitsProcessor):
    """A no-op logits processor whose only job is :meth:`validate_params`."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        check_request_args(getattr(sampling_params, "extra_args", None))
        check_sampling(sampling_params)

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: Any) -> None:
        return None
