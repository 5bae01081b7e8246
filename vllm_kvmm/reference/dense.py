"""The dense oracle: a Hugging Face model run with a :class:`KVPolicy` on a dense, per-layer cache.

Flow of :meth:`DenseReference.generate` for a batch (the same order vLLM uses):

1. prefill the right-padded batch; each sample attends only to its own tokens, and its statistics are
   collected exactly as if it ran alone;
2. per sample: ``policy.stats_request`` → :func:`plan_compression` → :func:`apply_plan` per layer; the
   compacted caches are padded per layer to the batch's largest kept count, with per-(sample, layer)
   valid lengths (layers keep different counts under MEDA or PyramidKV);
3. greedy decoding at true positions; the first token comes from the prefill logits.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_kvmm.ops import LayerStats, StatsAccumulator, StatsRequest
from vllm_kvmm.policies.base import KVPolicy, LayerPlan, PromptInfo, apply_plan, plan_compression
from vllm_kvmm.reference.attention import DenseKVRun, SlidingLayers, activate
from vllm_kvmm.reference.positions import RopePositions
from vllm_kvmm.reference.prompts import PromptInput

__all__ = ["DenseReference", "ReferenceOutput"]


@dataclass
class ReferenceOutput:
    """Result for one prompt.

    ``plans``: one :class:`LayerPlan` per layer (kept positions per KV head). ``kept_tokens``: kept count per
    layer. ``kv_bytes_*``: prompt K+V bytes over all layers and KV heads in the cache dtype.
    ``logits``: ``[T, V]`` float32 logits that chose each generated token (if asked).
    ``flush_positions``: decode-time eviction only — per flush, per layer, ``[H_kv, K]`` true positions kept;
    ``flush_bins``: likewise the positions waiting in HAE's recycle bin.
    """

    token_ids: list[int]
    plans: list[LayerPlan]
    kept_tokens: list[int]
    num_prompt_tokens: int
    kv_bytes_kept: int
    kv_bytes_full: int
    stats: list[LayerStats | None] | None = None
    logits: torch.Tensor | None = None
    flush_positions: list[list[torch.Tensor]] = field(default_factory=list)
    flush_bins: list[list[torch.Tensor]] = field(default_factory=list)

    @property
    def kv_fraction(self) -> float:
        """Measured fraction of the prompt KV cache kept."""
        return self.kv_bytes_kept / self.kv_bytes_full


def union_request(requests: Sequence[StatsRequest]) -> StatsRequest:
    """One request that collects everything each of ``requests`` asks for (one window size at most)."""
    windows = {r.window for r in requests if r.window}
    if len(windows) > 1:
        raise ValueError(f"policies asking for different observation windows {sorted(windows)}")
    steps = {r.entropy_step for r in requests if r.entropy or r.cross_entropy}
    if len(steps) > 1:
        raise ValueError(f"policies asking for entropies from different row samples {sorted(steps)}")
    colsum_steps = {r.colsum_step for r in requests if r.colsum}
    if len(colsum_steps) > 1:
        raise ValueError(f"policies asking for column sums from different row samples {sorted(colsum_steps)}")
    layers = None
    if all(r.layers is not None for r in requests if not r.empty):
        layers = tuple(sorted({x for r in requests if not r.empty for x in r.layers or ()}))
    return StatsRequest(
        colsum=any(r.colsum for r in requests),
        window=windows.pop() if windows else 0,
        entropy=any(r.entropy for r in requests),
        cross_entropy=any(r.cross_entropy for r in requests),
        t2v=any(r.t2v for r in requests),
        layers=layers,
        entropy_step=steps.pop() if steps else 1,
        colsum_step=colsum_steps.pop() if colsum_steps else 1,
    )


class _Observed(DenseKVRun):
    """A one-prompt run that also feeds ``extra`` statistics requests at prefill (:meth:`collect_stats`)."""

    def __init__(self, *args: Any, extra: Sequence[StatsRequest], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.extra = list(extra)
        self.extra_stats: list[list[LayerStats | None]] = [[None] * self.num_layers for _ in self.extra]
        self.seconds = [0.0] * len(self.extra)

    def _prefill(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        out = super()._prefill(layer, q, k, v, scale)
        n, vision = int(self.lengths[0]), self.vision_masks[0]
        for i, req in enumerate(self.extra):
            if not req.wants_layer(layer):
                continue
            t0 = time.perf_counter()
            acc = StatsAccumulator(req, n, q.shape[1], k.shape[1], vision, scale, chunk=self.stats_chunk)
            acc.update(q[0, :, :n].transpose(0, 1), k[0, :, :n].transpose(0, 1), 0)
            self.extra_stats[i][layer] = acc.result()
            self.seconds[i] += time.perf_counter() - t0
        return out


def _sharing(requests: Sequence[StatsRequest]) -> list[list[int]]:
    """Indices of ``requests`` in groups whose statistics one prefill can collect (first fit, in order)."""
    groups: list[list[int]] = []
    for i, r in enumerate(requests):
        for g in groups:
            try:
                union_request([*(requests[j] for j in g), r])
            except ValueError:
                continue
            g.append(i)
            break
        else:
            groups.append([i])
    return groups


def restrict(stats: LayerStats, request: StatsRequest) -> LayerStats:
    """``stats`` with only the fields ``request`` asks for (what collecting it alone would give)."""
    return LayerStats(
        colsum=stats.colsum if request.colsum else None,
        window=stats.window if request.window else None,
        entropy=stats.entropy if request.entropy else None,
        entropy_tv=stats.entropy_tv if request.cross_entropy else None,
        entropy_vt=stats.entropy_vt if request.cross_entropy else None,
        t2v_sum=stats.t2v_sum if request.t2v else None,
        t2v_max=stats.t2v_max if request.t2v else None,
    )


@dataclass(frozen=True)
class _Collected:
    """Finished statistics in the accumulator interface :meth:`DenseReference._compress` reads."""

    stats: LayerStats
    done: bool = True

    def result(self) -> LayerStats:
        return self.stats


def _cat_padded(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``parts`` concatenated along dim 0, each zero-padded at the end of every other dim to the largest.

    Tiling processors (LLaVA-NeXT, LLaVA-OneVision) give ``pixel_values`` ``[images, tiles, C, H, W]`` with
    ``tiles`` padded to the prompt's largest tile count; prompts of a batch differ in it. The processor pads
    the same way within a prompt, and the model reads each image's true tile count from ``image_sizes``,
    so the padding is never read.
    """
    shape = [max(t.shape[d] for t in parts) for d in range(1, parts[0].ndim)]
    padded = []
    for t in parts:
        widths = [w for d in reversed(range(1, t.ndim)) for w in (0, shape[d - 1] - t.shape[d])]
        padded.append(torch.nn.functional.pad(t, widths) if any(widths) else t)
    return torch.cat(padded, 0)


def _load(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=dtype)


def _split_layers(
    decoder: torch.nn.Module, cfg: Any
) -> tuple[list[torch.nn.Module], list[tuple[torch.nn.Module, int]]]:
    """The decoder's full-attention modules (compressed, in layer order) and its sliding-window modules
    with their windows (left alone, as vLLM's sliding-window spec leaves them), from ``layer_types``."""
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * len(decoder.layers)
    if getattr(cfg, "attn_logit_softcapping", None):
        raise ValueError("the dense reference does not implement attention logit soft-capping (Gemma 2)")
    full, sliding = [], []
    for layer, kind in zip(decoder.layers, types, strict=True):
        if kind == "full_attention":
            full.append(layer.self_attn)
        elif kind == "sliding_attention":
            sliding.append((layer.self_attn, int(cfg.sliding_window)))
        else:
            raise ValueError(f"the dense reference has no {kind!r} layers")
    if not full:
        raise ValueError("no full-attention layer to compress")
    return full, sliding


class DenseReference:
    """Runs a text Llama, LLaVA or Qwen2-VL Hugging Face model with a KV policy (the oracle of vLLM's path).

    Args:
        model: a loaded model or a folder (loaded with ``AutoModelForCausalLM`` or, when the config has a
            vision tower, ``AutoModelForImageTextToText``).
        dtype / device: where and how the model runs; attention is always computed in float32.
        stats_chunk: queries per block of the statistics pass (memory ``O(chunk·N)`` per layer).
    """

    def __init__(
        self,
        model: torch.nn.Module | str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        stats_chunk: int = 256,
    ) -> None:
        if isinstance(model, (str, Path)):
            model = _load(Path(model), dtype)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)
        self.dtype = dtype
        self.stats_chunk = stats_chunk
        decoder = model.get_decoder()
        cfg = model.config.get_text_config()
        self.attn_modules, self.sliding_modules = _split_layers(decoder, cfg)
        self.num_layers = len(self.attn_modules)  # the compressed layers (the policy's layer index)
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # Every config object the text stack reads the attention implementation from.
        modules = [*self.attn_modules, *(m for m, _ in self.sliding_modules)]
        configs = {id(c): c for c in [decoder.config, *(m.config for m in modules)]}
        self._text_configs = list(configs.values())
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = cfg.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        pad = getattr(cfg, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else 0

    # ---- public API ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[PromptInput],
        policy: KVPolicy,
        max_new_tokens: int,
        granularity: int = 1,
        *,
        layer_groups: Sequence[Sequence[int]] | None = None,
        stop_at_eos: bool = False,
        return_logits: bool = False,
        return_stats: bool = False,
        cached: Sequence[int] | None = None,
        shared: Sequence[int] | None = None,
    ) -> list[ReferenceOutput]:
        """Greedy generation of ``max_new_tokens`` per prompt with the cache compressed by ``policy``.

        ``granularity`` / ``layer_groups``: the paged layout of the vLLM path being checked (block size,
        and layers sharing a KV-cache group; see :func:`~vllm_kvmm.policies.plan_compression`).
        With ``stop_at_eos`` a sample's tokens end at its first EOS (included).
        ``cached`` / ``shared``: per prompt, tokens found in vLLM's prefix cache (their queries never run:
        statistics cover the rest) and the shared prefix kept exact (``frozen`` in
        :func:`~vllm_kvmm.policies.plan_compression` and at every flush); see docs/design.md.
        """
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        prompts = list(prompts)
        infos = [self._info(p) for p in prompts]
        specs = [policy.decode_spec(i) for i in infos]
        run = self._new_run(prompts, policy, infos)
        if cached is not None:
            run.starts = list(cached)
        if shared is not None:
            run.frozen = list(shared)
        pos = RopePositions(self.model, prompts)
        with activate(run, self._text_configs):
            logits = self._prefill(prompts, pos, run)  # [B, V]
            plans, stats = self._compress(run, policy, infos, granularity, layer_groups)
            all_tokens, all_logits = self._decode(
                run, pos, logits, plans, specs, max_new_tokens, granularity, stop_at_eos, return_logits
            )
        return self._outputs(
            run, all_tokens, all_logits, plans, infos, stats if return_stats else None, stop_at_eos
        )

    @torch.inference_mode()
    def generate_followup(
        self,
        prompt: PromptInput,
        extension_ids: Sequence[int] | torch.Tensor,
        policy: KVPolicy,
        max_new_tokens: int,
        granularity: int = 1,
        *,
        layer_groups: Sequence[Sequence[int]] | None = None,
        stop_at_eos: bool = False,
        cached: int = 0,
        shared: int = 0,
    ) -> ReferenceOutput:
        """A follow-up turn under compressed reuse (vllm_ext/reuse.py): greedy tokens after
        ``prompt + extension_ids`` when the cache is ``prompt`` compressed by ``policy`` (as
        :meth:`generate` compresses it) with ``extension_ids`` (the earlier answer, then the new turn)
        appended exact, at their true positions, causal among themselves and never compressed.

        That is the cache a follow-up continuing the first turn's compressed entry reads, at every later
        turn too: the turns after the first are never compressed. ``plans`` are the first turn's.
        """
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        ext = torch.as_tensor(extension_ids, dtype=torch.long).flatten()
        if ext.numel() == 0:
            raise ValueError("extension_ids is empty: a follow-up adds at least one token")
        info = self._info(prompt)
        if policy.decode_spec(info) is not None:
            raise ValueError("compressed reuse is for policies that do not evict while decoding")
        run = self._new_run([prompt], policy, [info])
        run.starts, run.frozen = [cached], [shared]
        pos = RopePositions(self.model, [prompt])
        m = ext.numel()
        with activate(run, self._text_configs):
            self._prefill([prompt], pos, run)
            plans, _ = self._compress(run, policy, [info], granularity, layer_groups)
            logits = self._forward(ext[None].to(self.device), pos.after_prompt(0, m))[:, -1]
            tokens, _ = self._decode(
                run, pos, logits, plans, [None], max_new_tokens, granularity, stop_at_eos, False, offset=m
            )
        return self._outputs(run, tokens, None, plans, [info], None, stop_at_eos)[0]

    @torch.inference_mode()
    def collect_stats(
        self, prompt: PromptInput, requests: Sequence[StatsRequest]
    ) -> tuple[list[list[LayerStats | None]], list[float]]:
        """The statistics of each of ``requests`` from one prefill of ``prompt`` (nothing decoded), and the
        seconds each request's statistics took over all layers (their relative cost on this device).

        Each request has accumulators of its own, fed the same queries and keys: e.g. one statistic at
        several settings, which :meth:`generate_variants` would collect in separate prefills.
        """
        info = self._info(prompt)
        lengths = torch.tensor([prompt.num_tokens])
        run = _Observed(
            self.attn_modules, lengths, [StatsRequest()], [info.vision_mask.to(self.device)],
            self.stats_chunk, self._sliding(lengths), extra=requests,
        )  # fmt: skip
        with activate(run, self._text_configs):
            self._prefill([prompt], RopePositions(self.model, [prompt]), run)
        return run.extra_stats, run.seconds

    @torch.inference_mode()
    def generate_variants(
        self,
        prompt: PromptInput,
        policies: Sequence[KVPolicy],
        max_new_tokens: int,
        granularity: int = 1,
        *,
        stop_at_eos: bool = False,
    ) -> list[ReferenceOutput]:
        """One prompt under each of ``policies``, sharing prefills: ``generate([prompt], p, ...)`` each.

        A prefill collects the union of the policies' statistics (each a sum that does not depend on
        what else is collected) and each policy sees only what it asked for; policies whose statistics
        cannot be collected together (different observation windows or row samples) get a prefill
        of their own. For design sweeps, where a prompt's prefill is most of the cost. Decode-time
        eviction is not supported here.
        """
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        info = self._info(prompt)
        if any(p.decode_spec(info) is not None for p in policies):
            raise ValueError("generate_variants does not run decode-time eviction; use generate")
        requests = [p.stats_request(info) for p in policies]
        outs: dict[int, ReferenceOutput] = {}
        for share in _sharing(requests):
            done = self._variants(
                prompt, info, [policies[i] for i in share], [requests[i] for i in share],
                max_new_tokens, granularity, stop_at_eos,
            )  # fmt: skip
            outs.update(zip(share, done, strict=True))
        return [outs[i] for i in range(len(policies))]

    def _variants(
        self,
        prompt: PromptInput,
        info: PromptInfo,
        policies: Sequence[KVPolicy],
        requests: Sequence[StatsRequest],
        max_new_tokens: int,
        granularity: int,
        stop_at_eos: bool,
    ) -> list[ReferenceOutput]:
        """:meth:`generate_variants` of policies whose statistics one prefill collects."""
        lengths = torch.tensor([prompt.num_tokens])
        run = DenseKVRun(
            self.attn_modules, lengths, [union_request(requests)], [info.vision_mask.to(self.device)],
            self.stats_chunk, self._sliding(lengths),
        )  # fmt: skip
        pos = RopePositions(self.model, [prompt])
        with activate(run, self._text_configs):
            first = self._prefill([prompt], pos, run)
        collected = {layer: acc.result() for layer, acc in run.stats[0].items()}
        outs = []
        for policy, req in zip(policies, requests, strict=True):
            sliding = run.sliding.fork() if run.sliding is not None else None
            fork = DenseKVRun(
                self.attn_modules, run.lengths, [req], run.vision_masks, self.stats_chunk, sliding
            )
            fork.prompt_k, fork.prompt_v = list(run.prompt_k), list(run.prompt_v)
            fork.stats = [
                {i: _Collected(restrict(st, req)) for i, st in collected.items() if req.wants_layer(i)}
            ]
            with activate(fork, self._text_configs):
                plans, _ = self._compress(fork, policy, [info], granularity)
                tokens, _ = self._decode(
                    fork, pos, first, plans, [None], max_new_tokens, granularity, stop_at_eos, False
                )
            outs.extend(self._outputs(fork, tokens, None, plans, [info], None, stop_at_eos))
        return outs

    def _decode(
        self,
        run: DenseKVRun,
        pos: RopePositions,
        logits: torch.Tensor,
        plans: list[list[LayerPlan]],
        specs: Sequence[Any],
        max_new_tokens: int,
        granularity: int,
        stop_at_eos: bool,
        return_logits: bool,
        offset: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Greedy decoding over the compacted cache from the prefill ``logits`` ``[B, V]``.

        ``offset``: tokens already appended after the prompt (a follow-up's extension). Returns ``[B, T]``
        tokens and, if asked, ``[B, T, V]`` logits.
        """
        interval = specs[0].interval if specs[0] is not None else None
        capacity = torch.tensor([[p.num_kept for p in sample] for sample in plans])
        tails = torch.tensor([[p.tail_start for p in sample] for sample in plans])  # updated by each flush
        steps = [logits] if return_logits else []
        tok = logits.argmax(-1)
        tokens = [tok]
        done = torch.zeros(len(plans), dtype=torch.bool)
        for t in range(1, max_new_tokens):
            done |= self._is_eos(tok)
            if stop_at_eos and bool(done.all()):
                break
            # Token t-1 (just chosen) sits at text position N_b + t - 1, never at the cache length.
            logits = self._forward(tok[:, None], pos.after_prompt(offset + t - 1))[:, -1]
            run.generated += 1
            if interval is not None and run.generated % interval == 0:
                run.flush(specs, capacity, tails, granularity)
            tok = logits.argmax(-1)
            if return_logits:
                steps.append(logits)
            tokens.append(tok)
        return torch.stack(tokens, 1), (torch.stack(steps, 1) if return_logits else None)

    def _outputs(
        self,
        run: DenseKVRun,
        all_tokens: torch.Tensor,
        all_logits: torch.Tensor | None,
        plans: list[list[LayerPlan]],
        infos: list[PromptInfo],
        stats: list[list[LayerStats | None]] | None,
        stop_at_eos: bool,
    ) -> list[ReferenceOutput]:
        outs = []
        for b in range(all_tokens.shape[0]):
            ids = all_tokens[b].tolist()
            if stop_at_eos:
                end = next((i + 1 for i, x in enumerate(ids) if x in self.eos_token_ids), len(ids))
                ids = ids[:end]
            outs.append(
                self._output(
                    ids,
                    plans[b],
                    infos[b],
                    stats[b] if stats is not None else None,
                    all_logits[b, : len(ids)].float() if all_logits is not None else None,
                )
            )
            outs[-1].flush_positions = [[layers[b] for layers in flush] for flush in run.flush_history]
            outs[-1].flush_bins = [[layers[b] for layers in flush] for flush in run.bin_history]
        return outs

    @torch.inference_mode()
    def continuation_logits(
        self,
        prompt: PromptInput,
        continuation_ids: Sequence[int] | torch.Tensor,
        policy: KVPolicy,
        granularity: int = 1,
    ) -> torch.Tensor:
        """``[M, V]`` float32 logits predicting each of ``continuation_ids`` from the compressed prompt.

        Teacher forcing: the first row comes from the prefill logits; the others from one forward of the
        continuation, causal among itself, at true positions ``N, N+1, ...``, over the compacted cache.
        """
        cont = torch.as_tensor(continuation_ids, dtype=torch.long).flatten()
        if cont.numel() == 0:
            raise ValueError("continuation_ids is empty")
        info = self._info(prompt)
        run = self._new_run([prompt], policy, [info])
        pos = RopePositions(self.model, [prompt])
        with activate(run, self._text_configs):
            first = self._prefill([prompt], pos, run)  # [1, V]
            self._compress(run, policy, [info], granularity)
            logits = [first]
            if cont.numel() > 1:
                rest = self._forward(cont[None, :-1].to(self.device), pos.after_prompt(0, cont.numel() - 1))
                logits.append(rest[0])
        return torch.cat(logits, 0).float().cpu()

    def continuation_logprobs(
        self,
        prompt: PromptInput,
        continuation_ids: Sequence[int] | torch.Tensor,
        policy: KVPolicy,
        granularity: int = 1,
    ) -> torch.Tensor:
        """``[M]`` log-probabilities of ``continuation_ids`` given the compressed prompt (teacher forcing)."""
        cont = torch.as_tensor(continuation_ids, dtype=torch.long).flatten()
        if cont.numel() == 0:
            return torch.zeros(0)
        logp = torch.log_softmax(self.continuation_logits(prompt, cont, policy, granularity), dim=-1)
        return logp.gather(1, cont[:, None])[:, 0]

    # ---- stages --------------------------------------------------------------------------------
    def _info(self, p: PromptInput) -> PromptInfo:
        return PromptInfo(
            p.num_tokens, p.vision_mask.to(torch.bool).cpu(), self.num_layers, self.num_kv_heads
        )

    def _new_run(self, prompts: list[PromptInput], policy: KVPolicy, infos: list[PromptInfo]) -> DenseKVRun:
        lengths = torch.tensor([p.num_tokens for p in prompts], dtype=torch.long)
        requests = [policy.stats_request(i) for i in infos]
        vision = [i.vision_mask.to(self.device) for i in infos]
        return DenseKVRun(
            self.attn_modules, lengths, requests, vision, self.stats_chunk, self._sliding(lengths)
        )

    def _sliding(self, lengths: torch.Tensor) -> SlidingLayers | None:
        if not self.sliding_modules:
            return None
        return SlidingLayers(self.sliding_modules, lengths, self.stats_chunk)

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, **kw: Any) -> torch.Tensor:
        """Logits ``[B, n_kept, V]`` of ``input_ids`` ``[B, n]`` (no HF cache: the run holds it)."""
        out = self.model(
            input_ids=input_ids.to(self.device), position_ids=position_ids, use_cache=False, **kw
        )
        return out.logits

    def _prefill(self, prompts: list[PromptInput], pos: RopePositions, run: DenseKVRun) -> torch.Tensor:
        """Forward the right-padded batch; returns the logits ``[B, V]`` at each prompt's last token."""
        n_max = max(p.num_tokens for p in prompts)
        ids = torch.full((len(prompts), n_max), self.pad_token_id, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, : p.num_tokens] = p.input_ids
        mm: dict[str, torch.Tensor] = {}
        for key in sorted({k for p in prompts for k in p.mm_inputs}):
            parts = [p.mm_inputs[key] for p in prompts if key in p.mm_inputs]
            t = _cat_padded(parts).to(self.device)
            mm[key] = t.to(self.dtype) if t.is_floating_point() else t
        last = run.lengths - 1
        keep, where = torch.unique(last, return_inverse=True)  # lm_head only on the needed positions
        logits = self._forward(ids, pos.prefill(n_max), logits_to_keep=keep.to(self.device), **mm)
        return logits[torch.arange(len(prompts)), where.to(logits.device)]

    def _compress(
        self,
        run: DenseKVRun,
        policy: KVPolicy,
        infos: list[PromptInfo],
        granularity: int,
        layer_groups: Sequence[Sequence[int]] | None = None,
    ) -> tuple[list[list[LayerPlan]], list[list[LayerStats | None]]]:
        """Plan, gather/merge and pad every layer; installs the compacted cache in ``run``."""
        bsz, n_layers = len(infos), self.num_layers
        plans, stats = [], []
        per_layer: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(n_layers)]
        for b, info in enumerate(infos):
            accs = run.stats[b]
            if any(not a.done for a in accs.values()):
                raise RuntimeError("prefill ended with incomplete statistics")
            st = [accs[layer].result() if layer in accs else None for layer in range(n_layers)]
            p = plan_compression(policy, st, info, granularity, layer_groups, frozen=run.frozen[b])
            merge = policy.merge_spec(info)
            n = info.num_tokens
            for layer in range(n_layers):
                k, v = run.prompt_k[layer], run.prompt_v[layer]
                assert k is not None and v is not None
                per_layer[layer].append(apply_plan(p[layer], k[b, :, :n], v[b, :, :n], merge))
            plans.append(p)
            stats.append(st)
        keys, values = [], []
        kept = torch.zeros(bsz, n_layers, dtype=torch.long)
        for layer, kv in enumerate(per_layer):
            k_max = max(k.shape[1] for k, _ in kv)
            k0 = kv[0][0]
            ck = k0.new_zeros(bsz, k0.shape[0], k_max, k0.shape[2])
            cv = torch.zeros_like(ck)
            for b, (k, v) in enumerate(kv):
                ck[b, :, : k.shape[1]] = k
                cv[b, :, : v.shape[1]] = v
                kept[b, layer] = k.shape[1]
            keys.append(ck)
            values.append(cv)
        positions = scores = None
        if any(policy.decode_spec(i) is not None for i in infos):
            # Decode-time eviction starts from the kept tokens' positions and prefill attention (H2O).
            positions, scores = [], []
            for layer in range(n_layers):
                cp = torch.zeros(bsz, self.num_kv_heads, int(kept[:, layer].max()), dtype=torch.long)
                cs = torch.zeros(cp.shape, dtype=torch.float64)
                for b in range(bsz):
                    keep = plans[b][layer].keep
                    cp[b, :, : keep.shape[1]] = keep
                    col = stats[b][layer].colsum if stats[b][layer] is not None else None
                    if col is not None:
                        cs[b, :, : keep.shape[1]] = torch.gather(col.double().cpu(), 1, keep)
                positions.append(cp)
                scores.append(cs)
        run.set_cache(keys, values, kept, positions, scores)
        return plans, stats

    # ---- helpers -------------------------------------------------------------------------------
    def _is_eos(self, tok: torch.Tensor) -> torch.Tensor:
        return torch.tensor([int(t) in self.eos_token_ids for t in tok], dtype=torch.bool)

    def _output(
        self,
        ids: list[int],
        plans: list[LayerPlan],
        info: PromptInfo,
        stats: list[LayerStats | None] | None,
        logits: torch.Tensor | None,
    ) -> ReferenceOutput:
        kept = [p.num_kept for p in plans]
        per_token = 2 * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8
        return ReferenceOutput(
            token_ids=ids,
            plans=plans,
            kept_tokens=kept,
            num_prompt_tokens=info.num_tokens,
            kv_bytes_kept=sum(kept) * per_token,
            kv_bytes_full=self.num_layers * info.num_tokens * per_token,
            stats=stats,
            logits=logits.cpu() if logits is not None else None,
        )
