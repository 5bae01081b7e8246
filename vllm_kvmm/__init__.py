"""vllm-kvmm: multimodal KV-cache compression (MEDA, LOOK-M, HAE and baselines) inside vLLM."""

__version__ = "0.1.0"
