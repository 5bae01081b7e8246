"""``vllm-kvmm`` command line: list policies, prepare the embedded models, run the demo."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from vllm_kvmm.policies import POLICIES, PolicyError


def _cmd_policies(args: argparse.Namespace) -> int:
    width = max(len(n) for n in POLICIES)
    for name, cls in POLICIES.items():
        print(f"{name:<{width}}  {cls.summary}")
    return 0


def _cmd_prepare_models(args: argparse.Namespace) -> int:
    from vllm_kvmm.models.smollm2 import ensure_smollm2, verify_smollm2

    path = ensure_smollm2()
    answer = verify_smollm2(path)
    print(f"SmolLM2-135M-Instruct ready at {path}")
    print(f"  check: 'What is the capital of France?' -> {answer!r}")
    from vllm_kvmm.vlm import data

    if not data.easy_vqa_available():
        print("VLM skipped: easy-vqa (its images) is not installed (pip install easy-vqa==1.0)")
        return 0
    from vllm_kvmm.vlm.assemble import ensure_vlm
    from vllm_kvmm.vlm.evaluate import verify_vlm

    vlm = ensure_vlm()
    print(f"VLM (CLIP ViT → projector → SmolLM2, easy-VQA) ready at {vlm}")
    for q, a in verify_vlm(vlm):
        print(f"  check (held-out images): {q!r} -> {a!r}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.reference:
        from vllm_kvmm.demo import run_reference_demo

        return run_reference_demo(
            policies=args.policies.split(","),
            budget=args.budget or 0.5,
            max_new_tokens=args.max_new_tokens or 24,
            doc_words=args.doc_words,
        )
    compare = [p for p in args.compare.split(",") if p]
    if args.text:
        from vllm_kvmm.serve_demo import run_serve_demo

        return run_serve_demo(
            policy=args.policy,
            budget=args.budget or 0.5,
            compare=compare,
            max_tokens=args.max_new_tokens or 24,
            doc_words=args.doc_words,
        )
    from vllm_kvmm.serve_demo import run_vlm_demo

    run_vlm_demo(
        policy=args.policy,
        budget=args.budget or 0.2,
        compare=compare,
        compare_budget=args.budget or 0.2,
        n_images=args.images,
        max_tokens=args.max_new_tokens or 8,
    )
    return 0


def _cmd_bench_quality(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.model is not None:
        from vllm_kvmm.bench.quality_vlm import DEFAULT_PLAN, parse_plan, run_vlm_quality
        from vllm_kvmm.vlm.assemble import ensure_vlm

        run_vlm_quality(
            model=ensure_vlm() if args.model == "vlm" else Path(args.model),
            policies=args.policies.split(","),
            budgets=[float(b) for b in args.budgets.split(",")],
            plan=parse_plan(args.tasks) if args.tasks else DEFAULT_PLAN,
            engines=args.engines.split(","),
            primary=args.primary,
            oracle_prompts=None if args.oracle_prompts == "all" else int(args.oracle_prompts),
            device=args.device,
            out=Path(args.out or "out/quality_vlm.json"),
        )
        return 0
    from vllm_kvmm.bench.quality_text import run_text_quality

    run_text_quality(
        policies=args.policies.split(","),
        budgets=[float(b) for b in args.budgets.split(",")],
        prompt_tokens=args.prompt_tokens,
        cont_tokens=args.cont_tokens,
        gen_tokens=args.gen_tokens,
        segments=args.segments,
        texts=args.texts.split(","),
        engines=args.engines.split(","),
        device=args.device,
        out=Path(args.out or "out/quality_text.json"),
    )
    return 0


def _cmd_bench_retrieval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vllm_kvmm.bench.retrieval import run_retrieval

    run_retrieval(
        policies=args.policies.split(","),
        budgets=[float(b) for b in args.budgets.split(",")],
        contexts=[int(c) for c in args.contexts.split(",")],
        samples=args.samples,
        engines=args.engines.split(","),
        device=args.device,
        out=Path(args.out),
    )
    return 0


VARIANT_HELP = (
    "comma-separated registered policies (`vllm-kvmm policies`) or the benchmark variants meda-sink "
    "(meda-paper keeping 4 sink tokens per layer), meda-exact (meda's entropies from every query row) and "
    "h2o-s4, h2o-s8, lookm-s4, lookm-s8 (accumulated attention from every 4th / 8th query row); "
    "full at 1.0 always runs as the yardstick"
)


# ``vllm-kvmm bench NAME``: benchmarks whose module parses its own flags (name, module, help).
MODULE_BENCHES = (
    ("perf", "perf", "speed and memory: vanilla vLLM, the ideal and policies in one run"),
    (
        "stats",
        "stats_kernels",
        "prefill statistics per policy, torch vs Triton kernels, next to the attention itself",
    ),
    ("sweep", "sweep", "design sweep on the VLM's validation split: policy variants, one prefill per prompt"),
    (
        "entropy-sample",
        "entropy_sample",
        "MEDA's layer entropies from sampled query rows vs every row: cost and budget moves (VLM prompts)",
    ),
    (
        "score-sample",
        "score_sample",
        "H2O / LOOK-M scores from sampled query rows vs every row: kept sets and answers (VLM prompts)",
    ),
    (
        "decode",
        "decode",
        "long generations: throughput and KV held, vanilla vs decode-time eviction (SmolLM2)",
    ),
    (
        "overhead",
        "overhead",
        "per-step decode overhead vs vanilla: a 32-layer tiny Llama, batch 1, any device",
    ),
    ("soak", "soak", "`vllm serve` on 127.0.0.1 under mixed streamed load for a set time; pool empty after"),
    (
        "multiturn",
        "multiturn",
        "multi-turn VLM conversations, per turn: accuracy, TTFT and KV held; vanilla + prefix caching vs "
        "re-compression vs an exact shared image prefix",
    ),
    (
        "profile-decode",
        "profile_decode",
        "GPU: batch-1 ms/token and a cProfile of decode steps, vanilla vs policies",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-kvmm", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("policies", help="list every registered KV policy")
    sp.set_defaults(func=_cmd_policies)

    sp = sub.add_parser(
        "prepare-models", help="convert the embedded SmolLM2 GGUF and assemble the VLM (Hugging Face folders)"
    )
    sp.set_defaults(func=_cmd_prepare_models)

    sp = sub.add_parser(
        "demo",
        help="serve the embedded VLM with `vllm serve --kv-policy meda` and ask it about 16 real images "
        "(--text: SmolLM2 and a long document; --reference: the dense reference under several policies)",
    )
    sp.add_argument("--text", action="store_true", help="SmolLM2 and a long document instead of the VLM")
    sp.add_argument("--images", type=int, default=16, help="images in the VLM prompt (64 tokens each)")
    sp.add_argument("--policy", default="meda", help="the server's policy")
    sp.add_argument("--compare", default="full,snapkv", help="per-request policies to compare against")
    sp.add_argument("--reference", action="store_true", help="dense Hugging Face reference, no vLLM")
    sp.add_argument("--policies", default="full,snapkv,pyramidkv,h2o,streamingllm,lookm,meda,hae")
    sp.add_argument(
        "--budget", type=float, default=None, help="fraction of prompt KV kept, in (0, 1] (VLM 0.2, text 0.5)"
    )
    sp.add_argument("--max-new-tokens", type=int, default=None)
    sp.add_argument("--doc-words", type=int, default=900, help="length of the document in the prompt")
    sp.set_defaults(func=_cmd_demo)

    bench = sub.add_parser("bench", help="measurements").add_subparsers(dest="bench", required=True)
    sp = bench.add_parser(
        "quality",
        help="text: perplexity / agreement with the full cache on SmolLM2; --model vlm: accuracy on held-out "
        "multi-image tasks of the embedded VLM; both through the dense reference and vLLM side by side",
    )
    sp.add_argument(
        "--model", default=None, help="`vlm` (the embedded VLM) or an assembled VLM folder; unset: text"
    )
    sp.add_argument(
        "--policies", default="snapkv,pyramidkv,h2o,streamingllm,lookm,meda,hae", help=VARIANT_HELP
    )
    sp.add_argument("--budgets", default="1.0,0.5,0.3,0.2,0.1")
    sp.add_argument(
        "--tasks", default=None, help="--model: task:images:contexts,... (default: 3 groups, 320 prompts)"
    )
    sp.add_argument("--engines", default="dense,vllm", help="dense, vllm or both")
    sp.add_argument(
        "--primary",
        default="vllm",
        choices=["vllm", "dense"],
        help="--model: the engine that answers every prompt (dense: one prefill per prompt for all cases)",
    )
    sp.add_argument(
        "--oracle-prompts",
        default="64",
        help="--model: prompts the other engine runs (a fixed subset spread over the plan), or `all`",
    )
    sp.add_argument("--device", default="cpu", help="cpu (float32) or cuda (bfloat16)")
    sp.add_argument("--prompt-tokens", type=int, default=1536)
    sp.add_argument("--cont-tokens", type=int, default=256)
    sp.add_argument("--gen-tokens", type=int, default=32)
    sp.add_argument("--segments", type=int, default=2, help="text: windows per text")
    sp.add_argument(
        "--texts",
        default="gpl3,python-reference,idle-help",
        help="text: which embedded texts (vllm_kvmm.data)",
    )
    sp.add_argument(
        "--out", default=None, help="JSON (+ PNG next to it); default out/quality_{text,vlm}.json"
    )
    sp.set_defaults(func=_cmd_bench_quality)
    sp = bench.add_parser(
        "retrieval", help="pass-key retrieval on SmolLM2 per policy and budget, dense reference and vLLM"
    )
    sp.add_argument(
        "--policies", default="full,snapkv,pyramidkv,h2o,streamingllm,lookm,meda", help=VARIANT_HELP
    )
    sp.add_argument("--budgets", default="1.0,0.5,0.3,0.2,0.1")
    sp.add_argument(
        "--contexts",
        default="1024,2048",
        help="prompt lengths in tokens (SmolLM2: up to 8176, its 8192 positions less the answer)",
    )
    sp.add_argument("--samples", type=int, default=4, help="prompts per context (key depths spread evenly)")
    sp.add_argument("--engines", default="dense,vllm")
    sp.add_argument("--device", default="cpu", help="cpu (float32) or cuda (bfloat16)")
    sp.add_argument("--out", default="out/retrieval.json")
    sp.set_defaults(func=_cmd_bench_retrieval)
    for name, module, help_text in MODULE_BENCHES:
        # Each module has ``build_parser(p)`` and ``run(args) -> int`` and also runs as ``python -m``.
        mod = importlib.import_module(f"vllm_kvmm.bench.{module}")
        sp = bench.add_parser(name, help=help_text)
        mod.build_parser(sp)
        sp.set_defaults(func=mod.run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except PolicyError as e:
        print(f"vllm-kvmm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
