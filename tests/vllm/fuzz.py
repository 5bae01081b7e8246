"""Seeded lifecycle fuzzer: random requests through a real CPU engine, invariants checked after every step.

Requests of random lengths, with and without images (the tiny LLaVA), under random per-request policies
and budgets (decode-evicting ones included), prefilled in chunks of ``chunk`` tokens, in a KV pool small
enough to force preemption; random aborts (before, during and after compression and flushes), late
arrivals and a few malformed requests (refused at ``add_request``, the engine goes on). After **every**
engine step :func:`check_invariants` checks:

* pool accounting: free blocks + blocks held by requests = the pool (its null block aside);
* no block held twice (two requests, two groups, or twice in one row) and none with a wrong ref count;
  with prefix caching (``--prefix-caching``) a block may be shared, at the same place of the same group,
  and its ref count is the number of rows holding it; a compressing request's blocks after its shared
  prefix never carry a hash (compaction rewrites them), except those a follow-up took from a compressed
  entry (``kv_reuse``: a third of the requests continue a finished one, most under its policy);
* no blocks held by a request the scheduler no longer has;
* each request's held blocks are what its layout says: per group, the real blocks sit exactly at the
  compacted prefix ``live``, the recycle bin and ``[tail, …)`` (all positions when not compacted);
* no per-request state outlives its request (the connector's, and the worker's beyond the step that
  ended it).

At the end every block is back in the pool. A violation raises :class:`Violation` with the seed, the step,
and the command that replays the run to that step::

    python -m tests.vllm.fuzz --requests 10000 --seed 0          # the long run (docs/benchmarks.md)
    python -m tests.vllm.fuzz --requests 300 --seed 7 --stop-at 412   # a replay
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

BUDGETS = (0.1, 0.25, 0.5, 1.0)
PREAMBLES = (
    "You are a careful assistant. Describe what you see in the images, then answer the question briefly.",
    "System: answer with one word. Shapes, colours and positions matter; counting matters too.",
)
COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200))
WORDS = "the a red blue square circle image left right above below one two three shape color".split()  # noqa: SIM905


LAYERS = 4  # the tiny LLaVA's attention layers


class Violation(AssertionError):
    """An invariant failed; the message holds the seed, the step and the replay command."""


@dataclass
class FuzzConfig:
    seed: int = 0
    requests: int = 200
    max_live: int = 6  # requests in flight at most (the scheduler runs up to max_num_seqs of them)
    pool_blocks: int = 160  # one-layer blocks of 16 tokens: 40 per layer of the 4-layer tiny models
    chunk: int = 64  # max_num_batched_tokens: prompts prefill in chunks
    image_prob: float = 0.35
    abort_prob: float = 0.04  # per step, of one live request
    bad_prob: float = 0.02  # a malformed request, refused at add_request
    max_prompt_words: int = 120
    max_new: int = 48
    stop_at: int | None = None  # stop after this step (replays)
    # Prefix caching on: prompts open with one of a few preambles and images of a few colours, so prefixes
    # repeat, and some requests mark a shared prefix (kv_shared_prefix).
    prefix_caching: bool = False
    groups: int | None = None  # --kv-groups (None: one KV-cache group per layer)

    def command(self, step: int | None = None) -> str:
        stop = f" --stop-at {step}" if step is not None else ""
        pc = " --prefix-caching" if self.prefix_caching else ""
        g = f" --kv-groups {self.groups}" if self.groups is not None else ""
        return f"python -m tests.vllm.fuzz --requests {self.requests} --seed {self.seed}{pc}{g}{stop}"


@dataclass
class FuzzReport:
    steps: int = 0
    finished: int = 0
    aborted: int = 0
    refused: int = 0
    with_images: int = 0
    preemptions: int = 0
    policies: Counter = field(default_factory=Counter)
    compressed: int = 0
    cache_hits: int = 0  # finished requests that found part of their prompt in the prefix cache
    compressed_on_hit: int = 0  # ... and were compressed behind that prefix
    follow_ups: int = 0  # requests continuing a finished one (prefix caching only)
    reused: int = 0  # finished requests that continued a compressed entry (kv_reuse)
    errors: list[str] = field(default_factory=list)  # contained compression failures (each one a bug)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "policies"}
        out["policies"] = dict(sorted(self.policies.items()))
        return out


def _scheduler(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.scheduler


def check_invariants(llm: Any, ended: set[str]) -> None:
    """Raise :class:`Violation` (without the replay context) when an invariant fails; see the docstring.

    ``ended``: requests the scheduler dropped during the last step (the worker forgets them one step
    later, when the next step's metadata says so).
    """
    from vllm_kvmm.vllm_ext.prefix import shared_prefixes
    from vllm_kvmm.vllm_ext.reuse import compressed_entries
    from vllm_kvmm.vllm_ext.spec import managers
    from vllm_kvmm.vllm_ext.worker import worker_state

    sched = _scheduler(llm)
    pool = sched.kv_cache_manager.block_pool
    null = pool.null_block
    live = set(sched.requests)
    owners: dict[int, list[tuple[str, int, int]]] = {}
    blocks_by_id: dict[int, Any] = {}
    rows: dict[tuple[str, int], list[Any]] = {}
    prefixes = shared_prefixes(pool)
    conn = sched.connector
    for g, mgr in sorted(managers(pool).items()):
        for req, blocks in mgr.req_to_blocks.items():
            real = [b for b in blocks if b is not null]
            if real and req not in live:
                raise Violation(f"group {g} holds {len(real)} blocks of ended request {req}")
            rows[(req, g)] = blocks
            first_private = prefixes.shared(req) // mgr.block_size
            tracked = compressed_entries(pool).requests.get(req)
            adopted = tracked.adopted if tracked is not None else None
            if adopted is not None and adopted[0] == sched.requests[req].num_preemptions:
                first_private = max(first_private, adopted[1].blocks)  # the entry's blocks keep their keys
            for i, b in enumerate(blocks):
                if b is null:
                    continue
                owners.setdefault(b.block_id, []).append((req, g, i))
                blocks_by_id[b.block_id] = b
                if prefixes.compresses(req) and i >= first_private and b.block_hash is not None:
                    raise Violation(f"{(req, g, i)} is past its shared prefix but has a hash")
    for block_id, holders in owners.items():
        places = {(g, i) for _, g, i in holders}
        if len(holders) > 1 and (not pool.enable_caching or len(places) > 1):
            raise Violation(f"block {block_id} held by {holders}")
        if blocks_by_id[block_id].ref_cnt != len(holders):
            raise Violation(f"block {block_id} of {holders} has ref count {blocks_by_id[block_id].ref_cnt}")
    total, free = pool.num_gpu_blocks - 1, pool.get_num_free_blocks()
    if free + len(owners) != total:
        raise Violation(f"pool accounting: {free} free + {len(owners)} held != {total} blocks")
    state = worker_state()
    for req, st in state.requests.items():
        if req not in live and req not in ended:
            raise Violation(f"the worker still keeps state of ended request {req}")
        for g, (kept, tail) in st.compact.items():
            blocks = rows.get((req, g))
            if not blocks:
                continue  # preempted or finished: the scheduler freed the row
            want = set(kept) | set(st.bin_blocks.get(g, ())) | set(range(tail, len(blocks)))
            held = {i for i, b in enumerate(blocks) if b is not null}
            if held != want:
                raise Violation(
                    f"{req} group {g}: real blocks at {sorted(held)}, its layout says {sorted(want)}"
                )
    for (req, g), blocks in rows.items():
        st = state.requests.get(req)
        if req in live and (st is None or g not in st.compact) and any(b is null for b in blocks):
            raise Violation(f"{req} group {g} is not compacted but has null blocks")
    reuse = compressed_entries(pool).requests
    for name, held in [(n, getattr(conn, n)) for n in ("_requests", "_policies", "_reports")] + [
        ("reuse tracking", reuse)
    ]:
        stale = set(held) - live
        if stale:
            raise Violation(f"the connector's {name} keeps ended requests {sorted(stale)[:3]}")
    # An adoption is placed in the schedule() that found it, or the request is still waiting (vLLM could
    # not allocate its blocks; the next attempt looks again).
    stale = {
        r for r in compressed_entries(pool).pending if r not in live or sched.requests[r].num_computed_tokens
    }
    if stale:
        raise Violation(f"adoptions pending for ended or running requests: {sorted(stale)[:3]}")


class Fuzzer:
    """Drives one engine (the tiny LLaVA under policy ``full``, per-request policies) with random work."""

    def __init__(self, llm: Any, processor: Any, cfg: FuzzConfig) -> None:
        self.llm, self.processor, self.cfg = llm, processor, cfg
        self.rng = random.Random(cfg.seed)
        self.report = FuzzReport()
        self.log: dict[str, dict[str, Any]] = {}  # request -> how it was made (for the failure message)
        self.progress = 0  # print the report every this many finished requests (0: never)
        # Finished requests a follow-up may continue (prefix caching): (prompt, output ids, extra args).
        self.done: list[tuple[dict[str, Any], list[int], list[int], dict[str, Any]]] = []
        self.made: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}

    def _prompt(self, rid: str) -> tuple[dict[str, Any], Any]:
        from PIL import Image

        from tests.vllm.conftest import greedy
        from vllm_kvmm.policies import POLICIES, DecodeCadence

        rng, cfg = self.rng, self.cfg
        if cfg.prefix_caching and self.done and rng.random() < 0.35:
            return self._follow_up(rid)
        n_img = rng.choice((1, 2)) if rng.random() < cfg.image_prob else 0
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, cfg.max_prompt_words)))
        content: list[dict[str, Any]] = [{"type": "image"}] * n_img + [{"type": "text", "text": words}]
        if cfg.prefix_caching:
            content.insert(0, {"type": "text", "text": PREAMBLES[rng.randrange(len(PREAMBLES))]})
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        prompt: dict[str, Any] = {"prompt": text}
        if n_img:
            size = rng.choice((24, 32, 48))
            colours = [COLOURS[rng.randrange(len(COLOURS))] for _ in range(n_img)]
            if not cfg.prefix_caching:
                colours = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(n_img)]
            pics = [Image.new("RGB", (size, size), c) for c in colours]
            prompt["multi_modal_data"] = {"image": pics}
            self.report.with_images += 1
        name = rng.choice(sorted(POLICIES))
        extra: dict[str, Any] = {
            "kv_policy": name,
            "kv_budget": 1.0 if name == "full" else rng.choice(BUDGETS),
        }
        if cfg.prefix_caching and rng.random() < 0.5:
            extra["kv_shared_prefix"] = rng.choice(("images", 16, 48, 200))
        config: dict[str, Any] = {}
        if issubclass(POLICIES[name], DecodeCadence) and rng.random() < 0.6:
            config["decode_interval"] = rng.choice((4, 8, 16))
            if name == "hae":
                config["decode_budget"] = rng.choice((0.2, 0.5))
        if name in ("h2o", "lookm") and rng.random() < 0.5:
            config["score_step"] = rng.choice((2, 3, 5))  # accumulated attention from sampled rows
        if config:
            extra["kv_policy_config"] = config
        if cfg.prefix_caching and rng.random() < 0.5:
            extra["kv_reuse"] = True
        self.report.policies[name] += 1
        self.log[rid] = {"images": n_img, "words": len(words.split()), **extra}
        self.made[rid] = (prompt, extra)
        return prompt, greedy(rng.randint(1, cfg.max_new), **extra)

    def _follow_up(self, rid: str) -> tuple[dict[str, Any], Any]:
        """The next turn of a finished request: its prompt (image placeholders collapsed, as vLLM expands
        them), its answer and new words; mostly under the same policy, usually with ``kv_reuse``."""
        from tests.vllm.conftest import greedy
        from vllm_kvmm.policies import POLICIES

        rng, cfg = self.rng, self.cfg
        # Half of them the latest such request (its entry is the likeliest to be in the pool still).
        latest = rng.random() < 0.5
        prompt, out_ids, prompt_ids, extra = self.done[-1 if latest else rng.randrange(len(self.done))]
        image = self.processor.tokenizer.convert_tokens_to_ids("<image>")
        ids = [t for i, t in enumerate(prompt_ids) if t != image or i == 0 or prompt_ids[i - 1] != image]
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20)))
        turn = self.processor.tokenizer.encode(f" USER: {words} ASSISTANT:", add_special_tokens=False)
        ids += out_ids + turn
        follow: dict[str, Any] = {"prompt_token_ids": ids}
        if "multi_modal_data" in prompt:
            follow["multi_modal_data"] = prompt["multi_modal_data"]
        extra = dict(extra)
        if rng.random() < 0.15:
            name = rng.choice(sorted(POLICIES))
            extra = {"kv_policy": name, "kv_budget": 1.0 if name == "full" else rng.choice(BUDGETS)}
        extra["kv_reuse"] = rng.random() < 0.8
        self.report.follow_ups += 1
        self.report.policies[extra["kv_policy"]] += 1
        self.log[rid] = {"follow_up": True, "tokens": len(ids), **extra}
        self.made[rid] = (follow, extra)
        return follow, greedy(rng.randint(1, cfg.max_new), **extra)

    def _add_bad(self, rid: str) -> None:
        from tests.vllm.conftest import greedy

        bad = self.rng.choice(({"kv_budget": 1.5}, {"kv_policy": "nope"}, {"kv_budget": float("nan")}))
        try:
            self.llm.llm_engine.add_request(rid, {"prompt_token_ids": [5, 6, 7]}, greedy(2, **bad))
        except ValueError:
            self.report.refused += 1
            return
        raise Violation(f"malformed request {bad} was accepted")

    def run(self, check: Callable[[Any, set[str]], None] = check_invariants) -> FuzzReport:
        from tests.vllm.helpers import PreemptionCounter

        engine, rng, cfg = self.llm.llm_engine, self.rng, self.cfg
        sched = _scheduler(self.llm)
        made, live = 0, set()
        t0 = time.perf_counter()
        with PreemptionCounter(self.llm) as preempted:
            step = 0
            while made < cfg.requests or engine.has_unfinished_requests():
                while made < cfg.requests and len(live) < cfg.max_live and rng.random() < 0.6:
                    rid = f"f{made}"
                    made += 1
                    if rng.random() < cfg.bad_prob:
                        self._add_bad(rid)
                        continue
                    engine.add_request(rid, *self._prompt(rid))
                    live.add(rid)
                if live and rng.random() < cfg.abort_prob:
                    victim = rng.choice(sorted(live))
                    engine.abort_request([victim])
                    live.discard(victim)
                    self.report.aborted += 1
                before = set(sched.requests)
                for out in engine.step():
                    if out.finished and out.request_id in live:
                        live.discard(out.request_id)
                        self.report.finished += 1
                        if self.progress and self.report.finished % self.progress == 0:
                            print(json.dumps({"step": step, **self.report.as_dict()}), flush=True)
                        kvmm = (out.kv_transfer_params or {}).get("kvmm", {})
                        self.report.compressed += bool(kvmm.get("compressed"))
                        self.report.reused += "reused" in kvmm
                        prompt, extra = self.made.pop(out.request_id)
                        # Follow-ups continue recent requests whose cache was compressed (the ones
                        # that may leave an entry), so that entries are often still in the pool.
                        cached = kvmm.get("compressed") or "reused" in kvmm
                        if cfg.prefix_caching and cached and len(out.prompt_token_ids) < 300:
                            ids = list(out.outputs[0].token_ids)
                            self.done.append((prompt, ids, list(out.prompt_token_ids), extra))
                            self.done = self.done[-8:]
                        hit = bool(out.num_cached_tokens)
                        self.report.cache_hits += hit
                        self.report.compressed_on_hit += hit and bool(kvmm.get("compressed"))
                        if "error" in kvmm:
                            self.report.errors.append(
                                f"{out.request_id} {self.log[out.request_id]}: {kvmm['error']}"
                            )
                step += 1
                try:
                    check(self.llm, before - set(sched.requests))
                except Violation as e:
                    raise Violation(self._context(step, str(e))) from None
                if cfg.stop_at is not None and step >= cfg.stop_at:
                    break
        self.report.steps, self.report.preemptions = step, preempted.count
        self.report.seconds = round(time.perf_counter() - t0, 1)
        if cfg.stop_at is None:
            pool = sched.kv_cache_manager.block_pool
            if pool.get_num_free_blocks() != pool.num_gpu_blocks - 1:
                raise Violation(self._context(step, "the pool is not full after the drain"))
        return self.report

    def _context(self, step: int, what: str) -> str:
        recent = list(self.log.items())[-4:]
        return (
            f"{what}\n  seed {self.cfg.seed}, step {step}; replay: {self.cfg.command(step)}\n"
            f"  last requests made: {json.dumps(dict(recent))}"
        )


def make_engine(model_dir: Path, cfg: FuzzConfig) -> Any:
    from tests.vllm.conftest import make_llm

    return make_llm(
        str(model_dir),
        "full",
        groups=cfg.groups,
        # A block holds one page per layer of a group: the same memory in blocks of G-layer groups' size.
        num_gpu_blocks_override=cfg.pool_blocks * (cfg.groups or LAYERS) // LAYERS,
        max_model_len=512,
        max_num_batched_tokens=cfg.chunk,
        max_num_seqs=cfg.max_live,
        limit_mm_per_prompt={"image": 2},
        enable_prefix_caching=cfg.prefix_caching,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.vllm.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=FuzzConfig.requests)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-at", type=int, default=None, help="stop after this step (replay a failure)")
    p.add_argument("--prefix-caching", action="store_true", help="prefix caching on, prefixes repeat")
    p.add_argument("--kv-groups", type=int, default=None, help="KV-cache groups (default: one per layer)")
    p.add_argument("--json", default=None, help="write the report here")
    a = p.parse_args(argv)
    from transformers import AutoProcessor

    from vllm_kvmm.models import build_tiny_llava, load_smollm2_tokenizer

    home = Path(os.environ.get("VLLM_KVMM_HOME", Path.home() / ".cache" / "vllm-kvmm"))
    model = build_tiny_llava(home / "fuzz" / "tiny-llava", seed=0, tokenizer=load_smollm2_tokenizer())
    cfg = FuzzConfig(seed=a.seed, requests=a.requests, stop_at=a.stop_at, prefix_caching=a.prefix_caching,
                     groups=a.kv_groups)  # fmt: skip
    llm = make_engine(model, cfg)
    fuzzer = Fuzzer(llm, AutoProcessor.from_pretrained(model), cfg)
    fuzzer.progress = 500
    report = fuzzer.run()
    out = {
        "command": cfg.command(),
        "violations": 0,
        "contained_failures": len(report.errors),
        **report.as_dict(),
    }
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
