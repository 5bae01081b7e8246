"""Multi-turn multimodal conversations: prefix caching with a compressing policy, on the embedded VLM.

A conversation shows the model ``N`` held-out images (:mod:`vllm_kvmm.vlm.data`, ``test`` split only) and
asks ``T`` questions about them, one per turn: turn 1 is the images and question 1 (the chat template of
the quality benchmark), turn ``k + 1`` is the whole turn-``k`` prompt, the model's own greedy answer of
turn ``k`` as an assistant message, and question ``k + 1`` (a real chat continuation through the
processor's chat template). Questions alternate needle ("Which image shows a red circle?") and lookup
("What color is the shape in image 7?"), the tasks the model answers well as single turns
(docs/benchmarks.md: 100 % and 94 % with the full cache on 16 validation images).

Configurations, each in its own process (one engine per process, started fresh; ``--one-process`` runs
them one after another in a single child, vanilla first: a vanilla engine must never follow a compressing
one in a process):

* ``vanilla+pc``: vanilla vLLM with prefix caching: turn ``k + 1`` finds turn ``k``'s prompt and answer in
  the cache;
* ``ours-recompute``: a compressing engine (policy ``P`` at ρ), prefix caching off: every turn prefills and
  compresses the whole conversation again (what a compressing server did before prefix caching worked);
* ``ours-shared``: the same policy and ρ, prefix caching on, every request marking its images as a shared
  prefix (``kv_shared_prefix="images"``): the prompt through the last image token (whole blocks) stays
  exact and is hit from turn 2 on, the text after it is compressed;
* ``ours-reuse``: the same policy and ρ, prefix caching on, every request asking for compressed reuse
  (``kv_reuse``, vllm_ext/reuse.py) and marking nothing: turn 1 compresses images and question like
  ``ours-recompute``, and turn ``k + 1`` continues turn ``k``'s compressed cache (its blocks as they are),
  prefilling only the answer and the new question, never compressed again. The images stay as turn 1's
  question had them selected;
* ``ours-shared-reuse``: both: the images exact (``kv_shared_prefix="images"``) and the later turns
  continuing turn ``k``'s cache (``kv_reuse``), so only the text after the images was compressed, once.

Per turn and configuration: exact-match accuracy with its 95 % Wilson interval, the time to the first
token (each request alone: wall time from ``add_request`` to the end of the first engine step that gave it
a token; on a CPU only ratios against ``vanilla+pc`` of the same run mean anything), and the KV the
request holds right after its prefill, counted from the scheduler's block tables (real, non-null blocks ×
block size × the layers of their KV-cache group), with the part that is the exact shared prefix. Budget ρ
and the policies are fixed in advance (no tuning), so no validation split is used. A ``full``-cache
single-turn reference (each question asked alone over the same images, in the vanilla engine) tells how
much of a later turn's accuracy the chat continuation itself costs.

``vllm-kvmm bench multiturn`` (``python -m vllm_kvmm.bench.multiturn`` takes the same flags).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vllm_kvmm.bench.cases import BLOCK, CPU_KV_CACHE_BYTES
from vllm_kvmm.bench.child import add_child_flag, machine, report, run_child
from vllm_kvmm.vlm import data

__all__ = [
    "CONFIGS",
    "Conversation",
    "MultiTurnRow",
    "TurnRecord",
    "build_parser",
    "conversation_messages",
    "conversations",
    "image_prefix",
    "run",
    "run_multiturn",
    "summarize",
    "table",
]

CONFIGS: tuple[str, ...] = ("vanilla+pc", "ours-recompute", "ours-shared", "ours-reuse", "ours-shared-reuse")
SINGLE = "vanilla single-turn"  # the full cache, each question asked alone (accuracy reference only)
# 16 conversations (64 prompts a configuration, 16 a cell): 24 min on 2 CPU cores (measured 1,448 s with
# the default policies: ~80 s a conversation over the five configurations, ~2 min of engine starts);
# 24 conversations would take ~35 min.
DEFAULT_CONVERSATIONS = 16
DEFAULT_TURNS = 4
DEFAULT_IMAGES = 16
DEFAULT_BUDGET = 0.2
DEFAULT_POLICIES: tuple[str, ...] = ("snapkv", "meda")


# ------------------------------------------------------------------------------------------ prompts


@dataclass(frozen=True)
class Conversation:
    """One conversation: its images (a test-split context) and its questions, one per turn, in order."""

    index: int
    context: data.Context
    questions: tuple[data.Question, ...]


def conversations(count: int, n_images: int, turns: int, seed: int = 0) -> list[Conversation]:
    """``count`` conversations over ``n_images`` distinct held-out objects each, ``turns`` questions each.

    Deterministic for the arguments; the questions alternate needle and lookup (needle first), every needle
    names a different image and every lookup asks about a different image.
    """
    import random

    if turns < 1 or n_images < 2:
        raise ValueError("a conversation needs at least one turn and two images")
    needles, lookups = (turns + 1) // 2, turns // 2
    if needles > n_images or lookups > n_images:
        raise ValueError(f"{turns} turns need more than {n_images} images")
    rng = random.Random(f"vlm-multiturn/{n_images}/{turns}/test/{seed}")
    out = []
    for i in range(count):
        ctx = data.multi_context(rng, "test", n_images, {"needle": needles, "lookup": lookups})
        need = [q for q in ctx.questions if q.task == "needle"]
        look = [q for q in ctx.questions if q.task != "needle"]
        order = [(need if k % 2 == 0 else look)[k // 2] for k in range(turns)]
        out.append(Conversation(i, ctx, tuple(order)))
    return out


def conversation_messages(n_images: int, questions: Sequence[str], answers: Sequence[str]) -> list[dict]:
    """Chat messages of turn ``len(questions)``: the images with question 1, then for every earlier turn the
    model's answer (assistant) and the next question (user). ``answers``: one fewer than ``questions``."""
    if len(answers) != len(questions) - 1:
        raise ValueError("a turn's prompt holds every earlier answer: one answer fewer than questions")
    msgs = data.messages(n_images, questions[0])
    for answer, question in zip(answers, questions[1:], strict=True):
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        msgs.append({"role": "user", "content": [{"type": "text", "text": question}]})
    return msgs


def image_prefix(prompt_token_ids: Sequence[int], image_token_id: int, block: int = BLOCK) -> int:
    """Prompt tokens through the last image token, rounded down to whole blocks: the prefix
    ``kv_shared_prefix="images"`` keeps exact (0 without an image)."""
    ids = list(prompt_token_ids)
    if image_token_id not in ids:
        return 0
    end = len(ids) - ids[::-1].index(image_token_id)
    return end - end % block


def max_model_len(n_images: int, turns: int) -> int:
    """A context that holds every turn's prompt and answer: the images with their labels, ~40 tokens per
    turn of question, answer and chat markup (doubled here), and room for the template; whole 256s."""
    from vllm_kvmm.vlm.encoder import TOKENS_PER_IMAGE

    need = (TOKENS_PER_IMAGE + 8) * n_images + 80 * turns + 128
    return -(-need // 256) * 256


# ------------------------------------------------------------------------------------ measurements


@dataclass
class TurnRecord:
    """One request: a turn of a conversation under one configuration."""

    config: str  # one of CONFIGS, or SINGLE
    policy: str  # "full" for vanilla
    budget: float
    conversation: int
    turn: int  # 1-based
    prompt_tokens: int
    expected: str
    answer: str  # the greedy answer as scored (answer_text: stripped, lower case)
    correct: bool
    ttft_s: float | None  # None for the untimed single-turn reference
    num_cached_tokens: int  # prefix-cache hit
    shared_prefix: int  # tokens kept exact as the shared prefix (compressing engines' report; 0 otherwise)
    image_prefix: int  # tokens through the last image token, whole blocks
    kv_kept: float | None  # the engine's report (tokens × layers kept / prompt's); None if not compressed
    reused: int  # tokens taken from the previous turn's compressed cache (ours-reuse; 0 otherwise)
    held_token_layers: int  # real blocks held after the second output step × block size × group layers
    prompt_token_layers: int  # prompt tokens × layers (the uncompressed prompt KV)


def _layers_per_group(scheduler: Any) -> list[int]:
    return [len(g.layer_names) for g in scheduler.kv_cache_config.kv_cache_groups]


def held_token_layers(scheduler: Any, request_id: str) -> int:
    """Token-layers of KV the request holds: its real (non-null) blocks in every KV-cache group × block
    size × the layers the group covers (a compressing engine has a group per layer, vanilla one for all).

    ``request_id``: the id given to ``add_request``; the engine may have appended a suffix.
    """
    from vllm_kvmm.vllm_ext import internals

    mgr = scheduler.kv_cache_manager
    mgrs = mgr.coordinator.single_type_managers
    null = internals.null_block(mgrs[0])
    row0 = mgrs[0].req_to_blocks
    rid = next((r for r in row0 if r == request_id or r.startswith(f"{request_id}-")), None)
    if rid is None:
        return 0
    total = 0
    for m, layers in zip(mgrs, _layers_per_group(scheduler), strict=True):
        real = sum(b is not null for b in internals.req_blocks(m, rid))
        total += real * m.block_size * layers
    return total


def _kvmm_report(out: Any) -> dict[str, Any]:
    return (out.kv_transfer_params or {}).get("kvmm", {})


class _Runner:
    """One engine of one configuration (in the child process) and its requests, run one at a time."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        import os

        from transformers import AutoProcessor
        from vllm import LLM

        import vllm_kvmm

        self.cfg = cfg
        self.proc = AutoProcessor.from_pretrained(cfg["model"])
        self.tok = self.proc.tokenizer
        self.image_token_id = int(self.tok.convert_tokens_to_ids("<image>"))
        n = cfg["n_images"]
        max_len = max_model_len(n, cfg["turns"])
        # Every prompt is prefilled in one step (no chunking, so TTFT is one step's time), and vLLM's start-up
        # warm-up runs at this size instead of its default 4,096 tokens (20 s less per engine on 2 cores).
        args: dict[str, Any] = dict(
            model=cfg["model"], max_model_len=max_len, max_num_batched_tokens=max_len, seed=0,
            block_size=BLOCK, dtype="float32", enforce_eager=True, limit_mm_per_prompt={"image": n},
            enable_prefix_caching=cfg["config"] != "ours-recompute",
        )  # fmt: skip
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            args["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        if cfg["config"] != "vanilla+pc":
            args.update(vllm_kvmm.engine_args(cfg["policy"], cfg["budget"]))
        t0 = time.perf_counter()
        self.llm = LLM(**args)
        self.start_s = time.perf_counter() - t0
        self.engine = self.llm.llm_engine
        self.scheduler = self.engine.engine_core.engine_core.scheduler
        self.layers = sum(_layers_per_group(self.scheduler))
        self._ids = iter(range(10**9))

    def shutdown(self) -> None:
        import contextlib

        with contextlib.suppress(Exception):
            self.engine.engine_core.shutdown()
        del self.llm, self.engine, self.scheduler

    def reset(self) -> None:
        """Forget what the warm-up left: prefix cache, processed-input cache and encoder outputs."""
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        reset_encoder = getattr(self.engine, "reset_encoder_cache", None)
        if reset_encoder is not None:
            reset_encoder()

    def ask(self, images: list[Any], msgs: list[dict], max_tokens: int) -> tuple[Any, list[int], float, int]:
        """Run one request alone to its end: ``(final output, its first max_tokens token ids, TTFT in s,
        token-layers held after its second output step)``.

        The prompt is compressed in the step after its prefill (the first token does not wait for it), so
        the pool is read after the second output step; the request decodes one token past ``max_tokens``
        (end-of-sequence ignored, the ids returned cut back) so that it still runs then. Answers are cut at
        the tokenizer's end-of-sequence token as before: the VLMs this runs (ours, assembled on SmolLM2)
        stop on no other token.
        """
        from vllm import SamplingParams

        extra: dict[str, Any] | None = None
        if self.cfg["config"] != "vanilla+pc":
            extra = {"kv_policy": self.cfg["policy"], "kv_budget": self.cfg["budget"]}
            if self.cfg["config"] in ("ours-shared", "ours-shared-reuse"):
                extra["kv_shared_prefix"] = "images"
            if self.cfg["config"] in ("ours-reuse", "ours-shared-reuse"):
                extra["kv_reuse"] = True
        params = SamplingParams(
            max_tokens=max_tokens + 1, ignore_eos=True, temperature=0.0, detokenize=False, extra_args=extra
        )
        text = self.proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        prompt = {"prompt": text, "multi_modal_data": {"image": images if len(images) > 1 else images[0]}}
        rid = f"mt{next(self._ids)}"
        t0 = time.perf_counter()
        self.engine.add_request(rid, prompt, params)
        ttft: float | None = None
        held = 0
        final = None
        while self.engine.has_unfinished_requests():
            outs = self.engine.step()
            now = time.perf_counter()
            for o in outs:
                n = len(o.outputs[0].token_ids) if o.outputs else 0
                if ttft is None and n:
                    ttft = now - t0
                if n == 2:
                    held = held_token_layers(self.scheduler, rid)
                if o.finished:
                    final = o
        if final is None or ttft is None:
            raise RuntimeError(f"request {rid} ended without output")
        return final, list(final.outputs[0].token_ids)[:max_tokens], ttft, held


def _answer(tok: Any, ids: Sequence[int]) -> str:
    """The answer as the next turn's assistant message carries it: up to the end token, stripped."""
    ids = list(ids)
    if tok.eos_token_id in ids:
        ids = ids[: ids.index(tok.eos_token_id)]
    return str(tok.decode(ids, skip_special_tokens=True)).strip()


def _engine_key(cfg: dict[str, Any]) -> tuple[Any, ...]:
    """What :class:`_Runner`'s engine depends on: configurations with the same key differ only in their
    requests' arguments (shared prefix, reuse), so one engine serves them one after another."""
    plugin = cfg["config"] != "vanilla+pc"
    return (cfg["model"], cfg["n_images"], cfg["turns"], plugin, cfg["config"] != "ours-recompute",
            cfg["policy"] if plugin else None, cfg["budget"] if plugin else None)  # fmt: skip


def _child(job: dict[str, Any]) -> None:
    """The child process: its configurations one after another; reports each one's records and timings.

    Consecutive configurations with the same engine (:func:`_engine_key`: ``ours-shared``, ``ours-reuse``
    and ``ours-shared-reuse`` of one policy) share it, its caches reset in between (``--one-process``: two
    engine starts less per policy); any other engine is shut down before the next starts."""
    import gc

    results = []
    runner: _Runner | None = None
    try:
        for cfg in job["configs"]:
            started = 0.0
            if runner is None or _engine_key(runner.cfg) != _engine_key(cfg):
                if runner is not None:
                    runner.shutdown()
                    runner = None
                    gc.collect()  # the engine's KV cache goes before the next one allocates its own
                runner = _Runner(cfg)
                started = runner.start_s
            runner.cfg = cfg  # the requests' arguments
            results.append({**_run_config(cfg, runner), "engine_start_s": round(started, 1)})
    finally:
        if runner is not None:
            runner.shutdown()
    report({"results": results})


def _run_config(cfg: dict[str, Any], runner: _Runner) -> dict[str, Any]:
    """One configuration on ``runner``'s engine: reset, warm up, reset, then every conversation turn by
    turn; its records and run time."""
    from vllm_kvmm.bench.quality_vlm import answer_text
    from vllm_kvmm.bench.sweep import answer_tokens

    convs = conversations(cfg["conversations"], cfg["n_images"], cfg["turns"], cfg["seed"])
    runner.reset()  # what a configuration before it on the same engine left
    tok = runner.tok
    records: list[dict[str, Any]] = []
    t_run = time.perf_counter()
    # Warm-up (kernels, allocator, the compression path) on a context outside the measured set.
    (warm,) = conversations(1, cfg["n_images"], 1, seed=cfg["seed"] + 10_000)
    runner.ask(warm.context.images(), conversation_messages(cfg["n_images"], [warm.questions[0].text], []), 2)
    runner.reset()
    for conv in convs:
        images = conv.context.images()
        qs = [q.text for q in conv.questions]
        answers: list[str] = []
        for k, q in enumerate(conv.questions):
            msgs = conversation_messages(cfg["n_images"], qs[: k + 1], answers)
            out, ids, ttft, held = runner.ask(images, msgs, answer_tokens(tok, q.answer))
            records.append(_record(runner, cfg, conv.index, k + 1, q, out, answer_text(tok, ids), ttft, held))
            answers.append(_answer(tok, ids))
        if cfg["single_turn"]:
            for k, q in enumerate(conv.questions, start=1):
                msgs = conversation_messages(cfg["n_images"], [q.text], [])
                out, ids, _, held = runner.ask(images, msgs, answer_tokens(tok, q.answer))
                got = answer_text(tok, ids)
                rec = _record(runner, {**cfg, "config": SINGLE}, conv.index, k, q, out, got, None, held)
                records.append(rec)
    run_s = time.perf_counter() - t_run
    return {"records": records, "run_s": round(run_s, 1)}


def _record(
    runner: _Runner,
    cfg: dict[str, Any],
    conv: int,
    turn: int,
    q: data.Question,
    out: Any,
    got: str,
    ttft: float | None,
    held: int,
) -> dict[str, Any]:
    rep = _kvmm_report(out)
    prompt = list(out.prompt_token_ids or [])
    kept = rep.get("kv_kept") if rep.get("compressed") else None
    return asdict(
        TurnRecord(
            config=cfg["config"], policy=cfg["policy"], budget=cfg["budget"], conversation=conv, turn=turn,
            prompt_tokens=len(prompt), expected=q.answer, answer=got, correct=got == q.answer,
            ttft_s=None if ttft is None else round(ttft, 4),
            num_cached_tokens=int(out.num_cached_tokens or 0),
            shared_prefix=int(rep.get("shared_prefix", 0)),
            image_prefix=image_prefix(prompt, runner.image_token_id),
            kv_kept=None if kept is None else float(kept), reused=int(rep.get("reused", 0)),
            held_token_layers=held,
            prompt_token_layers=len(prompt) * runner.layers,
        )
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- summary


@dataclass
class MultiTurnRow:
    """One configuration, policy and turn, over every conversation."""

    config: str
    policy: str
    budget: float
    turn: int
    conversations: int
    accuracy: float
    lo: float  # 95 % Wilson interval of the accuracy
    hi: float
    ttft_s: float | None  # median time to first token
    ttft_ratio: float | None  # geometric mean over conversations of TTFT / vanilla+pc's (same turn)
    prompt_tokens: float  # means over the conversations
    cached_tokens: float
    shared_prefix: float
    reused: float  # tokens taken from the previous turn's compressed cache
    kv_kept: float | None  # the engine's report (compressed requests)
    held: float  # token-layers held once compressed / the prompt's token-layers (uncompressed = ~1)
    held_token_layers: float
    shared_of_held: float  # the exact shared prefix's token-layers / token-layers held


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def summarize(records: Sequence[dict[str, Any]]) -> list[MultiTurnRow]:
    """Rows per (configuration, policy, turn), in the order the records list them."""
    from vllm_kvmm.bench.sweep import wilson

    base = {
        (r["conversation"], r["turn"]): r["ttft_s"]
        for r in records
        if r["config"] == "vanilla+pc" and r["ttft_s"]
    }
    rows = []
    keys = dict.fromkeys((r["config"], r["policy"], r["budget"], r["turn"]) for r in records)
    for config, policy, budget, turn in keys:
        rs = [
            r
            for r in records
            if (r["config"], r["policy"], r["budget"], r["turn"]) == (config, policy, budget, turn)
        ]
        right = sum(r["correct"] for r in rs)
        lo, hi = wilson(right, len(rs))
        ttfts = [r["ttft_s"] for r in rs if r["ttft_s"] is not None]
        ratios = [
            r["ttft_s"] / base[r["conversation"], turn]
            for r in rs
            if r["ttft_s"] and (r["conversation"], turn) in base
        ]
        kept = [r["kv_kept"] for r in rs if r["kv_kept"] is not None]
        held = [r["held_token_layers"] for r in rs]
        layers = rs[0]["prompt_token_layers"] / max(1, rs[0]["prompt_tokens"])
        rows.append(
            MultiTurnRow(
                config=config, policy=policy, budget=budget, turn=turn, conversations=len(rs),
                accuracy=right / len(rs), lo=lo, hi=hi,
                ttft_s=statistics.median(ttfts) if ttfts else None,
                ttft_ratio=math.exp(_mean([math.log(x) for x in ratios])) if ratios else None,
                prompt_tokens=_mean([r["prompt_tokens"] for r in rs]),
                cached_tokens=_mean([r["num_cached_tokens"] for r in rs]),
                shared_prefix=_mean([r["shared_prefix"] for r in rs]),
                reused=_mean([r.get("reused", 0) for r in rs]),
                kv_kept=_mean(kept) if len(kept) == len(rs) else None,
                held=_mean([r["held_token_layers"] / max(1, r["prompt_token_layers"]) for r in rs]),
                held_token_layers=_mean(held),
                shared_of_held=_mean(
                    [r["shared_prefix"] * layers / max(1, r["held_token_layers"]) for r in rs]
                ),
            )
        )  # fmt: skip
    return rows


def _label(r: MultiTurnRow) -> str:
    return r.config if r.policy == "full" else f"{r.config} {r.policy}@{r.budget:g}"


def table(rows: Sequence[MultiTurnRow]) -> str:
    """Markdown: accuracy per turn (95 % Wilson intervals), then per turn the TTFT against vanilla+pc and
    the KV held after prefill (share of the uncompressed prompt's KV, and of it the exact shared prefix)."""
    turns = sorted({r.turn for r in rows})
    labels = list(dict.fromkeys(_label(r) for r in rows))
    by = {(_label(r), r.turn): r for r in rows}
    head = ["configuration", *[f"turn {t}" for t in turns]]
    acc = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lab in labels:
        cells = [lab]
        for t in turns:
            r = by.get((lab, t))
            cells.append("–" if r is None else f"{100 * r.accuracy:.0f} [{100 * r.lo:.0f}, {100 * r.hi:.0f}]")
        acc.append("| " + " | ".join(cells) + " |")
    n = max(r.conversations for r in rows)
    acc.append(f"(exact-match accuracy %, {n} conversations a cell, 95 % Wilson intervals)")
    head2 = [
        "configuration",
        *[f"TTFT ×vanilla t{t}" for t in turns],
        *[f"KV held t{t}" for t in turns],
        f"shared of held t{turns[-1]}",
        f"cache hit t{turns[-1]} (tokens)",
        f"reused t{turns[-1]} (tokens)",
    ]
    perf = ["| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
    for lab in labels:
        rs = [by.get((lab, t)) for t in turns]
        if any(r is None or r.ttft_ratio is None for r in rs):
            continue  # untimed reference rows
        last = rs[-1]
        assert last is not None
        cells = [
            lab,
            *[f"{r.ttft_ratio:.2f}" for r in rs if r is not None and r.ttft_ratio is not None],
            *[f"{100 * r.held:.0f}%" for r in rs if r is not None],
            "–" if last.policy == "full" else f"{100 * last.shared_of_held:.0f}%",
            f"{last.cached_tokens:.0f} / {last.prompt_tokens:.0f}",
            f"{last.reused:.0f}",
        ]
        perf.append("| " + " | ".join(cells) + " |")
    perf.append(
        "(TTFT: geometric mean over conversations of the request's time to first token over vanilla+pc's "
        "for the same conversation and turn, each request alone; KV held: token-layers held after the "
        "step that compressed the prompt (the second output step) over prompt tokens × layers; shared: the "
        "exact image prefix's part of it; cache hit: vLLM's "
        "count, exact prefix and reused compressed tokens together)"
    )
    return "\n".join(acc) + "\n\n" + "\n".join(perf)


# ------------------------------------------------------------------------------------------- runner


def _log(msg: str) -> None:
    print(msg, flush=True)


def run_multiturn(
    model: Path,
    policies: Sequence[str] = DEFAULT_POLICIES,
    budget: float = DEFAULT_BUDGET,
    n_conversations: int = DEFAULT_CONVERSATIONS,
    turns: int = DEFAULT_TURNS,
    n_images: int = DEFAULT_IMAGES,
    seed: int = 0,
    single_turn: bool = True,
    out: Path | None = None,
    one_process: bool = False,
    command: str = "",
    log: Any = None,
) -> dict[str, Any]:
    """Every configuration in its own process (``one_process``: all in one child process, one engine after
    another, shared where only the requests differ: fewer starts, for tests), vanilla first; returns (and
    writes to ``out``) the result ``{"meta", "rows", "records"}``. Raises ``RuntimeError`` if a
    configuration failed."""
    from vllm_kvmm.policies import make_policy

    log = log or _log
    for p in policies:
        make_policy(p, budget)  # a bad name or budget fails before any engine starts
    conversations(n_conversations, n_images, turns, seed)  # and a bad shape
    base = dict(model=str(model), budget=budget, conversations=n_conversations, turns=turns,
                n_images=n_images, seed=seed)  # fmt: skip
    cfgs = [dict(base, config="vanilla+pc", policy="full", budget=1.0, single_turn=single_turn)]
    for p in policies:
        cfgs += [dict(base, config=c, policy=p, single_turn=False) for c in CONFIGS[1:]]
    records: list[dict[str, Any]] = []
    timings = []
    t0 = time.perf_counter()
    for job in [cfgs] if one_process else [[c] for c in cfgs]:
        names = ", ".join(f"{c['config']} {c['policy']}" for c in job)
        res = run_child("vllm_kvmm.bench.multiturn", {"configs": job}, tail=4000)
        if res.result is None:
            raise RuntimeError(f"{names} failed: {res.error}")
        for cfg, got in zip(job, res.result["results"], strict=True):
            records += got["records"]
            took = {k: got[k] for k in ("engine_start_s", "run_s")}
            timings.append(dict(config=cfg["config"], policy=cfg["policy"], **took))
            log(f"{cfg['config']} {cfg['policy']}: engine {took['engine_start_s']} s, run {took['run_s']} s")
    rows = summarize(records)
    meta = dict(
        command=command, machine=machine(), device="cpu", model=str(model), split="test", n_images=n_images,
        conversations=n_conversations, turns=turns, budget=budget, policies=list(policies), seed=seed,
        block=BLOCK, tuning="none: policies and ρ fixed in advance, no validation split used",
        ttft="each request alone, add_request to the end of its first step with a token; CPU: ratios only",
        one_process=one_process, timings=timings, wall_s=round(time.perf_counter() - t0, 1),
    )  # fmt: skip
    result = dict(meta=meta, rows=[asdict(r) for r in rows], records=records)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    log(table(rows))
    return result


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The benchmark's flags (``vllm-kvmm bench multiturn`` and ``python -m vllm_kvmm.bench.multiturn``)."""
    p = p or argparse.ArgumentParser(
        prog="vllm-kvmm bench multiturn",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="vlm", help="`vlm` (the embedded VLM) or an assembled VLM folder")
    p.add_argument(
        "--policies", default=",".join(DEFAULT_POLICIES), help="comma-separated compressing policies"
    )
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="ρ, fixed in advance")
    p.add_argument("--conversations", type=int, default=DEFAULT_CONVERSATIONS)
    p.add_argument("--turns", type=int, default=DEFAULT_TURNS)
    p.add_argument(
        "--images", type=int, default=DEFAULT_IMAGES, help="images per conversation (64 tokens each)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-single-turn", dest="single_turn", action="store_false",
        help="skip the full-cache single-turn reference (each question asked alone)",
    )  # fmt: skip
    p.add_argument("--out", default="out/multiturn.json")
    p.add_argument(
        "--one-process", action="store_true",
        help="every engine in one child process, one after another (faster start; timings share a process)",
    )  # fmt: skip
    add_child_flag(p)
    return p


def _command(a: argparse.Namespace) -> str:
    """The command line that reproduces this run."""
    parts = ["vllm-kvmm", "bench", "multiturn", "--model", a.model, "--policies", a.policies,
             "--budget", f"{a.budget:g}", "--conversations", str(a.conversations), "--turns", str(a.turns),
             "--images", str(a.images), "--seed", str(a.seed), "--out", a.out]  # fmt: skip
    if not a.single_turn:
        parts.append("--no-single-turn")
    if a.one_process:
        parts.append("--one-process")
    return shlex.join(parts)


def run(a: argparse.Namespace) -> int:
    """Run the benchmark parsed into ``a`` (or, with ``--child``, one configuration)."""
    if a.child:
        _child(json.loads(a.child))
        return 0
    if a.model == "vlm":
        from vllm_kvmm.vlm.assemble import ensure_vlm

        model = ensure_vlm()
    else:
        model = Path(a.model)
    run_multiturn(
        model=model,
        policies=[p for p in a.policies.split(",") if p],
        budget=a.budget,
        n_conversations=a.conversations,
        turns=a.turns,
        n_images=a.images,
        seed=a.seed,
        single_turn=a.single_turn,
        out=Path(a.out),
        one_process=a.one_process,
        command=_command(a),
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vllm_kvmm.bench.multiturn``: the same as ``vllm-kvmm bench multiturn``."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
