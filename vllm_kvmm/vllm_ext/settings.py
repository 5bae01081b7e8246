"""The engine-wide policy settings, carried in ``vllm_config.additional_config["kv_policy"]``.

``additional_config`` is the one channel that reaches the engine core and every worker unchanged, in
process and across processes, so the CLI flags, ``vllm_kvmm.engine_args(...)`` and a hand-written
``--additional-config`` all end up here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vllm_kvmm.config import KVPolicyArgs, OverrideRules
from vllm_kvmm.policies import KVPolicy

__all__ = ["ADDITIONAL_CONFIG_KEY", "KVMMSettings", "settings_from_vllm_config"]

ADDITIONAL_CONFIG_KEY = "kv_policy"
_RULE_FIELDS = ("overrides", "budget_min", "budget_max", "reuse")


class KVMMSettings(BaseModel):
    """Engine-wide defaults; a request may override policy and budget through ``vllm_xargs``.

    ``groups``: KV-cache groups the attention layers are split into (``None`` = one per layer, which
    gives true per-layer budgets; fewer groups share one budget per group of consecutive layers).
    ``reuse``: follow-ups continue from earlier requests' compressed caches unless they say
    ``kv_reuse: false`` (``--kv-reuse``; needs prefix caching, vllm_ext/reuse.py).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: str
    budget: float | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    groups: int | None = Field(None, ge=1)
    overrides: Literal["any", "budget", "none"] = "any"
    budget_min: float = Field(0.0, ge=0.0, le=1.0)
    budget_max: float = Field(1.0, gt=0.0, le=1.0)
    reuse: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> KVMMSettings:
        if self.budget_min > self.budget_max:
            raise ValueError(f"--kv-budget-min {self.budget_min} exceeds --kv-budget-max {self.budget_max}")
        return self

    @property
    def rules(self) -> OverrideRules:
        """What a request may override (checked by the API process and again at admission)."""
        return OverrideRules(self.overrides, self.budget_min, self.budget_max)

    def build_policy(self) -> KVPolicy:
        return KVPolicyArgs.parse(self.policy, self.budget, self.config)

    @property
    def compresses(self) -> bool:
        """Whether the default policy (or any per-request override) may evict; ``full`` never does."""
        return self.policy != "full"

    def to_additional_config(self) -> dict[str, Any]:
        # The override rules only when set: a plain engine_args(...) stays {policy, budget, config}.
        unset = {k for k in _RULE_FIELDS if getattr(self, k) == type(self).model_fields[k].default}
        return {ADDITIONAL_CONFIG_KEY: self.model_dump(exclude_none=True, exclude=unset)}


def settings_from_vllm_config(vllm_config: Any) -> KVMMSettings | None:
    """The active settings, or ``None`` when no ``--kv-policy`` was given (vLLM runs untouched)."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    raw = extra.get(ADDITIONAL_CONFIG_KEY) if isinstance(extra, dict) else None
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"policy": raw}
    settings = KVMMSettings.model_validate(raw)
    settings.build_policy()  # validate once, with the policy's own message
    return settings
