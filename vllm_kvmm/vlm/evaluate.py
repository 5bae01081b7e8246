"""Full-cache accuracy of the assembled VLM on the held-out tasks (transformers, dense).

``python -m vllm_kvmm.vlm.evaluate [--sizes 2,4,8,16,24,32] [--contexts 10] [--out out/vlm_eval.json]``

Two ways to score, equal by construction and checked against each other:

* :func:`generate_answers`: ``model.generate`` greedy, one prompt at a time (what the tests and vLLM do);
* :func:`packed_accuracy`: teacher forcing on packed contexts (:func:`vllm_kvmm.vlm.model.pack`): a
  question is right when every answer token and the closing ``<|im_end|>`` are the argmax, which is exactly
  when greedy decoding outputs the answer and stops. ~10× cheaper for many questions per context.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vllm_kvmm.vlm import data
from vllm_kvmm.vlm.model import block_correct, pack

__all__ = ["chance", "generate_answers", "load_vlm", "packed_accuracy", "run_suite", "verify_vlm"]


def load_vlm(path: Path) -> tuple[Any, Any]:
    """``(model, processor)`` of an assembled folder (float32, eval)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path)


def verify_vlm(path: Path) -> list[tuple[str, str]]:
    """Greedy answers to three held-out questions (one image; 4 images: needle and lookup).

    Returns ``[(question, answer)]``; raises unless every answer is right (a broken assembly, tower or
    processor fails here, at set-up, rather than in a benchmark).
    """
    model, processor = load_vlm(path)
    exs = [
        data.examples(data.eval_contexts("single", 1, 1, seed=0))[0],
        data.examples(data.eval_contexts("needle", 4, 1, seed=0))[0],
        data.examples(data.eval_contexts("lookup", 4, 1, seed=0))[0],
    ]
    got = generate_answers(model, processor, exs)
    pairs = [(ex.question.text, normalize(g)) for ex, g in zip(exs, got, strict=True)]
    wrong = [
        (q, a, ex.question.answer) for (q, a), ex in zip(pairs, exs, strict=True) if a != ex.question.answer
    ]
    if wrong:
        raise RuntimeError(
            f"the VLM at {path} answers held-out questions wrongly (question, got, want): {wrong}"
        )
    return pairs


def normalize(text: str) -> str:
    return text.strip().lower()


@torch.no_grad()
def generate_answers(
    model: Any, processor: Any, examples: Sequence[data.Example], max_new_tokens: int = 6
) -> list[str]:
    """Greedy answers (special tokens stripped) of examples, one ``generate`` call each."""
    from vllm_kvmm.reference import prompt_from_messages

    out = []
    for ex in examples:
        p = prompt_from_messages(processor, ex.messages(), ex.context.images())
        gen = model.generate(
            input_ids=p.input_ids[None], **p.mm_inputs, max_new_tokens=max_new_tokens, do_sample=False
        )
        out.append(processor.tokenizer.decode(gen[0, p.num_tokens :], skip_special_tokens=True))
    return out


@torch.no_grad()
def packed_logits(model: Any, processor: Any, ctx: data.Context) -> tuple[Any, torch.Tensor]:
    """``(packed, logits [M, vocab])`` of a context through the assembled LLaVA model."""
    tok = processor.tokenizer
    p = pack(tok, ctx, model.config.image_token_index)
    pixels = processor.image_processor(images=ctx.images(), return_tensors="pt")["pixel_values"]
    feats = model.model.get_image_features(pixel_values=pixels)
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])
    lm = model.model.language_model
    emb = lm.get_input_embeddings()(p.input_ids)
    emb = emb.index_put((p.image_positions,), feats.to(emb.dtype))
    hidden = lm(
        inputs_embeds=emb[None],
        attention_mask=p.mask[None, None],
        position_ids=p.position_ids[None],
        use_cache=False,
    ).last_hidden_state[0]
    return p, model.lm_head(hidden[p.label_positions])


def packed_accuracy(
    model: Any, processor: Any, contexts: Sequence[data.Context]
) -> dict[str, tuple[int, int]]:
    """``{task: (correct, total)}`` by teacher forcing (exact greedy-match equivalent)."""
    out: dict[str, list[int]] = {}
    for ctx in contexts:
        p, logits = packed_logits(model, processor, ctx)
        for q, ok in zip(ctx.questions, block_correct(p, logits).tolist(), strict=True):
            c = out.setdefault(q.task, [0, 0])
            c[0] += int(ok)
            c[1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def chance(task: str, n_images: int) -> float:
    """Accuracy of uniform guessing among the answers the task allows."""
    return {
        "single": 0.5,  # most questions are yes/no; the others have 3 or 8 answers
        "needle": 1 / n_images,
        "color_k": 1 / len(data.COLORS),
        "shape_k": 1 / len(data.SHAPES),
        "count": 1 / (n_images + 1),
        "order": 0.5,
    }[task]


def run_suite(
    model: Any,
    processor: Any,
    *,
    sizes: Sequence[int] = (2, 4, 8, 16, 24, 32),
    contexts: int = 10,
    single_images: int = 60,
    split: str = "test",
    seed: int = 0,
    log: Any = print,
) -> list[dict[str, Any]]:
    """Accuracy rows ``{task, n_images, correct, total, acc, chance, tokens}`` on ``split``."""
    rows = []
    plan: list[tuple[str, int, int]] = [("single", 1, single_images)]
    for n in sizes:
        plan.append(("needle", n, contexts))
        if n in (4, 16):
            plan += [("lookup", n, contexts), ("count", n, contexts), ("order", n, contexts)]
    for family, n, count in plan:
        t0 = time.perf_counter()
        ctxs = data.eval_contexts(family, n, count, split=split, seed=seed)
        res = packed_accuracy(model, processor, ctxs)
        tokens = pack(processor.tokenizer, ctxs[0], model.config.image_token_index).position_ids.max() + 1
        for task, (c, total) in sorted(res.items()):
            row = {
                "task": task,
                "n_images": n,
                "correct": c,
                "total": total,
                "acc": round(c / total, 3),
                "chance": round(chance(task, n), 3),
                "prompt_tokens": int(tokens),
            }
            rows.append(row)
            log(
                f"{task:>8} N={n:<3} acc {row['acc']:.3f} ({c}/{total}, chance {row['chance']:.3f}, "
                f"~{row['prompt_tokens']} tokens) [{time.perf_counter() - t0:.0f} s]"
            )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    from vllm_kvmm.vlm.assemble import ensure_vlm

    p = argparse.ArgumentParser(prog="python -m vllm_kvmm.vlm.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="assembled folder (default: ensure_vlm())")
    p.add_argument("--sizes", default="2,4,8,16,24,32")
    p.add_argument("--contexts", type=int, default=10, help="contexts per (task, size)")
    p.add_argument("--single-images", type=int, default=60)
    p.add_argument("--split", default="test", choices=data.SPLITS)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="out/vlm_eval.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else ensure_vlm()
    model, processor = load_vlm(path)
    rows = run_suite(
        model,
        processor,
        sizes=[int(s) for s in args.sizes.split(",")],
        contexts=args.contexts,
        single_images=args.single_images,
        split=args.split,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(path), "split": args.split, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
