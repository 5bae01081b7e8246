"""``vllm.general_plugins`` entry point. vLLM calls :func:`register` in every process it starts."""

from __future__ import annotations


def register() -> None:
    from vllm_kvmm.vllm_ext.patches import apply_patches

    apply_patches()
