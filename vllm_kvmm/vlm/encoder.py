"""The vision tower: a small CLIP-architecture ViT trained by us on the easy-VQA train images.

Geometry: 64×64 images (easy-VQA's native size, so no resampling) in 8×8 patches → an 8×8 grid, i.e.
:data:`TOKENS_PER_IMAGE` = 64 image tokens per image (the CLS token is dropped by LLaVA's ``default``
feature strategy). Hidden 128, 4 layers, 4 heads of 32, GELU, 0.81 M parameters.

It is trained (stage 1 of :mod:`vllm_kvmm.vlm.train`) to give **every patch** a word: a patch the object
overlaps says its colour or its shape, in a checkerboard (``(row + col)`` even: colour, odd: shape, so any
object covering two neighbouring patches shows both), every other patch is background. The information
about the object thus sits in the patch tokens covering it, as in a real VLM, not in all 64 tokens; and the
projector can start out mapping those patches onto the LM's own word embeddings (``" red"``,
``" circle"``, ``" ."``), which the frozen LM reads from the first step (:func:`word_targets`).
A per-image head (object class from the mean patch token) helps learn the shape, which a patch inside
a large shape cannot see locally. The LLaVA model uses the last layer's patch tokens
(``vision_feature_layer = -1``); neither vLLM nor transformers applies CLIP's ``post_layernorm`` to them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from vllm_kvmm.vlm import data

__all__ = [
    "IMAGE_SIZE",
    "PATCH",
    "TOKENS_PER_IMAGE",
    "image_processor",
    "patch_features",
    "patch_targets",
    "pixel_values",
    "train_tower",
    "vision_config",
    "word_targets",
]

IMAGE_SIZE = 64
PATCH = 8
GRID = IMAGE_SIZE // PATCH
TOKENS_PER_IMAGE = GRID * GRID
N_OBJECTS = len(data.COLORS) * len(data.SHAPES)
# Patch words: 0 background, 1..8 the colours, 9..11 the shapes.
WORDS: tuple[str, ...] = (".", *data.COLORS, *data.SHAPES)


def vision_config() -> Any:
    """The tower's ``CLIPVisionConfig`` (a type vLLM 0.26's ``LlavaForConditionalGeneration`` loads)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        projection_dim=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_channels=3,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        initializer_range=0.02,
    )


def image_processor() -> Any:
    """``CLIPImageProcessor`` of the model: 64 px (a no-op resize for easy-VQA images), CLIP mean/std."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True,
        do_center_crop=True,
        do_convert_rgb=True,
    )


def pixel_values(images: Sequence[Any], processor: Any | None = None) -> torch.Tensor:
    """``[B, 3, 64, 64]`` float32 model inputs of PIL images, through the model's own processor."""
    proc = processor if processor is not None else image_processor()
    out = proc(images=list(images), return_tensors="pt")["pixel_values"]
    return out.to(torch.float32)


def patch_targets(split: str, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch training targets of images: ``(cls [B, 64] long, cover [B, 64] float)``.

    ``cls`` is 0 for background, ``1 + 3·colour + shape`` for a patch the object overlaps; ``cover`` is
    the fraction of the patch's pixels drawn in the object's exact colour (row-major patch order).
    """
    cls = torch.zeros(len(ids), TOKENS_PER_IMAGE, dtype=torch.long)
    cover = torch.zeros(len(ids), TOKENS_PER_IMAGE)
    for b, i in enumerate(ids):
        color, shape = data.label(split, i)
        rgb = np.asarray(data.load_image(split, i))
        mask = (rgb == np.array(data._PALETTE[color])).all(-1).astype(np.float32)
        frac = mask.reshape(GRID, PATCH, GRID, PATCH).mean(axis=(1, 3)).reshape(-1)
        obj = 1 + data.COLORS.index(color) * len(data.SHAPES) + data.SHAPES.index(shape)
        cover[b] = torch.from_numpy(frac)
        cls[b] = torch.where(cover[b] > 0, obj, 0)
    return cls, cover


def word_targets(cls: torch.Tensor) -> torch.Tensor:
    """``[B, 64]`` index into :data:`WORDS` of each patch, from object classes ``cls [B, 64]``.

    Background stays 0; an object patch at ``(row, col)`` gets its colour when ``row + col`` is even,
    its shape when odd.
    """
    obj = (cls - 1).clamp(min=0)
    color, shape = obj // len(data.SHAPES), obj % len(data.SHAPES)
    grid = torch.arange(TOKENS_PER_IMAGE)
    even = ((grid // GRID + grid % GRID) % 2 == 0).to(cls.device)
    word = torch.where(even, 1 + color, 1 + len(data.COLORS) + shape)
    return torch.where(cls > 0, word, 0)


@torch.no_grad()
def patch_features(tower: nn.Module, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """``[B, 64, 128]`` last-layer patch tokens (CLS dropped) of ``pixels [B, 3, 64, 64]``.

    Exactly what ``LlavaForConditionalGeneration`` feeds its projector with ``vision_feature_layer=-1``
    and the ``default`` strategy.
    """
    tower.eval()
    dev = next(tower.parameters()).device
    outs = []
    for s in range(0, pixels.shape[0], batch):
        hs = tower(pixel_values=pixels[s : s + batch].to(dev), output_hidden_states=True).hidden_states
        outs.append(hs[-1][:, 1:].float().cpu())
    return torch.cat(outs)


class _TowerWithHeads(nn.Module):
    """CLIP tower plus training heads: per patch (object class, coverage) and per image (object class).

    The per-image head reads the mean of the patch tokens; it speeds up learning the shape, which a patch
    inside a large shape cannot see locally. All heads are dropped after training.
    """

    def __init__(self) -> None:
        super().__init__()
        from transformers import CLIPVisionModel

        self.tower = CLIPVisionModel(vision_config())
        hidden = self.tower.config.hidden_size
        self.cls_head = nn.Linear(hidden, len(WORDS))
        self.cover_head = nn.Linear(hidden, 1)
        self.image_head = nn.Linear(hidden, N_OBJECTS)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``pixels [B, 3, 64, 64]`` → words ``[B, 64, 12]``, coverage ``[B, 64]``, object ``[B, 24]``."""
        feats = self.tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        return self.cls_head(feats), self.cover_head(feats).squeeze(-1), self.image_head(feats.mean(1))


def _hflip(
    px: torch.Tensor, cls: torch.Tensor, cover: torch.Tensor, flip: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Mirror the images (and their patch targets) where ``flip [B]`` is True (triangles stay upright)."""

    def grid(t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, GRID, GRID).flip(-1).reshape(t.shape)

    return (
        torch.where(flip[:, None, None, None], px.flip(-1), px),
        torch.where(flip[:, None], grid(cls), cls),
        torch.where(flip[:, None], grid(cover), cover),
    )


def train_tower(
    *,
    seed: int = 0,
    epochs: int = 20,
    batch: int = 64,
    lr: float = 1e-3,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the CLIP tower on the ``train`` split; return it (CPU, eval mode) and metrics.

    Metrics: per-patch object accuracy on ``val`` (patches an object overlaps, and all patches), training
    seconds. Deterministic on a given device for a given seed.
    """
    torch.manual_seed(seed)
    proc = image_processor()
    splits = {}
    for split in ("train", "val"):
        ids = data.image_ids(split)
        px = pixel_values([data.load_image(split, i) for i in ids], proc)
        splits[split] = (px, *patch_targets(split, ids))
    model = _TowerWithHeads().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    px, cls, cover = splits["train"]
    n = px.shape[0]
    steps = epochs * math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for s in range(0, n, batch):
            idx = perm[s : s + batch]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x, c, cv = (t.to(device) for t in _hflip(px[idx], cls[idx], cover[idx], flip))
            logits, cov, image_logits = model(x)
            image_cls = (cls[idx].max(dim=1).values - 1).to(device)  # the image's one object
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), word_targets(c).flatten())
            loss = loss + 4.0 * nn.functional.mse_loss(cov, cv)
            loss = loss + nn.functional.cross_entropy(image_logits, image_cls)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        log(f"[tower] epoch {epoch + 1}/{epochs} loss {total / n:.4f} ({time.perf_counter() - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    model.eval()
    vpx, vcls, _ = splits["val"]
    with torch.no_grad():
        pred = model(vpx.to(device))[0].argmax(-1).cpu()
    want = word_targets(vcls)
    obj = vcls > 0
    metrics = {
        "seconds": round(seconds, 1),
        "val_patch_acc": round(float((pred == want).float().mean()), 4),
        "val_object_patch_acc": round(float((pred[obj] == want[obj]).float().mean()), 4),
    }
    log(f"[tower] done: {metrics}")
    return model.tower.cpu().eval(), metrics
