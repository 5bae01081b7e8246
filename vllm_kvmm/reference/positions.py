"""RoPE positions of prompt and generated tokens (1-D RoPE, or Qwen2-VL's 3-D M-RoPE).

Compression never changes positions: the generated token ``t`` of a prompt of ``N`` tokens sits at text
position ``N + t`` whatever the compacted cache length (ALGORITHMS.md §8.4). With M-RoPE all three
components of a text token are ``text position + rope_delta`` of its prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_kvmm.reference.prompts import PromptInput

__all__ = ["RopePositions"]


class RopePositions:
    """Position ids for a batch of prompts, in the layout the model's ``forward`` takes.

    ``model``: a Hugging Face model; M-RoPE is used when its base model has ``get_rope_index``.
    """

    def __init__(self, model: torch.nn.Module, prompts: Sequence[PromptInput]) -> None:
        base = model.base_model
        self.mrope = hasattr(base, "get_rope_index")
        self.device = next(model.parameters()).device
        self.lengths = [p.num_tokens for p in prompts]
        self._prefill: list[torch.Tensor] = []  # per prompt: [3, N] or [N]
        deltas = []
        for p in prompts:
            if self.mrope:
                pos, delta = self._mrope_index(base, p)
                self._prefill.append(pos)
                deltas.append(delta)
            else:
                self._prefill.append(torch.arange(p.num_tokens))
                deltas.append(0)
        self.deltas = torch.tensor(deltas, dtype=torch.long)

    @staticmethod
    def _mrope_index(base: torch.nn.Module, p: PromptInput) -> tuple[torch.Tensor, int]:
        tt = p.mm_token_type_ids
        if tt is None:
            tt = torch.zeros_like(p.input_ids)
        # second_per_grid_ts: Qwen2.5-VL's temporal position step of each video (absent for images).
        keys = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
        grids = {k: p.mm_inputs[k] for k in keys if k in p.mm_inputs}
        # Each prompt alone, so a sample's positions never depend on its batch.
        pos, delta = base.get_rope_index(p.input_ids[None], mm_token_type_ids=tt[None], **grids)
        return pos[:, 0].cpu(), int(delta.flatten()[0])

    def prefill(self, n_max: int) -> torch.Tensor:
        """``[B, n_max]`` (or ``[3, B, n_max]``); pad slots continue the text positions (never attended)."""
        rows = []
        for pos, n in zip(self._prefill, self.lengths, strict=True):
            start = int(pos.max()) + 1
            pad = torch.arange(start, start + n_max - n)
            if self.mrope:
                pad = pad[None].expand(3, -1)
            rows.append(torch.cat([pos, pad], dim=-1))
        out = torch.stack(rows, dim=-2)
        return out.to(self.device)

    def text(self, text_pos: torch.Tensor) -> torch.Tensor:
        """Positions of new tokens at text positions ``text_pos`` ``[B, n]`` → ``[B, n]`` or ``[3, B, n]``."""
        if not self.mrope:
            return text_pos.to(self.device)
        pos = text_pos + self.deltas[:, None]
        return pos[None].expand(3, -1, -1).to(self.device)

    def after_prompt(self, offsets: torch.Tensor | int, n: int = 1) -> torch.Tensor:
        """Positions of ``n`` new tokens starting ``offsets`` (``[B]`` or int) tokens after each prompt."""
        lengths = torch.tensor(self.lengths, dtype=torch.long)
        start = lengths + torch.as_tensor(offsets, dtype=torch.long)
        return self.text(start[:, None] + torch.arange(n)[None])
