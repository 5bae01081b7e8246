"""Every change to vLLM 0.26.0 that no extension point allows, in one place (mirrored in ``patches/``).

Each patch wraps one function and defers to the original whenever no ``--kv-policy`` is configured, so
vanilla vLLM is untouched. ``check_vllm_internals()`` verifies that every target still exists with the
shape we rely on; ``tests/vllm/test_patches.py`` runs it, so a vLLM upgrade fails loudly, not silently.

1. ``kv_cache_utils.get_kv_cache_groups``: one KV-cache group per layer (or class of layers).
2. ``GPUModelRunner._build_attention_metadata``: publish the step's row → request id order, which
   ``CommonAttentionMetadata`` does not carry, for the compact view of compressed requests.
3. ``Platform.register_custom_kv_cache_specs`` (a hook meant to be overridden by platform plugins; a
   general plugin can only wrap it): register :class:`CompressSpec` after vLLM's built-in specs.
4. ``EngineArgs.add_cli_args`` / ``from_cli_args`` / ``create_engine_config``: the ``--kv-policy``
   flags (a general plugin cannot add CLI flags otherwise) and the engine settings they imply.
5. ``CudagraphDispatcher.dispatch``: no FULL CUDA graph for a step whose attention must feed statistics
   (Python hooks do not run inside a replayed graph); such steps use piecewise graphs.
6. ``Scheduler.update_from_output``: hand the connector the worker's report before the step's finished
   requests are freed (vLLM does it after), so a request that ends in the step that compressed it
   reports what it kept, and compressed reuse sees its final layout.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys
from dataclasses import replace
from typing import Any

from vllm_kvmm.config import OverrideRules, PolicyError, refuse_under_pipeline_parallelism
from vllm_kvmm.vllm_ext import internals
from vllm_kvmm.vllm_ext.grouping import refuse_unsupported_model
from vllm_kvmm.vllm_ext.settings import ADDITIONAL_CONFIG_KEY, KVMMSettings, settings_from_vllm_config
from vllm_kvmm.vllm_ext.validation import set_override_rules

__all__ = ["apply_patches", "check_vllm_internals", "engine_overrides"]

_APPLIED = "__kvmm_patched__"
CONNECTOR_NAME = "KVMMConnector"
CONNECTOR_MODULE = "vllm_kvmm.vllm_ext.connector"
MIDDLEWARE = "vllm_kvmm.vllm_ext.http.KVPolicyRequestCheck"
DEFAULT_BLOCK_SIZE = 16


def _wrapped(fn: Any) -> bool:
    return getattr(fn, _APPLIED, False)


def _mark(fn: Any) -> Any:
    setattr(fn, _APPLIED, True)
    return fn


def check_vllm_internals() -> None:
    """Raise if any internal we patch, call or read moved (names and signatures of vLLM 0.26.0), naming it."""
    import inspect

    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    problems = []
    if list(inspect.signature(kv_cache_utils.get_kv_cache_groups).parameters) != [
        "vllm_config",
        "kv_cache_spec",
    ]:
        problems.append("kv_cache_utils.get_kv_cache_groups(vllm_config, kv_cache_spec) changed")
    params = inspect.signature(GPUModelRunner._build_attention_metadata).parameters
    if list(params)[:3] != ["self", "num_tokens", "num_reqs"]:
        problems.append("GPUModelRunner._build_attention_metadata(self, num_tokens, num_reqs, ...) changed")
    for name in ("add_cli_args", "from_cli_args", "create_engine_config"):
        if not hasattr(EngineArgs, name):
            problems.append(f"EngineArgs.{name} is gone")
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    if "invalid_modes" not in inspect.signature(CudagraphDispatcher.dispatch).parameters:
        problems.append("CudagraphDispatcher.dispatch(..., invalid_modes) changed")
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    overridden = {
        "add_local_computed_blocks": [
            "self",
            "request_id",
            "new_computed_blocks",
            "num_local_computed_tokens",
            "num_external_computed_tokens",
        ],
        "cache_blocks": ["self", "request", "num_tokens", "retention_interval"],
        "get_num_blocks_to_allocate": [
            "self",
            "request_id",
            "num_tokens",
            "new_computed_blocks",
            "total_computed_tokens",
            "num_local_computed_tokens",
            "num_tokens_main_model",
            "apply_admission_cap",
        ],
        "allocate_external_computed_blocks": [
            "self",
            "request_id",
            "num_local_computed_tokens",
            "num_external_computed_tokens",
        ],
    }
    for name, expected in overridden.items():
        if list(inspect.signature(getattr(FullAttentionManager, name)).parameters) != expected:
            problems.append(f"FullAttentionManager.{name}({', '.join(expected)}) changed")
    from vllm.v1.core.block_pool import BlockPool

    if list(inspect.signature(BlockPool._insert_block_hash).parameters) != [
        "self",
        "block_hash_with_group_id",
        "block",
        "num_tokens",
    ]:
        problems.append(
            "BlockPool._insert_block_hash(self, block_hash_with_group_id, block, num_tokens) changed"
        )
    from vllm.v1.core.sched.scheduler import Scheduler

    if list(inspect.signature(Scheduler.update_from_output).parameters) != [
        "self",
        "scheduler_output",
        "model_runner_output",
    ]:
        problems.append("Scheduler.update_from_output(self, scheduler_output, model_runner_output) changed")
    from vllm.platforms.interface import Platform

    if not hasattr(Platform, "register_custom_kv_cache_specs"):
        problems.append("Platform.register_custom_kv_cache_specs is gone")
    problems += internals.check_reads()
    if problems:
        raise RuntimeError("vllm-kvmm: vLLM internals moved: " + "; ".join(problems))


# ---- 1. grouping ---------------------------------------------------------------------------------
def _patch_grouping() -> None:
    from vllm.v1.core import kv_cache_utils

    from vllm_kvmm.vllm_ext.grouping import make_groups

    original = kv_cache_utils.get_kv_cache_groups
    if _wrapped(original):
        return

    @functools.wraps(original)
    def get_kv_cache_groups(vllm_config: Any, kv_cache_spec: Any) -> Any:
        return make_groups(vllm_config, kv_cache_spec, original)

    kv_cache_utils.get_kv_cache_groups = _mark(get_kv_cache_groups)


# ---- 2. row -> request id ------------------------------------------------------------------------
def _patch_row_order() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_kvmm.vllm_ext.worker import worker_state

    original = GPUModelRunner._build_attention_metadata
    if _wrapped(original):
        return

    @functools.wraps(original)
    def _build_attention_metadata(
        self: Any, num_tokens: int, num_reqs: int, *args: Any, **kwargs: Any
    ) -> Any:
        worker_state().new_step(internals.step_req_ids(self, num_reqs))
        return original(self, num_tokens, num_reqs, *args, **kwargs)

    GPUModelRunner._build_attention_metadata = _mark(_build_attention_metadata)


# ---- 5. no full CUDA graph while attention feeds statistics --------------------------------------
def _patch_cudagraph_dispatch() -> None:
    from vllm.config import CUDAGraphMode
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    from vllm_kvmm.vllm_ext.worker import worker_state

    original = CudagraphDispatcher.dispatch
    if _wrapped(original):
        return

    @functools.wraps(original)
    def dispatch(self: Any, num_tokens: int, *args: Any, **kwargs: Any) -> Any:
        state = worker_state()
        if state.eager_attention or state.force_piecewise:
            kwargs["invalid_modes"] = {CUDAGraphMode.FULL, *(kwargs.get("invalid_modes") or ())}
        return original(self, num_tokens, *args, **kwargs)

    CudagraphDispatcher.dispatch = _mark(dispatch)


# ---- 6. the worker's report before finished requests are freed -----------------------------------
def _patch_scheduler_report() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_kvmm.vllm_ext.connector import KVMMConnector

    original = Scheduler.update_from_output
    if _wrapped(original):
        return

    @functools.wraps(original)
    def update_from_output(self: Any, scheduler_output: Any, model_runner_output: Any) -> Any:
        out = model_runner_output.kv_connector_output
        if isinstance(self.connector, KVMMConnector) and out is not None:
            self.connector.update_connector_output(out)  # vLLM's own call later finds it applied
        return original(self, scheduler_output, model_runner_output)

    Scheduler.update_from_output = _mark(update_from_output)


# ---- 3. spec registration ------------------------------------------------------------------------
def _patch_platform_hook() -> None:
    from vllm.platforms import current_platform

    from vllm_kvmm.vllm_ext.spec import register_specs

    cls = type(current_platform)
    original = cls.register_custom_kv_cache_specs
    if _wrapped(original):
        return
    original_fn = original.__func__

    @functools.wraps(original_fn)
    def register_custom_kv_cache_specs(klass: Any, vllm_config: Any) -> None:
        original_fn(klass, vllm_config)
        register_specs()  # idempotent; harmless when no policy is configured

    cls.register_custom_kv_cache_specs = classmethod(_mark(register_custom_kv_cache_specs))


# ---- 4. CLI and engine configuration -------------------------------------------------------------
def _add_flags(parser: Any) -> None:
    if internals.has_cli_flag(parser, "--kv-policy"):
        return
    from vllm_kvmm.policies import policy_names

    group = parser.add_argument_group(
        "vllm-kvmm",
        "KV-cache compression (vllm-kvmm). Multi-GPU: --tensor-parallel-size works with every policy (KV "
        "heads must split evenly over ranks); --pipeline-parallel-size with the layer-local policies "
        "(snapkv, pyramidkv, lookm, h2o, streamingllm: each stage plans its own layers; meda and hae need "
        "every layer and are refused). Multi-node: vLLM's Ray executor (--distributed-executor-backend "
        "ray), see docs/deploy.md.",
    )
    group.add_argument(
        "--kv-policy",
        default=None,
        choices=policy_names(),
        help="KV-cache compression policy (see `vllm-kvmm policies`). Prefix caching is off unless "
        "--enable-prefix-caching is given; then a request's cached or marked (kv_shared_prefix) prefix is "
        "kept exact and shared, and the rest of its prompt is compressed.",
    )
    group.add_argument(
        "--kv-budget", type=_budget, default=None, help="fraction of prompt KV kept, in (0, 1]"
    )
    group.add_argument(
        "--kv-policy-config",
        type=_json_object,
        default=None,
        help="policy fields as JSON, e.g. '{\"window\": 16}'",
    )
    group.add_argument(
        "--kv-groups", type=_positive_int, default=None, help="KV-cache groups (default: one per layer)"
    )
    group.add_argument(
        "--kv-overrides",
        choices=("any", "budget", "none"),
        default="any",
        help="what a request may override through vllm_xargs: policy, budget and config (any), the budget "
        "only (budget), or nothing (none); refused overrides get an HTTP 400",
    )
    group.add_argument(
        "--kv-budget-min", type=_budget, default=None, help="lowest kv_budget a request may ask for"
    )
    group.add_argument(
        "--kv-budget-max", type=_budget, default=None, help="highest kv_budget a request may ask for"
    )
    group.add_argument(
        "--kv-reuse",
        action="store_true",
        default=None,
        help="follow-up requests continue from an earlier request's compressed cache when their prompt "
        "extends its tokens (needs --enable-prefix-caching; a request opts out with kv_reuse: false)",
    )


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def engine_overrides(settings: KVMMSettings, engine_args: Any) -> dict[str, Any]:
    """The engine settings a policy implies; raises ``ValueError`` on a conflicting user choice."""
    from vllm.config import KVTransferConfig

    out: dict[str, Any] = {}
    if engine_args.enable_prefix_caching is None:
        # Off unless asked for (vLLM's default is on): with it, a prompt's compression depends on what
        # earlier requests left in the cache (a hit's queries never run), which an operator should choose.
        out["enable_prefix_caching"] = False
    if settings.reuse and not engine_args.enable_prefix_caching:
        raise ValueError(
            "vllm-kvmm: --kv-reuse finds earlier requests' compressed caches through vLLM's prefix cache: "
            "add --enable-prefix-caching"
        )
    if (engine_args.pipeline_parallel_size or 1) > 1:
        try:
            refuse_under_pipeline_parallelism(settings.policy)
        except PolicyError as e:
            raise ValueError(f"vllm-kvmm: --kv-policy {settings.policy}: {e}") from None
        if settings.groups is not None:
            raise ValueError(
                "vllm-kvmm: --kv-groups cannot be combined with pipeline parallelism (each stage plans its "
                "own layers, one KV-cache group per layer)"
            )
    if str(engine_args.distributed_executor_backend) == "ray" and importlib.util.find_spec("ray") is None:
        raise ValueError(
            "vllm-kvmm: --distributed-executor-backend ray needs Ray, which is not installed: "
            "pip install 'vllm-kvmm[ray]' (Ray 2.60.0, the version the images use)"
        )
    unsupported = {
        "decode_context_parallel_size": "decode context parallelism",
        "data_parallel_size": "data parallelism",
    }
    for field, what in unsupported.items():
        value = getattr(engine_args, field)  # EngineArgs fields (internals.READS checks them)
        if (value or 1) > 1:
            raise ValueError(f"vllm-kvmm: --kv-policy does not support {what} yet ({field}={value})")
    if engine_args.enable_dbo:
        raise ValueError("vllm-kvmm: --kv-policy does not support dual-batch overlap (--enable-dbo) yet")
    if str(engine_args.kv_cache_dtype) != "auto":
        dtype = engine_args.kv_cache_dtype
        raise ValueError(
            f"vllm-kvmm: --kv-policy needs an unquantised KV cache; got --kv-cache-dtype {dtype}"
        )
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        backend = engine_args.attention_backend
        if backend is not None and getattr(backend, "name", str(backend)) != "FLASH_ATTN":
            raise ValueError(f"vllm-kvmm: --kv-policy runs on the FLASH_ATTN backend on GPU, not {backend}")
        out["attention_backend"] = "FLASH_ATTN"
    # The V2 GPU model runner (0.26's default on CUDA) builds attention metadata through other hooks, in
    # another order; until it is supported, a policy runs on the V1 runner (the one the CPU build uses).
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("0", "false", "False"):
        raise ValueError("vllm-kvmm: --kv-policy runs on the V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    if engine_args.block_size is None:
        # Each layer keeps a whole number of blocks of its compressed prefix, so coarse blocks (the CPU
        # default is 128 tokens) round small per-layer budgets away; 16 is the GPU default anyway.
        out["block_size"] = DEFAULT_BLOCK_SIZE
    ktc = engine_args.kv_transfer_config
    if ktc is not None and ktc.kv_connector not in (None, CONNECTOR_NAME):
        raise ValueError(
            f"vllm-kvmm: --kv-policy cannot be combined with the KV connector {ktc.kv_connector!r}"
        )
    if engine_args.speculative_config:
        raise ValueError("vllm-kvmm: --kv-policy does not support speculative decoding yet")
    validator = "vllm_kvmm.vllm_ext.validation:KVPolicyParams"
    out["logits_processors"] = [*(engine_args.logits_processors or []), validator]
    out["kv_transfer_config"] = KVTransferConfig(
        kv_connector=CONNECTOR_NAME, kv_connector_module_path=CONNECTOR_MODULE, kv_role="kv_producer"
    )
    return out


def apply_cli_args(engine_args: Any, args: Any) -> None:
    """Carry ``--kv-*`` flags into ``additional_config`` (and the HTTP check into ``vllm serve``)."""
    policy = getattr(args, "kv_policy", None)
    if policy is None:
        given = settings_from_vllm_config(engine_args)
        if given is not None:
            _refuse_conflicts(given, engine_args)
            set_override_rules(request_rules(given, engine_args))
        if given is not None and hasattr(args, "middleware"):
            args.middleware = [
                *(args.middleware or []),
                MIDDLEWARE,
            ]  # --additional-config '{"kv_policy": ...}'
        return
    settings = KVMMSettings(
        policy=policy,
        budget=getattr(args, "kv_budget", None),
        config=getattr(args, "kv_policy_config", None) or {},
        groups=getattr(args, "kv_groups", None),
        overrides=getattr(args, "kv_overrides", None) or "any",
        budget_min=getattr(args, "kv_budget_min", None) or 0.0,
        budget_max=getattr(args, "kv_budget_max", None) or 1.0,
        reuse=bool(getattr(args, "kv_reuse", None)),
    )
    settings.build_policy()  # fail at start-up with the policy's own message
    _refuse_conflicts(settings, engine_args)
    # The API process checks them before the engine sees a request.
    set_override_rules(request_rules(settings, engine_args))
    extra = dict(engine_args.additional_config or {})
    extra.update(settings.to_additional_config())
    engine_args.additional_config = extra
    if hasattr(args, "middleware"):  # `vllm serve`: check vllm_xargs before vLLM renders anything
        args.middleware = [*(args.middleware or []), MIDDLEWARE]


def request_rules(settings: KVMMSettings, engine_args: Any) -> OverrideRules:
    """The operator's override rules, and under pipeline parallelism layer-local policies only."""
    return replace(settings.rules, layer_local_only=(engine_args.pipeline_parallel_size or 1) > 1)


def _refuse_conflicts(settings: KVMMSettings, engine_args: Any) -> None:
    """On the command line, a flag that conflicts with the policy ends ``vllm serve`` with one line (exit
    2, as argparse does), not the traceback the engine's own check would print later."""
    try:
        engine_overrides(settings, engine_args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    add = EngineArgs.add_cli_args
    if not _wrapped(add):

        @functools.wraps(add)
        def add_cli_args(parser: Any, *args: Any, **kwargs: Any) -> Any:
            parser = add(parser, *args, **kwargs)
            _add_flags(parser)
            return parser

        EngineArgs.add_cli_args = staticmethod(_mark(add_cli_args))

    from_cli = EngineArgs.from_cli_args.__func__
    if not _wrapped(from_cli):

        @functools.wraps(from_cli)
        def from_cli_args(cls: Any, args: Any) -> Any:
            engine_args = from_cli(cls, args)
            apply_cli_args(engine_args, args)
            return engine_args

        EngineArgs.from_cli_args = classmethod(_mark(from_cli_args))

    create = EngineArgs.create_engine_config
    if not _wrapped(create):

        @functools.wraps(create)
        def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
            settings = settings_from_vllm_config(self)
            if settings is not None:
                if _INTERNALS_ERROR is not None:
                    raise RuntimeError(_INTERNALS_ERROR)
                for key, value in engine_overrides(settings, self).items():
                    setattr(self, key, value)
            config = create(self, *args, **kwargs)
            if settings is not None:
                refuse_unsupported_model(config.model_config)
            return config

        EngineArgs.create_engine_config = _mark(create_engine_config)


def _register_backends() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, "vllm_kvmm.vllm_ext.backend_cpu.KVMMCpuBackend")
    elif current_platform.is_cuda():
        register_backend(AttentionBackendEnum.FLASH_ATTN, "vllm_kvmm.vllm_ext.backend_cuda.KVMMFlashBackend")


_INTERNALS_ERROR: str | None = None


def apply_patches() -> None:
    """Install everything (idempotent: the plugin loads several times per process).

    If vLLM's internals moved, nothing is installed and plain vLLM keeps working; the error is raised
    only when a ``--kv-policy`` asks for us (``create_engine_config``), so it cannot be missed either.
    """
    global _INTERNALS_ERROR
    try:
        check_vllm_internals()
    except RuntimeError as e:
        _INTERNALS_ERROR = str(e)
        from vllm.logger import init_logger

        init_logger(__name__).warning("%s; vllm-kvmm is disabled", e)
        _patch_engine_args()  # still needed to refuse --kv-policy with the reason
        return
    _patch_engine_args()
    _patch_platform_hook()
    _patch_grouping()
    _patch_row_order()
    _patch_cudagraph_dispatch()
    _patch_scheduler_report()
    _register_backends()


__all__ += ["ADDITIONAL_CONFIG_KEY", "CONNECTOR_MODULE", "CONNECTOR_NAME"]
