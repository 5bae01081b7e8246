"""Bad input gets a clear error, at start-up or per request; without --kv-policy nothing changes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import vllm_kvmm
from vllm_kvmm.policies import PolicyError

VLLM = str(Path(sys.executable).parent / "vllm")


def test_engine_args_validate_before_the_engine() -> None:
    assert vllm_kvmm.engine_args("meda", 0.2) == {
        "additional_config": {"kv_policy": {"policy": "meda", "budget": 0.2, "config": {}}}
    }
    with pytest.raises(PolicyError, match="unknown KV policy 'medaa'"):
        vllm_kvmm.engine_args("medaa")
    with pytest.raises(PolicyError, match=r"budget: Input should be less than or equal to 1 \(got 1.2\)"):
        vllm_kvmm.engine_args("snapkv", 1.2)
    with pytest.raises(PolicyError, match="window: Input should be greater than or equal to 1"):
        vllm_kvmm.engine_args("snapkv", 0.5, window=0)


def test_prefix_caching_stays_off_unless_asked_for() -> None:
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvmm.vllm_ext.patches import engine_overrides
    from vllm_kvmm.vllm_ext.settings import KVMMSettings

    settings = KVMMSettings(policy="meda", budget=0.5)
    assert engine_overrides(settings, EngineArgs(model="m"))["enable_prefix_caching"] is False
    assert "enable_prefix_caching" not in engine_overrides(
        settings, EngineArgs(model="m", enable_prefix_caching=True)
    )


def test_reuse_needs_prefix_caching() -> None:
    from vllm.engine.arg_utils import EngineArgs

    import vllm_kvmm
    from vllm_kvmm.vllm_ext.patches import engine_overrides
    from vllm_kvmm.vllm_ext.settings import KVMMSettings, settings_from_vllm_config

    reuse = KVMMSettings(policy="snapkv", budget=0.5, reuse=True)
    with pytest.raises(
        ValueError, match="--kv-reuse finds earlier requests' compressed caches through vLLM's"
    ):
        engine_overrides(reuse, EngineArgs(model="m"))
    assert engine_overrides(reuse, EngineArgs(model="m", enable_prefix_caching=True)) is not None
    # engine_args(reuse=True) turns prefix caching on and carries the setting to the engine.
    args = vllm_kvmm.engine_args("snapkv", 0.5, reuse=True)
    assert args["enable_prefix_caching"] is True
    assert settings_from_vllm_config(EngineArgs(model="m", **args)).reuse is True
    assert "enable_prefix_caching" not in vllm_kvmm.engine_args("snapkv", 0.5)


def _attention_spec(kind: str) -> Any:
    """A KV-cache spec of one layer kind vLLM 0.26 builds (tiny shapes)."""
    from vllm.v1 import kv_cache_interface as kv

    base = dict(block_size=16, num_kv_heads=2, head_size=32, dtype=torch.float32)
    return {
        "SlidingWindowSpec": lambda: kv.SlidingWindowSpec(**base, sliding_window=64),  # Gemma 2/3 local
        "ChunkedLocalAttentionSpec": lambda: kv.ChunkedLocalAttentionSpec(**base, attention_chunk_size=64),
        "MLAAttentionSpec": lambda: kv.MLAAttentionSpec(**base),  # DeepSeek-V2/V3
        "CrossAttentionSpec": lambda: kv.CrossAttentionSpec(**base),  # encoder-decoder
        "EncoderOnlyAttentionSpec": lambda: kv.EncoderOnlyAttentionSpec(**base),
        "MambaSpec": lambda: kv.MambaSpec(block_size=16, shapes=((4, 32),), dtypes=(torch.float32,)),
        "FullAttentionSpec": lambda: kv.FullAttentionSpec(**base, non_causal=True),  # bidirectional
    }[kind]()


@pytest.mark.parametrize(
    "kind",
    [
        "ChunkedLocalAttentionSpec",
        "MLAAttentionSpec",
        "CrossAttentionSpec",
        "EncoderOnlyAttentionSpec",
        "MambaSpec",
        "FullAttentionSpec",
    ],
)
def test_unsupported_attention_is_refused(kind: str) -> None:
    """One layer that is not causal full attention refuses the whole model at start-up, naming its kind."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_kvmm.vllm_ext.grouping import UnsupportedModelError, make_groups

    cfg = SimpleNamespace(additional_config=vllm_kvmm.engine_args("snapkv", 0.5)["additional_config"])
    full = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=32, dtype=torch.float32)
    specs = {"model.layers.0.self_attn.attn": full, "model.layers.1.self_attn.attn": _attention_spec(kind)}
    with pytest.raises(
        UnsupportedModelError, match=rf"causal full-attention layers.*\(1 of 2; e\.g\. .*: {kind}"
    ):
        make_groups(cfg, specs, original=lambda *a: pytest.fail("must not fall back"))


def test_sliding_window_layers_keep_their_spec_and_a_model_of_only_them_is_refused() -> None:
    """Gemma 2/3's local layers stay in vLLM's own sliding-window groups, of the compressed groups' size,
    after them; a model with no full-attention layer has nothing to compress."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_kvmm.vllm_ext.grouping import UnsupportedModelError, make_groups
    from vllm_kvmm.vllm_ext.spec import CompressSpec

    full = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=32, dtype=torch.float32)
    local = _attention_spec("SlidingWindowSpec")
    kinds = [local, full, local, local, full, local]
    specs = {f"model.layers.{i}.self_attn.attn": s for i, s in enumerate(kinds)}
    extra = vllm_kvmm.engine_args("snapkv", 0.5)["additional_config"]
    groups = make_groups(SimpleNamespace(additional_config=extra), specs, original=None)  # type: ignore[arg-type]
    names = [[int(n.split(".")[2]) for n in g.layer_names] for g in groups]
    assert names == [[1], [4], [0], [2], [3], [5]]
    assert [type(g.kv_cache_spec) for g in groups] == [CompressSpec] * 2 + [type(local)] * 4
    assert all(g.kv_cache_spec is local for g in groups[2:])  # vLLM's spec object, unchanged
    two = vllm_kvmm.engine_args("snapkv", 0.5, groups=1)["additional_config"]
    groups = make_groups(SimpleNamespace(additional_config=two), specs, original=None)  # type: ignore[arg-type]
    assert [[int(n.split(".")[2]) for n in g.layer_names] for g in groups] == [[1, 4], [0, 2], [3, 5]]
    only_local = {f"model.layers.{i}.self_attn.attn": local for i in range(2)}
    with pytest.raises(UnsupportedModelError, match="no causal full-attention layer to compress"):
        make_groups(SimpleNamespace(additional_config=extra), only_local, original=None)  # type: ignore[arg-type]


def test_groups_split_layers_and_vanilla_falls_through() -> None:
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_kvmm.vllm_ext.grouping import make_groups
    from vllm_kvmm.vllm_ext.spec import CompressSpec

    full = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=32, dtype=torch.float32)
    specs = {f"model.layers.{i}.self_attn.attn": full for i in (3, 0, 2, 1)}
    extra = vllm_kvmm.engine_args("snapkv", 0.5, groups=2)["additional_config"]
    groups = make_groups(SimpleNamespace(additional_config=extra), specs, original=None)  # type: ignore[arg-type]
    assert [g.layer_names for g in groups] == [
        ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"],
        ["model.layers.2.self_attn.attn", "model.layers.3.self_attn.attn"],
    ]
    assert [g.kv_cache_spec.group_index for g in groups] == [0, 1]
    assert all(isinstance(g.kv_cache_spec, CompressSpec) for g in groups)
    bad = vllm_kvmm.engine_args("snapkv", 0.5, groups=3)["additional_config"]
    with pytest.raises(ValueError, match="must divide the 4 attention layers evenly"):
        make_groups(SimpleNamespace(additional_config=bad), specs, original=None)  # type: ignore[arg-type]
    sentinel: list[Any] = []
    assert make_groups(SimpleNamespace(additional_config={}), specs, lambda c, s: sentinel) is sentinel


def test_request_args_checks() -> None:
    from vllm_kvmm.vllm_ext.validation import check_request_args

    check_request_args({"kv_policy": "snapkv", "kv_budget": 0.3, "kv_policy_config": '{"window": 8}'})
    check_request_args({"kv_budget": 0.5})
    check_request_args({"unrelated": 1})
    for bad, msg in [
        ({"kv_policy": "x"}, "unknown KV policy 'x'"),
        ({"kv_budget": 0}, r"kv_budget must be a number in \(0, 1\], got 0"),
        ({"kv_budget": "half"}, "got 'half'"),
        ({"kv_policy": "lookm", "kv_policy_config": "{nope"}, "kv-policy-config is not valid JSON"),
        ({"kv_budgett": 0.5}, r"unknown KV-policy request argument\(s\) \['kv_budgett'\]"),
        ({"kv_policy": "meda", "kv_budget": None}, r"got null; leave it out for the default"),
        ({"kv_policy": "meda", "kv_budget": float("nan")}, r"number in \(0, 1\], got nan"),
        ({"kv_budget": float("nan")}, r"number in \(0, 1\], got nan"),
    ]:
        with pytest.raises(ValueError, match=msg):
            check_request_args(bad)


def _asgi(middleware_cls: Any, body: bytes) -> tuple[int, bytes, bytes | None]:
    """Run one POST through the middleware; returns (status, response body, body the app saw)."""
    seen: dict[str, bytes] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["body"] = (await receive())["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent: list[dict] = []
    parts = [body[: len(body) // 2], body[len(body) // 2 :]]

    async def receive() -> dict:
        chunk = parts.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(parts)}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}
    asyncio.run(middleware_cls(app)(scope, receive, send))
    return sent[0]["status"], sent[1]["body"], seen.get("body")


def test_http_middleware_rejects_before_the_app() -> None:
    from vllm_kvmm.vllm_ext.http import KVPolicyRequestCheck

    bad = json.dumps({"model": "m", "vllm_xargs": {"kv_policy": "nope"}}).encode()
    status, body, seen = _asgi(KVPolicyRequestCheck, bad)
    assert status == 400 and seen is None
    assert "unknown KV policy 'nope'" in json.loads(body)["error"]["message"]
    good = json.dumps({"model": "m", "vllm_xargs": {"kv_policy": "meda", "kv_budget": 0.2}}).encode()
    status, body, seen = _asgi(KVPolicyRequestCheck, good)
    assert (status, body, seen) == (200, b"ok", good)  # the app got the whole body, untouched
    # the documented object form of kv_policy_config reaches vLLM as the string its scalar-only xargs take
    obj = {"model": "m", "vllm_xargs": {"kv_policy": "meda", "kv_policy_config": {"sink_tokens": 2}}}
    status, body, seen = _asgi(KVPolicyRequestCheck, json.dumps(obj).encode())
    assert (status, body) == (200, b"ok") and seen is not None
    assert json.loads(json.loads(seen)["vllm_xargs"]["kv_policy_config"]) == {"sink_tokens": 2}
    bad = json.dumps({"model": "m", "vllm_xargs": {"kv_policy": "meda", "kv_policy_config": {"sink": 2}}})
    status, body, seen = _asgi(KVPolicyRequestCheck, bad.encode())
    assert status == 400 and seen is None and "sink" in json.loads(body)["error"]["message"]


def test_cli_flags_listed_and_validated() -> None:
    # Four `vllm serve` processes that each stop at argument parsing: started together (most of each is
    # importing vLLM), then read one by one.
    argvs = {
        "help": ["--help=vllm-kvmm"],
        "bad": ["some-model", "--kv-policy", "meda", "--kv-budget", "1.5"],
        "conflict": ["some-model", "--kv-policy", "meda", "--kv-cache-dtype", "fp8"],
        "reuse": ["some-model", "--kv-policy", "snapkv", "--kv-reuse"],
    }
    procs = {
        k: subprocess.Popen([VLLM, "serve", *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k, a in argvs.items()
    }
    try:
        done = {k: (p, *p.communicate(timeout=300)) for k, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()  # no-op for those that finished
    helped, bad, conflict, reuse = (
        subprocess.CompletedProcess(argvs[k], p.returncode, out, err) for k, (p, out, err) in done.items()
    )
    for flag in (
        "--kv-policy",
        "--kv-budget",
        "--kv-overrides",
        "--kv-budget-min",
        "--kv-budget-max",
        "--kv-reuse",
    ):
        assert flag in helped.stdout
    said = " ".join(helped.stdout.split())  # argparse wraps the group's description
    assert "--pipeline-parallel-size with the layer-local policies" in said
    assert "Multi-node: vLLM's Ray executor (--distributed-executor-backend ray)" in said
    assert bad.returncode == 2
    assert "argument --kv-budget: must be a number in (0, 1], got '1.5'" in bad.stderr
    assert conflict.returncode == 2 and "Traceback" not in conflict.stderr
    assert (
        "error: vllm-kvmm: --kv-policy needs an unquantised KV cache; got --kv-cache-dtype fp8"
        in conflict.stderr
    )
    assert reuse.returncode == 2 and "add --enable-prefix-caching" in reuse.stderr


@pytest.mark.parametrize(
    "field,value,msg",
    [
        ("data_parallel_size", 2, "does not support data parallelism"),
        ("enable_dbo", True, "dual-batch overlap"),
        ("kv_cache_dtype", "fp8", "needs an unquantised KV cache; got --kv-cache-dtype fp8"),
        ("speculative_config", {"method": "ngram"}, "does not support speculative decoding"),
    ],
)
def test_unsupported_engine_settings_are_refused(field: str, value: Any, msg: str) -> None:
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvmm.vllm_ext.patches import engine_overrides
    from vllm_kvmm.vllm_ext.settings import KVMMSettings

    args = EngineArgs(model="unused")
    setattr(args, field, value)
    with pytest.raises(ValueError, match=msg):
        engine_overrides(KVMMSettings(policy="snapkv", budget=0.5), args)


def test_policy_config_needs_a_policy() -> None:
    from vllm_kvmm.vllm_ext.validation import check_request_args

    with pytest.raises(ValueError, match="kv_policy_config needs kv_policy"):
        check_request_args({"kv_policy_config": '{"window": 8}'})


def test_http_check_applies_the_servers_override_rules() -> None:
    from vllm_kvmm.config import OverrideRules
    from vllm_kvmm.vllm_ext.http import KVPolicyRequestCheck
    from vllm_kvmm.vllm_ext.validation import set_override_rules

    set_override_rules(OverrideRules("budget", 0.1, 0.8))
    try:
        refused = json.dumps({"model": "m", "vllm_xargs": {"kv_policy": "full"}}).encode()
        status, body, seen = _asgi(KVPolicyRequestCheck, refused)
        assert status == 400 and seen is None
        assert (
            "kv_policy, kv_policy_config, kv_shared_prefix and kv_reuse need --kv-overrides any"
            in json.loads(body)["error"]["message"]
        )
        allowed = json.dumps({"model": "m", "vllm_xargs": {"kv_budget": 0.5}}).encode()
        status, _, seen = _asgi(KVPolicyRequestCheck, allowed)
        assert status == 200 and seen == allowed
    finally:
        set_override_rules(None)


def test_gemma3_vision_language_model_is_refused_before_loading(tmp_path: Path) -> None:
    """vLLM runs Gemma 3's image tokens with bidirectional attention (a multimodal prefix-LM): refused when
    the engine config is made, from config.json alone (no weights, no tokenizer)."""
    from transformers import Gemma3Config
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvmm.vllm_ext.grouping import UnsupportedModelError
    from vllm_kvmm.vllm_ext.patches import apply_patches

    text = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, vocab_size=49280,
    )  # fmt: skip
    vision = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=64,
        patch_size=16,
    )  # fmt: skip
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    config.architectures = ["Gemma3ForConditionalGeneration"]
    config.save_pretrained(tmp_path)
    apply_patches()  # what vLLM's plugin loader does in a server (idempotent)
    args = EngineArgs(model=str(tmp_path), skip_tokenizer_init=True, **vllm_kvmm.engine_args("snapkv", 0.5))
    with pytest.raises(
        UnsupportedModelError,
        match=r"cannot compress Gemma3ForConditionalGeneration: vLLM runs its image tokens with bidi",
    ):
        args.create_engine_config()
    # Without a policy the same model is vLLM's business, untouched.
    assert EngineArgs(model=str(tmp_path), skip_tokenizer_init=True).create_engine_config() is not None
