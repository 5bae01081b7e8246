"""Split the attention layers into KV-cache groups with :class:`CompressSpec` (one per layer by default).

Installed in place of ``vllm.v1.core.kv_cache_utils.get_kv_cache_groups`` (see ``patches.py``): with no
KV policy configured it defers to vLLM's own function, so vanilla behaviour is untouched.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec, KVCacheSpec, SlidingWindowSpec

from vllm_kvmm.vllm_ext.settings import settings_from_vllm_config
from vllm_kvmm.vllm_ext.spec import CompressSpec

__all__ = [
    "UnsupportedModelError",
    "compressible",
    "layer_index",
    "make_groups",
    "refuse_unsupported_model",
    "split_layers",
]


class UnsupportedModelError(ValueError):
    """The model has attention layers a KV policy cannot manage (sliding window, MLA, ...)."""


def layer_index(layer_name: str) -> int:
    """Decoder layer index of an attention layer name (``...layers.12.self_attn.attn`` → 12)."""
    numbers = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", layer_name)  # layers.12 / h.12 / blocks.12
    if len(numbers) != 1:
        raise UnsupportedModelError(f"cannot find one layer index in attention layer name {layer_name!r}")
    return int(numbers[0])


def split_layers(names: list[str], groups: int | None) -> list[list[str]]:
    """Consecutive layers into ``groups`` equal groups (``None`` = one per layer)."""
    ordered = sorted(names, key=layer_index)
    n = len(ordered)
    g = n if groups is None else groups
    if not 1 <= g <= n or n % g:
        raise ValueError(
            f"kv groups must divide the {n} attention layers evenly (unequal groups waste pages), got {g}"
        )
    size = n // g
    return [ordered[i * size : (i + 1) * size] for i in range(g)]


def refuse_unsupported_model(model_config: Any) -> None:
    """Refuse, before any weight loads, a model whose attention a KV policy cannot score as it runs.

    vLLM runs multimodal prefix-LMs (Gemma 3's vision-language model, PaliGemma, ...) with bidirectional
    attention inside each image; the policies' statistics (and the dense reference) are causal, and the
    backends the plugin runs on (CPU_ATTN, FLASH_ATTN) do not take vLLM's image ranges.
    """
    if model_config.is_mm_prefix_lm:
        raise UnsupportedModelError(
            f"vllm-kvmm: --kv-policy cannot compress {model_config.architecture}: vLLM runs its image tokens "
            "with bidirectional attention (a multimodal prefix-LM), which the policies' causal attention "
            "statistics and the attention backends vllm-kvmm runs on do not support; its text-only form "
            "(e.g. Gemma3ForCausalLM) is supported"
        )


def compressible(spec: KVCacheSpec) -> bool:
    """Causal full attention: the layers a KV policy compresses."""
    return (
        type(spec) is FullAttentionSpec
        and spec.sliding_window is None
        and spec.attention_chunk_size is None
        and not spec.non_causal
    )


def _left_to_vllm(spec: KVCacheSpec) -> bool:
    """Sliding-window layers (Gemma 2/3's local layers) keep vLLM's own spec and manager: their cache is
    already bounded by the window, and vLLM frees what falls out of it."""
    return type(spec) is SlidingWindowSpec


def make_groups(
    vllm_config: Any,
    kv_cache_spec: dict[str, KVCacheSpec],
    original: Callable[[Any, dict[str, KVCacheSpec]], list[KVCacheGroupSpec]],
) -> list[KVCacheGroupSpec]:
    """The compressed layers' :class:`CompressSpec` groups first (group id = ``group_index``), then the
    sliding-window layers in groups of their own vLLM spec, of the same size (vLLM lays out one shared
    tensor per layer slot of a group, so equal sizes waste no pages)."""
    settings = settings_from_vllm_config(vllm_config)
    if settings is None:
        return original(vllm_config, kv_cache_spec)
    bad = {
        name: type(spec).__name__
        + (f"(sliding_window={spec.sliding_window})" if getattr(spec, "sliding_window", None) else "")
        for name, spec in kv_cache_spec.items()
        if not compressible(spec) and not _left_to_vllm(spec)
    }
    if bad:
        sample = ", ".join(f"{k}: {v}" for k, v in list(bad.items())[:3])
        raise UnsupportedModelError(
            f"vllm-kvmm: --kv-policy needs causal full-attention layers (sliding-window layers are left "
            f"to vLLM); this model has unsupported attention layers ({len(bad)} of {len(kv_cache_spec)}; "
            f"e.g. {sample})"
        )
    full = [name for name, spec in kv_cache_spec.items() if compressible(spec)]
    if not full:
        raise UnsupportedModelError(
            "vllm-kvmm: --kv-policy found no causal full-attention layer to compress (every layer is "
            "sliding-window)"
        )
    out = []
    for i, names in enumerate(split_layers(full, settings.groups)):
        spec = kv_cache_spec[names[0]]
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
        out.append(KVCacheGroupSpec(layer_names=names, kv_cache_spec=CompressSpec(**fields, group_index=i)))
    size = len(out[0].layer_names)
    local: dict[KVCacheSpec, list[str]] = {}
    for name in sorted((n for n in kv_cache_spec if n not in full), key=layer_index):
        local.setdefault(kv_cache_spec[name], []).append(name)
    for spec, names in local.items():
        for start in range(0, len(names), size):
            out.append(KVCacheGroupSpec(layer_names=names[start : start + size], kv_cache_spec=spec))
    return out
