"""User-facing policy selection: one pydantic model shared by the CLI, `LLM(...)` and per-request args."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vllm_kvmm.policies import POLICIES, KVPolicy, PolicyError, PromptInfo, make_policy, policy_names

__all__ = [
    "REQUEST_ARGS",
    "KVPolicyArgs",
    "OverrideRules",
    "PolicyError",
    "ResolvedPolicy",
    "resolve_request",
    "reuse_arg",
    "shared_prefix_arg",
]

# Per-request overrides, as ``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP).
XARG_POLICY, XARG_BUDGET, XARG_CONFIG = "kv_policy", "kv_budget", "kv_policy_config"
# The prompt prefix kept exact and cacheable under compression: tokens, or "images" (through the last
# image or video token). See vllm_ext/prefix.py.
XARG_SHARED = "kv_shared_prefix"
SHARED_IMAGES = "images"
# Continue from an earlier request's compressed cache when this prompt extends its tokens (opt-in: the
# follow-up then sees that cache, not its own prompt compressed afresh). See vllm_ext/reuse.py.
XARG_REUSE = "kv_reuse"
REQUEST_ARGS = (XARG_POLICY, XARG_BUDGET, XARG_CONFIG, XARG_SHARED, XARG_REUSE)


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


@dataclass(frozen=True)
class ResolvedPolicy:
    """One request's policy, validated and resolved once, at admission, then passed on and never re-parsed.

    Plain and picklable: it travels from the scheduler to the workers inside each prefill job.
    ``budget`` is the effective one (the policy's default filled in); ``config`` the policy's own fields;
    ``decode_interval`` the decode-time eviction cadence that the policy's ``decode_spec`` gives for this
    prompt (``None``: it never flushes, e.g. H2O at budget 1), read by the scheduler and the worker alike.
    """

    name: str
    budget: float | None
    config: dict[str, Any] = field(default_factory=dict)
    decode_interval: int | None = None

    @classmethod
    def of(cls, policy: KVPolicy, num_prompt_tokens: int) -> ResolvedPolicy:
        spec = policy.decode_spec(PromptInfo.text_only(max(1, num_prompt_tokens), 1, 1))
        config = policy.model_dump(exclude={"budget"})
        return cls(policy.name, policy.budget, config, None if spec is None else spec.interval)

    @property
    def compresses(self) -> bool:
        return self.name != "full"

    def build(self) -> KVPolicy:
        return make_policy(self.name, self.budget, self.config)


FULL = ResolvedPolicy("full", 1.0)


@dataclass(frozen=True)
class OverrideRules:
    """What a client may override per request (``vllm serve --kv-overrides``, ``--kv-budget-min/max``).

    ``any``: policy, budget and config; ``budget``: the budget only, within ``[budget_min, budget_max]``;
    ``none``: nothing, every request runs the engine's policy. The bounds apply to any budget a request
    names. A refusal says which flag would allow it.
    """

    allow: Literal["any", "budget", "none"] = "any"
    budget_min: float = 0.0
    budget_max: float = 1.0
    layer_local_only: bool = False  # pipeline parallelism: each stage plans its own layers

    def check(self, extra: dict[str, Any]) -> None:
        named = [k for k in REQUEST_ARGS if k in extra]
        if not named:
            return
        name = extra.get(XARG_POLICY)
        if self.layer_local_only and isinstance(name, str) and name in POLICIES:
            refuse_under_pipeline_parallelism(name)
        if self.allow == "none":
            raise PolicyError(
                f"per-request KV-policy overrides are off on this server (--kv-overrides none); drop {named}"
            )
        if self.allow == "budget" and any(
            k in extra for k in (XARG_POLICY, XARG_CONFIG, XARG_SHARED, XARG_REUSE)
        ):
            raise PolicyError(
                "this server lets requests set only kv_budget (--kv-overrides budget); kv_policy, "
                "kv_policy_config, kv_shared_prefix and kv_reuse need --kv-overrides any"
            )
        budget = extra.get(XARG_BUDGET)
        # Only a valid budget is held to the bounds; an invalid one gets the general (0, 1] message.
        valid = isinstance(budget, int | float) and not isinstance(budget, bool) and 0 < budget <= 1
        if valid and not self.budget_min <= budget <= self.budget_max:
            raise PolicyError(
                f"kv_budget {budget:g} is outside this server's bounds [{self.budget_min:g}, "
                f"{self.budget_max:g}] (--kv-budget-min / --kv-budget-max)"
            )


def shared_prefix_arg(extra: dict[str, Any] | None) -> int | Literal["images"]:
    """The request's ``kv_shared_prefix`` (0 when absent): a token count, or ``"images"``.

    Raises :class:`PolicyError` (an HTTP 400) for anything else.
    """
    value = (extra or {}).get(XARG_SHARED, 0)
    if value == SHARED_IMAGES:
        return SHARED_IMAGES
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PolicyError(
            f'kv_shared_prefix must be a number of prompt tokens (>= 0) or "images", got {value!r}'
        )
    return value


def reuse_arg(extra: dict[str, Any] | None, default: bool = False) -> bool:
    """The request's ``kv_reuse`` (``default``, the server's ``--kv-reuse``, when absent).

    Raises :class:`PolicyError` (an HTTP 400) for anything but ``true`` or ``false`` (or ``1`` / ``0``: vLLM's
    OpenAI server types ``vllm_xargs`` values as strings or numbers, so a JSON ``true`` reaches the engine
    as ``1``).
    """
    value = (extra or {}).get(XARG_REUSE, default)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise PolicyError(f"kv_reuse must be true or false, got {value!r}")


def refuse_under_pipeline_parallelism(name: str) -> None:
    """Raise :class:`PolicyError` when policy ``name`` cannot plan a pipeline stage's layers alone."""
    if not POLICIES[name].layer_local:
        local = ", ".join(n for n, cls in POLICIES.items() if cls.layer_local)
        raise PolicyError(
            f"policy {name!r} plans every layer from the whole model's statistics, and pipeline stages hold "
            f"different layers: under pipeline parallelism use one of {local}"
        )


class PolicyDefaults(Protocol):
    """The engine-wide defaults a request overrides (``KVMMSettings``, ``KVPolicyArgs``)."""

    @property
    def policy(self) -> str: ...
    @property
    def budget(self) -> float | None: ...
    @property
    def config(self) -> dict[str, Any]: ...


def resolve_request(
    extra: dict[str, Any] | None,
    default: PolicyDefaults | None,
    num_prompt_tokens: int = 1,
    rules: OverrideRules | None = None,
) -> ResolvedPolicy:
    """The policy of one request: the engine's ``default`` overridden by its ``extra_args``.

    The one validator of per-request arguments: the API process calls it with ``default=None`` (it does
    not know the engine's policy; a budget-only override is then range-checked), the scheduler with the
    engine's settings. ``rules``: the operator's limits on overrides (``None``: any override). Raises
    :class:`PolicyError` with a message fit for an HTTP 400 body.
    """
    extra = extra or {}
    unknown = sorted(k for k in extra if k.startswith("kv_") and k not in REQUEST_ARGS)
    if unknown:
        raise PolicyError(f"unknown KV-policy request argument(s) {unknown}; use {sorted(REQUEST_ARGS)}")
    if XARG_CONFIG in extra and XARG_POLICY not in extra:
        raise PolicyError("kv_policy_config needs kv_policy: name the policy its fields belong to")
    if XARG_BUDGET in extra and extra[XARG_BUDGET] is None:
        raise PolicyError("kv_budget must be a number in (0, 1], got null; leave it out for the default")
    shared_prefix_arg(extra)
    reuse_arg(extra)
    if rules is not None:
        rules.check(extra)
    if XARG_POLICY in extra:
        # A policy named without a budget runs at its own default budget, not the engine's; the engine's
        # policy named again keeps the engine's configuration unless the request gives its own.
        name, budget = extra[XARG_POLICY], extra.get(XARG_BUDGET)
        inherited = default.config if default is not None and name == default.policy else None
        config = extra.get(XARG_CONFIG, inherited)
    elif default is None:
        budget = extra.get(XARG_BUDGET)
        ok = isinstance(budget, int | float) and not isinstance(budget, bool) and 0 < budget <= 1
        if budget is not None and not ok:
            raise PolicyError(f"kv_budget must be a number in (0, 1], got {budget!r}")
        return FULL  # nothing more to check without the engine's policy
    else:
        name, budget, config = default.policy, extra.get(XARG_BUDGET, default.budget), default.config
    return ResolvedPolicy.of(KVPolicyArgs.parse(name, budget, config), num_prompt_tokens)
