"""User-facing policy selection: one pydantic model shared by the CLI, `LLM(...)` and per-request args."""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vllm_kvmm.policies import KVPolicy, PolicyError, make_policy, policy_names

__all__ = ["KVPolicyArgs", "PolicyError"]


class KVPolicyArgs(BaseModel):
    """``--kv-policy NAME [--kv-budget RHO] [--kv-policy-config JSON]``, validated in one place.

    ``config`` holds the policy's own fields (``{"window": 16}`` for SnapKV, ...). Building raises
    :class:`PolicyError` with a message that names the policy and the field.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: str = Field(description="one of the registered policies")
    budget: float | None = Field(None, description="fraction of prompt KV kept, in (0, 1]")
    config: dict[str, Any] = Field(default_factory=dict)

    @field_validator("config", mode="before")
    @classmethod
    def _parse_json(cls, v: Any) -> Any:
        if v is None:
            return {}
        if isinstance(v, str):
            try:
                v = json.loads(v) if v.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"kv-policy-config is not valid JSON: {e.msg} at character {e.pos}"
                ) from None
        if not isinstance(v, dict):
            raise ValueError(f"kv-policy-config must be a JSON object, got {type(v).__name__}")
        return v

    def build(self) -> KVPolicy:
        return make_policy(self.policy, self.budget, self.config)

    @classmethod
    def parse(cls, policy: Any, budget: Any = None, config: Any = None) -> KVPolicy:
        """Validate untrusted values (CLI strings, JSON request fields) into a policy or raise PolicyError."""
        if policy not in policy_names():
            raise PolicyError(f"unknown KV policy {policy!r}; choose one of: {', '.join(policy_names())}")
        if isinstance(budget, bool):
            raise PolicyError(f"kv budget must be a number in (0, 1], got {budget!r}")
        if budget is not None and not isinstance(budget, int | float):
            try:
                budget = float(budget)  # CLI strings
            except (TypeError, ValueError):
                raise PolicyError(f"kv budget must be a number in (0, 1], got {budget!r}") from None
        if budget is not None and not math.isfinite(budget):
            raise PolicyError(f"kv budget must be a number in (0, 1], got {budget!r}")
        try:
            args = cls(policy=policy, budget=budget, config=config)
        except ValidationError as e:
            msg = "; ".join(str(err["msg"]).removeprefix("Value error, ") for err in e.errors())
            raise PolicyError(msg) from None
        return args.build()
