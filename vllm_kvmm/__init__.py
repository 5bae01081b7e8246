"""vllm-kvmm: multimodal KV-cache compression (MEDA, LOOK-M, HAE and baselines) inside vLLM."""

__version__ = "0.1.0"


def engine_args(
    policy: str,
    budget: float | None = None,
    groups: int | None = None,
    *,
    reuse: bool = False,
    **config: object,
) -> dict:
    """Keyword arguments that turn a KV policy on in ``vllm.LLM``.

    ``LLM(model, **vllm_kvmm.engine_args("meda", budget=0.2))``; extra keywords are policy fields
    (``engine_args("snapkv", 0.3, window=16)``). Validated here, so a typo fails before the engine starts.
    ``reuse=True``: follow-up requests continue from earlier requests' compressed caches (``--kv-reuse``;
    turns prefix caching on).
    """
    from vllm_kvmm.vllm_ext.settings import KVMMSettings

    settings = KVMMSettings(policy=policy, budget=budget, config=dict(config), groups=groups, reuse=reuse)
    settings.build_policy()
    out: dict = {"additional_config": settings.to_additional_config()}
    if reuse:  # follow-ups find compressed caches through the prefix cache
        out["enable_prefix_caching"] = True
    return out
