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

from vllm_kvmm.config import KVPolicyArgs, PolicyError

__all__ = ["KVPolicyParams", "check_request_args"]

KNOWN = {"kv_policy", "kv_budget", "kv_policy_config"}


def check_request_args(extra: dict[str, Any] | None) -> None:
    """Raise ``ValueError`` with a clear message for malformed per-request KV-policy arguments."""
    if not extra:
        return
    unknown = sorted(k for k in extra if k.startswith("kv_") and k not in KNOWN)
    if unknown:
        raise ValueError(f"unknown KV-policy request argument(s) {unknown}; use {sorted(KNOWN)}")
    if not any(k in extra for k in KNOWN):
        return
    if "kv_policy_config" in extra and "kv_policy" not in extra:
        raise ValueError("kv_policy_config needs kv_policy: name the policy its fields belong to")
    if "kv_budget" in extra and extra["kv_budget"] is None:
        raise ValueError("kv_budget must be a number in (0, 1], got null; leave it out for the default")
    try:
        if "kv_policy" in extra:
            KVPolicyArgs.parse(extra["kv_policy"], extra.get("kv_budget"), extra.get("kv_policy_config"))
        else:
            # The policy is the engine's default; check what can be checked without it.
            budget = extra.get("kv_budget")
            ok = isinstance(budget, int | float) and not isinstance(budget, bool) and 0 < budget <= 1
            if budget is not None and not ok:
                raise PolicyError(f"kv_budget must be a number in (0, 1], got {budget!r}")
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
