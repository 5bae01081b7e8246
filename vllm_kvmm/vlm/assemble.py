"""Assemble the VLM's Hugging Face folder from the artifacts in the repository and SmolLM2.

:func:`ensure_vlm` writes (once, atomically) a ``LlavaForConditionalGeneration`` folder:

* ``vision_tower``: the CLIP ViT of ``artifacts/tower.safetensors`` (saved under the llava-hf key layout
  ``vision_tower.vision_model.*`` that vLLM 0.26 expects);
* ``multi_modal_projector``: ``artifacts/projector.safetensors``;
* ``language_model``: SmolLM2-135M-Instruct (:func:`~vllm_kvmm.models.smollm2.ensure_smollm2`) with the
  LoRA adapters of ``artifacts/lora.safetensors`` merged into its weights, and one embedding row added for
  the ``<image>`` token (zeros; its embedding is always replaced by image features). The output head is
  saved untied (a copy of the embedding), which both transformers and vLLM load without tying rules.

The artifacts are checked against ``artifacts/SHA256SUMS`` first. The folder loads in transformers
(``AutoModelForImageTextToText`` + ``AutoProcessor``) and natively in vLLM 0.26 (no plugin needed).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from vllm_kvmm.models.folders import write_folder_atomically
from vllm_kvmm.models.smollm2 import default_home, ensure_smollm2, load_smollm2_tokenizer
from vllm_kvmm.models.tiny import chat_template
from vllm_kvmm.vlm.encoder import PATCH, TOKENS_PER_IMAGE, image_processor, vision_config

__all__ = [
    "ARTIFACTS",
    "ARTIFACT_FILES",
    "IMAGE_TOKEN",
    "VLM_NAME",
    "build_tokenizer",
    "default_vlm_dir",
    "ensure_vlm",
    "verify_artifacts",
]

VLM_NAME = "llava-smollm2-easyvqa"
ARTIFACTS = Path(__file__).parent / "artifacts"
ARTIFACT_FILES: tuple[str, ...] = ("tower.safetensors", "projector.safetensors", "lora.safetensors")
IMAGE_TOKEN = "<image>"


def default_vlm_dir() -> Path:
    return default_home() / "models" / VLM_NAME


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_sums(folder: Path = ARTIFACTS) -> dict[str, str]:
    """``{file name: sha256}`` from ``SHA256SUMS`` (``sha256sum`` format)."""
    sums = {}
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*")] = digest
    return sums


def write_sums(folder: Path = ARTIFACTS) -> None:
    lines = [f"{sha256(folder / n)}  {n}\n" for n in ARTIFACT_FILES]
    (folder / "SHA256SUMS").write_text("".join(lines))


def verify_artifacts(folder: Path = ARTIFACTS) -> str:
    """Raise unless every artifact matches ``SHA256SUMS``; return a digest of the sums (the model version)."""
    sums = read_sums(folder)
    for name in ARTIFACT_FILES:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"missing VLM artifact {path}: run `python -m vllm_kvmm.vlm.train`")
        if sha256(path) != sums.get(name):
            raise RuntimeError(f"checksum mismatch for {path} (see {folder / 'SHA256SUMS'})")
    return hashlib.sha256((folder / "SHA256SUMS").read_bytes()).hexdigest()[:16]


def build_tokenizer(base: Any | None = None) -> Any:
    """SmolLM2's tokenizer plus the ``<image>`` token (id 49152) and the project's ChatML template."""
    tok = copy.deepcopy(base) if base is not None else load_smollm2_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = chat_template(IMAGE_TOKEN + "\n")
    return tok


def build_processor(tok: Any) -> Any:
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor(),
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=tok.chat_template,
        image_token=IMAGE_TOKEN,
    )


def llava_config(tok: Any, text_config: Any) -> Any:
    from transformers import LlavaConfig

    text = copy.deepcopy(text_config)
    text.vocab_size = len(tok)
    text.tie_word_embeddings = False
    return LlavaConfig(
        vision_config=vision_config(),
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=TOKENS_PER_IMAGE,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )


def _load(name: str, folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(folder / name, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def llava_state_dict(smollm2_dir: Path, artifacts: Path = ARTIFACTS) -> dict[str, torch.Tensor]:
    """The full ``LlavaForConditionalGeneration`` state dict (transformers 5 key names), float32."""
    from safetensors.torch import load_file

    from vllm_kvmm.vlm.model import merge_lora

    lm = {}
    for shard in sorted(Path(smollm2_dir).glob("*.safetensors")):
        lm.update(load_file(shard))
    lora, meta = _load("lora.safetensors", artifacts)
    merge_lora(lm, lora, float(meta["alpha"]) / float(meta["rank"]))
    emb = lm["model.embed_tokens.weight"]
    emb = torch.cat([emb, torch.zeros(1, emb.shape[1], dtype=emb.dtype)])
    out: dict[str, torch.Tensor] = {}
    for k, v in lm.items():
        if k.startswith("model."):
            out["model.language_model." + k[len("model.") :]] = v
    out["model.language_model.embed_tokens.weight"] = emb
    out["lm_head.weight"] = emb.clone()
    tower, _ = _load("tower.safetensors", artifacts)
    for k, v in tower.items():  # CLIPVisionModel keys: vision_model.*
        out["model.vision_tower." + k] = v
    proj, _ = _load("projector.safetensors", artifacts)
    for k, v in proj.items():
        out["model.multi_modal_projector." + k] = v
    return {k: v.to(torch.float32).contiguous() for k, v in out.items()}


def ensure_vlm(dest: Path | None = None, *, artifacts: Path = ARTIFACTS) -> Path:
    """Build the VLM folder once (idempotent, atomic); return its path.

    Needs SmolLM2 (converted on first use) and the artifacts (checked against their checksums). A complete
    folder built from other artifacts (an older training) is rebuilt.
    """
    from vllm_kvmm.models.folders import MARKER, is_complete

    dest = Path(dest) if dest is not None else default_vlm_dir()
    version = verify_artifacts(artifacts)
    if is_complete(dest):
        stamp = dest / "vllm_kvmm_vlm.json"
        if stamp.is_file() and json.loads(stamp.read_text()).get("artifacts") == version:
            return dest
        (dest / MARKER).unlink()  # stale: write_folder_atomically replaces an incomplete folder
    smol = ensure_smollm2()

    def write(tmp: Path) -> None:
        from transformers import AutoConfig, LlavaForConditionalGeneration

        from vllm_kvmm.models.tiny import _legacy_clip_keys

        tok = build_tokenizer(load_smollm2_tokenizer(smol))
        config = llava_config(tok, AutoConfig.from_pretrained(smol))
        torch.manual_seed(0)  # every weight is overwritten below; the seed only pins the throw-away init
        model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
        model.load_state_dict(llava_state_dict(smol, artifacts), strict=True)
        for attr in ("eos_token_id", "pad_token_id", "bos_token_id"):
            setattr(model.generation_config, attr, getattr(tok, attr))
        model.generation_config.do_sample = False
        model.save_pretrained(tmp)
        _legacy_clip_keys(tmp)
        build_processor(tok).save_pretrained(tmp)
        (tmp / "vllm_kvmm_vlm.json").write_text(json.dumps({"artifacts": version}, indent=1) + "\n")

    return write_folder_atomically(dest, write, f"assembled by vllm_kvmm.vlm.assemble (artifacts {version})")
