"""Name → policy class registry, and construction from untrusted input with clear errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from vllm_kvmm.policies.base import KVPolicy
from vllm_kvmm.policies.full import Full
from vllm_kvmm.policies.h2o import H2O
from vllm_kvmm.policies.hae import HAE
from vllm_kvmm.policies.lookm import LookM
from vllm_kvmm.policies.meda import MEDA, MEDAPaper, MEDAReleased
from vllm_kvmm.policies.pyramidkv import PyramidKV
from vllm_kvmm.policies.snapkv import SnapKV
from vllm_kvmm.policies.streaming import StreamingLLM

__all__ = ["POLICIES", "PolicyError", "make_policy", "policy_names"]

POLICIES: dict[str, type[KVPolicy]] = {
    cls.name: cls
    for cls in (MEDA, MEDAPaper, MEDAReleased, LookM, HAE, SnapKV, PyramidKV, H2O, StreamingLLM, Full)
}


class PolicyError(ValueError):
    """A policy name or configuration that cannot be used; the message says why."""


def policy_names() -> list[str]:
    return list(POLICIES)


def make_policy(name: str, budget: float | None = None, config: Mapping[str, Any] | None = None) -> KVPolicy:
    """Build a validated policy. ``config`` holds extra fields (e.g. ``{"window": 16}``).

    Raises :class:`PolicyError` with a message naming the policy and the offending field.
    """
    if not isinstance(name, str) or name not in POLICIES:
        raise PolicyError(f"unknown KV policy {name!r}; choose one of: {', '.join(POLICIES)}")
    cls = POLICIES[name]
    fields = dict(config or {})
    if budget is not None:
        fields["budget"] = budget
    try:
        return cls.model_validate(fields)
    except ValidationError as e:
        problems = "; ".join(_describe(err) for err in e.errors())
        raise PolicyError(f"invalid configuration for KV policy {name!r}: {problems}") from None
    except ValueError as e:  # raised by model_post_init checks
        raise PolicyError(f"invalid configuration for KV policy {name!r}: {e}") from None


def _describe(err: Mapping[str, Any]) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "config"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["loc"] and err["type"] != "extra_forbidden":
        msg += f" (got {err['input']!r})"
    return f"{where}: {msg}"
