"""Training-time form of the VLM: cached tower features → projector → SmolLM2 with LoRA adapters.

The assembled checkpoint (:mod:`vllm_kvmm.vlm.assemble`) computes exactly the same function, with the
adapters merged into the SmolLM2 weights; ``tests/unit/test_vlm.py`` checks the logits agree.

**Packing.** A training context (``N`` images, ``K`` questions) would be ``K`` prompts sharing a long
prefix (the images). :func:`pack` lays them out once: the shared prefix, then the ``K`` question blocks,
each block attending to the prefix and causally to itself only, with position ids continuing the prefix.
Each block's logits are then exactly those of its own prompt, and the images are encoded by the LM once
for ``K`` questions: the CPU cost of a 16-image example drops ~10×.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vllm_kvmm.vlm import data
from vllm_kvmm.vlm.encoder import TOKENS_PER_IMAGE

__all__ = [
    "LORA_TARGETS",
    "LoRALinear",
    "Packed",
    "Projector",
    "VLMTrainModel",
    "add_lora",
    "lora_state",
    "merge_lora",
    "pack",
]

LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Projector(nn.Module):
    """LLaVA's projector: ``linear_2(gelu(linear_1(x)))``, ``[..., 128] → [..., 576]``."""

    def __init__(self, vision_hidden: int, text_hidden: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_hidden, text_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LoRALinear(nn.Module):
    """``base(x) + scale · (x Aᵀ) Bᵀ`` with ``A [r, in]`` (Kaiming-uniform) and ``B [out, r]`` (zeros)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((x @ self.lora_A.t()) @ self.lora_B.t())


def add_lora(lm: nn.Module, rank: int, alpha: float, targets: Iterable[str] = LORA_TARGETS) -> list[str]:
    """Wrap every ``nn.Linear`` of ``lm.model.layers`` named in ``targets``; return their qualified names."""
    names = []
    targets = tuple(targets)
    for name, module in list(lm.model.layers.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                names.append(f"model.layers.{name}.{child_name}")
    return names


def lora_state(lm: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.lora_A": [r, in], "<module>.lora_B": [out, r]}`` of every adapter (detached, CPU)."""
    out = {}
    for name, m in lm.named_modules():
        if isinstance(m, LoRALinear):
            out[f"{name}.lora_A"] = m.lora_A.detach().cpu().contiguous()
            out[f"{name}.lora_B"] = m.lora_B.detach().cpu().contiguous()
    return out


def merge_lora(
    weights: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], scale: float, prefix: str = ""
) -> None:
    """In place: ``weights[prefix + m + ".weight"] += scale · B @ A`` for every adapter ``m`` in ``lora``.

    Computed in float64 and rounded once to the weight's dtype, so the merge does not depend on BLAS.
    """
    for key in lora:
        if not key.endswith(".lora_A"):
            continue
        m = key[: -len(".lora_A")]
        a, b = lora[f"{m}.lora_A"].double(), lora[f"{m}.lora_B"].double()
        w = weights[f"{prefix}{m}.weight"]
        weights[f"{prefix}{m}.weight"] = (w.double() + scale * (b @ a)).to(w.dtype)


@dataclass(frozen=True)
class Packed:
    """A context's shared prefix and question blocks as one sequence of ``L`` tokens.

    ``input_ids [L]`` (image positions hold the image token id), ``position_ids [L]``, ``mask [L, L]``
    bool (True: may attend), ``image_positions [n·T]`` (prompt order, ``T`` tokens per image),
    ``label_positions [M]`` / ``label_targets [M]``: the positions whose next token is scored and that token
    (each block's answer tokens and its ``<|im_end|>``), ``label_block [M]``: the block of each label.
    ``image_keep [n·T]`` bool or None: which image tokens are present (training-time token dropping;
    None: all). Position ids always stay those of the full prompt.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    mask: torch.Tensor
    image_positions: torch.Tensor
    label_positions: torch.Tensor
    label_targets: torch.Tensor
    label_block: torch.Tensor
    n_blocks: int
    image_keep: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def prompt_ids(tokenizer: Any, n_images: int, question: str, image_token_id: int) -> list[int]:
    """Token ids of a prompt as the LLaVA processor makes them: each ``<image>`` repeated ``T`` times."""
    text = tokenizer.apply_chat_template(
        data.messages(n_images, question), add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    out: list[int] = []
    for t in ids:
        out.extend([t] * TOKENS_PER_IMAGE if t == image_token_id else [t])
    return out


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """The tokens greedy decoding must produce: the answer, then ``<|im_end|>``."""
    return [*tokenizer(answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def pack(
    tokenizer: Any, context: data.Context, image_token_id: int, image_keep: torch.Tensor | None = None
) -> Packed:
    """Lay a context's ``K`` prompts out as one sequence (see the module docstring).

    ``image_keep [n, T]`` bool (training only): drop the other image tokens from the sequence, keeping
    the position ids of the full prompt, so the model sees the kept tokens exactly where they would be.
    """
    n = context.n_images
    prompts = [prompt_ids(tokenizer, n, q.text, image_token_id) for q in context.questions]
    answers = [answer_ids(tokenizer, q.answer) for q in context.questions]
    # The longest common prefix, leaving at least one token per block (it predicts the first answer token).
    c = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        c = min(c, next((i for i, (x, y) in enumerate(zip(prompts[0], p, strict=False)) if x != y), c))
    prefix = prompts[0][:c]
    if prefix.count(image_token_id) != n * TOKENS_PER_IMAGE:
        raise ValueError("every image must lie in the shared prefix")
    ids, pos = list(prefix), list(range(c))
    spans, lab_pos, lab_tgt, lab_blk = [], [], [], []
    for b, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        block = p[c:] + a[:-1]  # the last answer token (<|im_end|>) is predicted, never fed
        start = len(ids)
        spans.append((start, len(block)))
        ids += block
        pos += range(c, c + len(block))
        first = start + len(p) - c - 1
        lab_pos += range(first, first + len(a))
        lab_tgt += a
        lab_blk += [b] * len(a)
    total = len(ids)
    mask = torch.zeros(total, total, dtype=torch.bool)
    mask[:c, :c] = torch.ones(c, c, dtype=torch.bool).tril()
    for start, length in spans:
        mask[start : start + length, :c] = True
        mask[start : start + length, start : start + length] = torch.ones(
            length, length, dtype=torch.bool
        ).tril()
    ids_t = torch.tensor(ids, dtype=torch.long)
    pos_t = torch.tensor(pos, dtype=torch.long)
    lab_t = torch.tensor(lab_pos, dtype=torch.long)
    keep_flat = None
    if image_keep is not None:
        keep_flat = image_keep.reshape(-1).bool()
        present = torch.ones(total, dtype=torch.bool)
        present[(ids_t == image_token_id).nonzero().squeeze(1)] = keep_flat
        new_index = present.long().cumsum(0) - 1
        ids_t, pos_t, mask = ids_t[present], pos_t[present], mask[present][:, present]
        lab_t = new_index[lab_t]
    return Packed(
        input_ids=ids_t,
        position_ids=pos_t,
        mask=mask,
        image_positions=(ids_t == image_token_id).nonzero().squeeze(1),
        label_positions=lab_t,
        label_targets=torch.tensor(lab_tgt, dtype=torch.long),
        label_block=torch.tensor(lab_blk, dtype=torch.long),
        n_blocks=len(prompts),
        image_keep=keep_flat,
    )


class VLMTrainModel(nn.Module):
    """Projector + SmolLM2 (frozen, with LoRA adapters) over precomputed tower features."""

    def __init__(self, lm: nn.Module, vision_hidden: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.lm = lm
        for p in self.lm.parameters():
            p.requires_grad_(False)
        self.lora_names = add_lora(lm, rank, alpha)
        self.lora_scale = alpha / rank
        text_hidden = lm.config.hidden_size
        self.projector = Projector(vision_hidden, text_hidden)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, packed: Packed, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[M, vocab]`` at the label positions; ``features [n, T, 128]`` of the context's images."""
        dev = features.device
        vocab = self.lm.get_input_embeddings().weight.shape[0]
        ids = packed.input_ids.to(dev)
        emb = self.lm.get_input_embeddings()(ids.clamp(max=vocab - 1))
        img = self.projector(features).reshape(-1, emb.shape[-1])
        if packed.image_keep is not None:
            img = img[packed.image_keep.to(dev)]
        emb = emb.index_put((packed.image_positions.to(dev),), img.to(emb.dtype))
        hidden = self.lm.model(
            inputs_embeds=emb[None],
            attention_mask=packed.mask.to(dev)[None, None],
            position_ids=packed.position_ids.to(dev)[None],
            use_cache=False,
        ).last_hidden_state[0]
        return self.lm.lm_head(hidden[packed.label_positions.to(dev)])


def block_correct(packed: Packed, logits: torch.Tensor) -> torch.Tensor:
    """``[K]`` bool: a block is right when every scored token is the argmax (= greedy exact match)."""
    hit = (logits.argmax(-1).cpu() == packed.label_targets).long()
    wrong = torch.zeros(packed.n_blocks, dtype=torch.long).index_add_(0, packed.label_block, 1 - hit)
    return wrong == 0


def features_for(
    context: data.Context, bank: dict[str, torch.Tensor], index: dict[str, dict[int, int]]
) -> torch.Tensor:
    """``[n, T, 128]`` cached tower features of a context's images, in prompt order."""
    rows = [index[context.split][i] for i in context.image_ids]
    return bank[context.split][rows]


def contexts_tokens(packs: Sequence[Packed]) -> int:
    return sum(p.num_tokens for p in packs)
