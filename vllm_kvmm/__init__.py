"""vllm-kvmm: multimodal KV-cache compression (MEDA, LOOK-M, HAE and baselines) inside vLLM."""

__version__ = "0.1.0"


def engine_args(
    policy: str, budget: float | None = None, groups: int | None = None, **config: object
) -> dict:
    """Keyword arguments that turn a KV policy on in ``vllm.LLM``.

    ``LLM(model, **vllm_kvmm.engine_args("meda", budget=0.2))``; extra keywords are policy fields
    (``engine_args("snapkv", 0.3, window=16)``). Validated here, so a typo fails before the engine starts.
    """
    from vllm_kvmm.vllm_ext.settings import KVMMSettings

    settings = KVMMSettings(policy=policy, budget=budget, config=dict(config), groups=groups)
    settings.build_policy()
    return {"additional_config": settings.to_additional_config()}
