"""Per-request policy validation in the API process, through vLLM's logits-processor ``validate_params``.

vLLM calls ``validate_params`` on every configured logits processor while it checks a request's
``SamplingParams``, before the request reaches the engine; a ``ValueError`` there becomes an HTTP 400 with
our message (and a plain exception in offline use), so a bad ``vllm_xargs`` never gets near the scheduler.
The processor itself leaves logits untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor.interface import LogitsProcessor

from vllm_kvmm.config import OverrideRules, PolicyError, resolve_request

__all__ = ["KVPolicyParams", "check_request_args", "set_override_rules"]

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


class KVPolicyParams(LogitsProcessor):
    """A no-op logits processor whose only job is :meth:`validate_params`."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        check_request_args(getattr(sampling_params, "extra_args", None))

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: Any) -> None:
        return None
