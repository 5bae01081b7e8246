"""Prompts for the dense reference: token ids, a processor-derived vision mask, multimodal tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["PromptInput", "prompt_from_messages", "prompt_from_text", "vision_token_ids"]

# Processor outputs that are per prompt token, not per image: never concatenated across a batch.
_TOKEN_KEYS = frozenset({"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"})


@dataclass(frozen=True)
class PromptInput:
    """One prompt of ``N`` tokens.

    ``input_ids``: ``[N]`` long. ``vision_mask``: ``[N]`` bool, ``True`` at image/video placeholder tokens.
    ``mm_inputs``: the processor's multimodal model kwargs (``pixel_values``, ``image_grid_thw``, ...); a
    batch concatenates each along dim 0 in prompt order, the order in which the model scatters features.
    ``mm_token_type_ids``: ``[N]`` (0 text, 1 image, 2 video) where the processor gives it (Qwen2-VL).
    """

    input_ids: torch.Tensor
    vision_mask: torch.Tensor
    mm_inputs: Mapping[str, torch.Tensor] = field(default_factory=dict)
    mm_token_type_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 1 or self.vision_mask.shape != self.input_ids.shape:
            raise ValueError(
                f"input_ids {tuple(self.input_ids.shape)} and vision_mask {tuple(self.vision_mask.shape)}"
                " must both be [N]"
            )
        if self.input_ids.numel() == 0:
            raise ValueError("empty prompt")

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def from_ids(cls, ids: Sequence[int] | torch.Tensor) -> PromptInput:
        """A text-only prompt."""
        t = torch.as_tensor(ids, dtype=torch.long).flatten()
        return cls(t, torch.zeros_like(t, dtype=torch.bool))


def _tokenizer(tok_or_proc: Any) -> Any:
    return getattr(tok_or_proc, "tokenizer", tok_or_proc)


def vision_token_ids(processor: Any) -> list[int]:
    """Ids of the image/video placeholder tokens a processor expands (empty for a plain tokenizer)."""
    ids = []
    for attr in ("image_token_id", "video_token_id"):
        v = getattr(processor, attr, None)
        if isinstance(v, int):
            ids.append(v)
    return ids


def _vision_mask(processor: Any, out: Mapping[str, torch.Tensor]) -> torch.Tensor:
    ids = out["input_ids"][0]
    mask = torch.isin(ids, torch.tensor(vision_token_ids(processor), dtype=ids.dtype))
    if "mm_token_type_ids" in out:
        by_type = out["mm_token_type_ids"][0] != 0
        if not torch.equal(by_type, mask):
            raise ValueError(
                "mm_token_type_ids and the image/video token ids disagree on the vision positions"
            )
    return mask


def prompt_from_text(tokenizer_or_processor: Any, text: str, chat: bool = True) -> PromptInput:
    """A text-only prompt; with ``chat`` it is one user turn in the chat template, ready for the answer."""
    tok = _tokenizer(tokenizer_or_processor)
    if chat:
        text = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        # The template already writes every special token the model expects.
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    else:
        ids = tok(text, return_tensors="pt")["input_ids"][0]
    return PromptInput.from_ids(ids)


def prompt_from_messages(
    processor: Any, messages: list[dict[str, Any]], images: Sequence[Any] = (), videos: Sequence[Any] = ()
) -> PromptInput:
    """A chat prompt through a multimodal processor; ``images`` fill the ``{"type": "image"}`` items in order,
    ``videos`` the ``{"type": "video"}`` items, each as vLLM takes it: ``[T, H, W, 3]`` frames, or
    ``(frames, metadata)`` with ``fps``, ``total_num_frames``, ``frames_indices`` and ``duration`` (Qwen3-VL
    writes each temporal patch's timestamp into the prompt from them).

    The vision mask marks the processor's expanded image and video placeholder tokens (never a hard-coded
    count): video tokens are vision tokens for every modality-aware policy.
    """
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    media: dict[str, Any] = {"images": list(images) or None}
    if videos:  # processors without video support take no ``videos`` argument at all
        pairs = [v if isinstance(v, tuple) else (v, None) for v in videos]
        media["videos"] = [frames for frames, _ in pairs]
        if any(meta is not None for _, meta in pairs):
            media["video_metadata"] = [meta for _, meta in pairs]
    out = processor(text=[text], **media, return_tensors="pt")
    mm = {k: v for k, v in out.items() if k not in _TOKEN_KEYS and isinstance(v, torch.Tensor)}
    tt = out.get("mm_token_type_ids")
    return PromptInput(
        input_ids=out["input_ids"][0].long(),
        vision_mask=_vision_mask(processor, out),
        mm_inputs=mm,
        mm_token_type_ids=tt[0] if tt is not None else None,
    )
