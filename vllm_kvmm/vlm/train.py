"""Train the VLM's artifacts: ``python -m vllm_kvmm.vlm.train [--stage tower|lm|all] [--device cuda]``.

Stage ``tower``: the CLIP ViT on the easy-VQA ``train`` images (per-patch object labels, see
:mod:`vllm_kvmm.vlm.encoder`) → ``artifacts/tower.safetensors``.

Stage ``lm``: the tower frozen (its features computed once), SmolLM2 frozen; the LLaVA projector and rank-8
LoRA adapters on every linear layer of SmolLM2's 30 blocks are trained on the mixed task stream of
:func:`vllm_kvmm.vlm.data.train_contexts` (single-image package questions and 2–16-image needle, lookup,
count and order questions), loss on the answer tokens only, with the packing of
:mod:`vllm_kvmm.vlm.model` → ``artifacts/projector.safetensors``, ``artifacts/lora.safetensors``.

Every run is seeded (``--seed``, data order included) and writes ``artifacts/SHA256SUMS`` and
``artifacts/training.json`` (arguments, losses, timings, validation accuracies). Results are bit-exact for a
given device, thread count and library versions. Never touches the ``test`` split. Heavy: run with
``nice``; on 2 CPU cores stage ``tower`` takes ~8 min and stage ``lm`` ~1 h (``--max-minutes`` and
``--resume`` cut it into pieces; docs/vlm.md). The defaults reproduce the artifacts in the repository.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vllm_kvmm.vlm import data
from vllm_kvmm.vlm.assemble import ARTIFACTS, build_tokenizer, write_sums
from vllm_kvmm.vlm.encoder import image_processor, patch_features, pixel_values, train_tower, vision_config
from vllm_kvmm.vlm.model import Packed, VLMTrainModel, block_correct, lora_state, pack

__all__ = ["evaluate_packed", "feature_bank", "load_tower", "main", "train_lm"]


def log(msg: str) -> None:
    print(msg, flush=True)


def save_tower(tower: torch.nn.Module, folder: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in tower.state_dict().items()}
    save_file(sd, folder / "tower.safetensors", metadata={"format": "pt"})


def load_tower(folder: Path = ARTIFACTS) -> torch.nn.Module:
    """The trained ``CLIPVisionModel`` (CPU, float32, eval) from ``tower.safetensors``."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel(vision_config())
    tower.load_state_dict(load_file(folder / "tower.safetensors"), strict=True)
    return tower.to(torch.float32).eval()


def feature_bank(
    tower: torch.nn.Module, splits: Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, dict[int, int]]]:
    """Tower features of every image of ``splits``: ``{split: [n, 64, 128]}`` and ``{split: {id: row}}``."""
    proc = image_processor()
    bank, index = {}, {}
    for split in splits:
        ids = data.image_ids(split)
        bank[split] = patch_features(tower, pixel_values([data.load_image(split, i) for i in ids], proc))
        index[split] = {i: r for r, i in enumerate(ids)}
    return bank, index


def _features(
    ctx: data.Context, bank: dict[str, torch.Tensor], index: dict[str, dict[int, int]]
) -> torch.Tensor:
    return bank[ctx.split][[index[ctx.split][i] for i in ctx.image_ids]]


@torch.no_grad()
def evaluate_packed(
    model: VLMTrainModel,
    tok: Any,
    contexts: Sequence[data.Context],
    bank: dict[str, torch.Tensor],
    index: dict[str, dict[int, int]],
    device: str,
) -> dict[str, tuple[int, int]]:
    """``{task: (correct, total)}``: exact greedy match computed by teacher forcing on packed contexts."""
    model.eval()
    image_id = tok.convert_tokens_to_ids("<image>")
    out: dict[str, list[int]] = {}
    for ctx in contexts:
        p = pack(tok, ctx, image_id)
        ok = block_correct(p, model(p, _features(ctx, bank, index).to(device)).float())
        for q, good in zip(ctx.questions, ok.tolist(), strict=True):
            c = out.setdefault(q.task, [0, 0])
            c[0] += int(good)
            c[1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def word_table(lm: torch.nn.Module, tok: Any) -> torch.Tensor:
    """``[12, 576]`` LM input embeddings of the patch words (:data:`~vllm_kvmm.vlm.encoder.WORDS`).

    The first token of ``" " + word`` (``" teal"`` is two tokens; its first one stands for it).
    """
    from vllm_kvmm.vlm.encoder import WORDS

    ids = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in WORDS]
    return lm.get_input_embeddings().weight[ids].detach().clone()


def prealign_projector(
    model: VLMTrainModel,
    tok: Any,
    bank: dict[str, torch.Tensor],
    *,
    steps: int,
    seed: int,
    device: str,
) -> float:
    """Fit the projector alone so that each patch token starts as the LM embedding of its patch word.

    Object patches → ``" red"`` / ``" circle"`` (checkerboard, :func:`~vllm_kvmm.vlm.encoder.word_targets`),
    background → ``" ."`` (``train`` split). The frozen LM then reads an image much like text from the
    first step; the LM loss reshapes the projector freely afterwards. No LM pass: seconds. Returns the
    final mean-squared error.
    """
    from vllm_kvmm.vlm.encoder import patch_targets, word_targets

    table = word_table(model.lm, tok).to(device)
    words = word_targets(patch_targets("train", data.image_ids("train"))[0])
    feats = bank["train"]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.projector.parameters(), lr=3e-3)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        idx = torch.randint(0, feats.shape[0], (16,), generator=gen)
        pred = model.projector(feats[idx].to(device))
        loss = torch.nn.functional.mse_loss(pred, table[words[idx].to(device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


def val_contexts(seed: int) -> list[data.Context]:
    """A small validation set on the ``val`` split (never the test split)."""
    ctxs = data.eval_contexts("single", 1, 12, split="val", seed=seed)
    for task in ("needle", "lookup", "count", "order"):
        ctxs += data.eval_contexts(task, 8, 2, split="val", seed=seed)
    ctxs += data.eval_contexts("needle", 16, 2, split="val", seed=seed)
    return ctxs


def block_weights(p: Packed) -> torch.Tensor:
    """``[M]``: ``1 / (labels of its block)`` per label, so every question weighs the same in the loss.

    Without it the long training-only answers (``list``: ~5 tokens an image) would drown the one-token
    answers of the evaluated tasks.
    """
    sizes = torch.bincount(p.label_block, minlength=p.n_blocks).float()
    return 1.0 / sizes[p.label_block]


def default_checkpoint() -> Path:
    from vllm_kvmm.models.smollm2 import default_home

    return default_home() / "vlm-train" / "lm-checkpoint.pt"


def train_lm(
    *,
    seed: int,
    steps: int,
    contexts_per_step: int,
    lr: float,
    rank: int,
    alpha: float,
    device: str,
    artifacts: Path,
    validate: bool,
    prealign_steps: int = 0,
    checkpoint: Path | None = None,
    resume: bool = False,
    max_minutes: float = 0.0,
    save_every: int = 10,
    drop_background: float = 0.0,
    drop_until: float = 0.0,
    init_from: Path | None = None,
) -> dict[str, Any] | None:
    """Stage ``lm``; returns its metrics and writes the projector and LoRA artifacts.

    ``checkpoint``: where the trainable state, optimizer and step are saved every ``save_every`` steps;
    ``resume``: continue from it (the data stream is replayed to the same position, so a run cut into
    pieces gives the same result as one run). ``max_minutes``: stop (after saving) once that much wall time
    has passed in this call; returns ``None`` then, and the caller re-runs with ``resume``.
    ``drop_background``: during the first ``drop_until`` fraction of the steps, leave out that fraction of
    each image's background patch tokens (object patches always stay; positions stay those of the full
    prompt): ~2× cheaper steps; the last steps see every token, as inference does.
    ``init_from``: start the projector and adapters from a previous run's artifacts (a continuation with a
    fresh schedule and data stream: use another ``seed``) instead of pre-aligning the projector.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from vllm_kvmm.models.smollm2 import ensure_smollm2

    t_call = time.perf_counter()
    torch.manual_seed(seed)
    random.seed(seed)
    tower = load_tower(artifacts)
    bank, index = feature_bank(tower, ("train", "val"))
    log(
        f"[lm] tower features of {sum(b.shape[0] for b in bank.values())} images "
        f"({time.perf_counter() - t_call:.0f} s)"
    )
    smol = ensure_smollm2()
    tok = build_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    lm = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32)
    lm.config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = VLMTrainModel(lm, vision_config().hidden_size, rank, alpha).to(device)
    params = model.trainable()
    n_params = sum(p.numel() for p in params)
    # The pre-aligned projector already speaks the LM's words: it moves 4× slower than the adapters.
    groups = [
        {"params": [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n], "lr": lr},
        {"params": list(model.projector.parameters()), "lr": lr * 0.25},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10 %
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    state: dict[str, Any] = {"step": 0, "history": [], "tokens": 0, "seconds": 0.0}
    ckpt = checkpoint if checkpoint is not None else default_checkpoint()
    if resume and ckpt.is_file():
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(saved["trainable"], strict=False)
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        state = saved["state"]
        log(f"[lm] resumed from {ckpt} at step {state['step']}")
    elif init_from is not None:
        from safetensors.torch import load_file

        model.projector.load_state_dict(load_file(init_from / "projector.safetensors"))
        result = model.lm.load_state_dict(load_file(init_from / "lora.safetensors"), strict=False)
        if result.unexpected_keys:
            raise ValueError(
                f"{init_from}/lora.safetensors does not fit rank {rank}: {result.unexpected_keys[:2]}"
            )
        log(f"[lm] projector and adapters initialised from {init_from}")
    elif prealign_steps:
        t1 = time.perf_counter()
        pl = prealign_projector(model, tok, bank, steps=prealign_steps, seed=seed, device=device)
        log(f"[lm] projector pre-aligned to word embeddings: mse {pl:.4f} ({time.perf_counter() - t1:.0f} s)")
    log(f"[lm] trainable parameters: {n_params / 1e6:.2f} M (projector + LoRA rank {rank})")

    def save_checkpoint() -> None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        trainable = {
            k: v for k, v in model.state_dict().items() if "lora_" in k or k.startswith("projector.")
        }
        tmp = ckpt.with_suffix(".tmp")
        torch.save(
            {"trainable": trainable, "opt": opt.state_dict(), "sched": sched.state_dict(), "state": state},
            tmp,
        )
        tmp.replace(ckpt)

    from vllm_kvmm.vlm.encoder import patch_targets

    objects = {"train": patch_targets("train", data.image_ids("train"))[0] > 0}  # [n, 64] object patches

    def keep_mask(ctx: data.Context, step: int, j: int) -> torch.Tensor | None:
        if drop_background <= 0 or step >= drop_until * steps:
            return None
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + j)
        obj = objects[ctx.split][[index[ctx.split][i] for i in ctx.image_ids]]
        return obj | (torch.rand(obj.shape, generator=gen) >= drop_background)

    stream = data.train_contexts(seed)
    for _ in range(state["step"] * contexts_per_step):  # replay the stream to the saved position
        next(stream)
    recent: dict[str, list[int]] = {}
    t_piece = time.perf_counter()
    seconds_before = state["seconds"]
    while state["step"] < steps:
        model.train()
        ctxs = [next(stream) for _ in range(contexts_per_step)]
        packs: list[Packed] = [
            pack(tok, c, image_id, keep_mask(c, state["step"], j)) for j, c in enumerate(ctxs)
        ]
        n_blocks = sum(p.n_blocks for p in packs)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for ctx, p in zip(ctxs, packs, strict=True):
            logits = model(p, _features(ctx, bank, index).to(device))
            loss = (
                block_weights(p).to(device)
                * torch.nn.functional.cross_entropy(
                    logits.float(), p.label_targets.to(device), reduction="none"
                )
            ).sum()
            (loss / n_blocks).backward()
            loss_sum += float(loss.detach())
            ok = block_correct(p, logits.detach())
            for q, good in zip(ctx.questions, ok.tolist(), strict=True):
                recent.setdefault(q.task, []).append(int(good))
            state["tokens"] += p.num_tokens
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        state["step"] += 1
        state["seconds"] = seconds_before + time.perf_counter() - t_piece
        state["history"].append(
            {
                "step": state["step"],
                "loss": round(loss_sum / n_blocks, 4),
                "seconds": round(state["seconds"], 1),
            }
        )
        step = state["step"]
        if step % 10 == 0 or step == 1:
            tps = state["tokens"] / max(state["seconds"], 1e-9)
            per = " ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in sorted(recent.items()))
            recent.clear()
            log(
                f"[lm] step {step}/{steps} loss {loss_sum / n_blocks:.4f} | {per} "
                f"({state['seconds']:.0f} s, {tps:.0f} tok/s)"
            )
        out_of_time = max_minutes > 0 and time.perf_counter() - t_call > 60 * max_minutes
        if step < steps and (step % save_every == 0 or out_of_time):
            save_checkpoint()
        if out_of_time and step < steps:
            log(f"[lm] stopped at step {step}/{steps} after {max_minutes} min: re-run with --resume")
            return None
    proj = {k: v.detach().cpu().contiguous() for k, v in model.projector.state_dict().items()}
    save_file(proj, artifacts / "projector.safetensors", metadata={"format": "pt"})
    meta = {"format": "pt", "rank": str(rank), "alpha": str(alpha)}
    save_file(lora_state(model.lm), artifacts / "lora.safetensors", metadata=meta)
    metrics: dict[str, Any] = {
        "train_seconds": round(state["seconds"], 1),
        "train_tokens": state["tokens"],
        "trainable_params": n_params,
        "history": state["history"],
    }
    if validate:
        t1 = time.perf_counter()
        res = evaluate_packed(model, tok, val_contexts(seed), bank, index, device)
        metrics["val"] = {k: round(c / n, 3) for k, (c, n) in sorted(res.items())}
        metrics["val_counts"] = {k: list(v) for k, v in sorted(res.items())}
        log(f"[lm] validation ({time.perf_counter() - t1:.0f} s): {metrics['val']}")
    return metrics


def _update_record(artifacts: Path, key: str, value: dict[str, Any]) -> None:
    path = artifacts / "training.json"
    rec = json.loads(path.read_text()) if path.is_file() else {}
    rec[key] = value
    path.write_text(json.dumps(rec, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_kvmm.vlm.train", description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=("tower", "lm", "all"), default="all")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    p.add_argument("--tower-epochs", type=int, default=20)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of stage lm")
    p.add_argument("--contexts-per-step", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--prealign-steps", type=int, default=300, help="projector pre-alignment steps (0: off)")
    p.add_argument("--checkpoint", default=None, help="stage lm checkpoint (default: under $VLLM_KVMM_HOME)")
    p.add_argument("--resume", action="store_true", help="continue stage lm from --checkpoint")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop stage lm after this long (0: never)")
    p.add_argument(
        "--drop-background",
        type=float,
        default=0.75,
        help="fraction of background image tokens left out in the early steps of stage lm",
    )
    p.add_argument("--drop-until", type=float, default=0.8, help="fraction of the steps that drop tokens")
    p.add_argument("--init-from", default=None, help="stage lm: start from the projector/LoRA in this folder")
    p.add_argument("--no-validate", action="store_true", help="skip the val-split check at the end")
    p.add_argument("--out", default=str(ARTIFACTS), help="artifact folder (default: the package's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    common = {
        "seed": args.seed,
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if args.stage in ("tower", "all"):
        tower, m = train_tower(seed=args.seed, epochs=args.tower_epochs, device=args.device, log=log)
        save_tower(tower, out)
        _update_record(out, "tower", {**common, "epochs": args.tower_epochs, **m})
    if args.stage in ("lm", "all"):
        m = train_lm(
            seed=args.seed,
            steps=args.steps,
            contexts_per_step=args.contexts_per_step,
            lr=args.lr,
            rank=args.rank,
            alpha=args.alpha,
            device=args.device,
            artifacts=out,
            validate=not args.no_validate,
            prealign_steps=args.prealign_steps,
            checkpoint=Path(args.checkpoint) if args.checkpoint else None,
            resume=args.resume,
            max_minutes=args.max_minutes,
            drop_background=args.drop_background,
            drop_until=args.drop_until,
            init_from=Path(args.init_from) if args.init_from else None,
        )
        if m is None:
            return 3
        hp = {
            k: getattr(args, k)
            for k in (
                "steps",
                "contexts_per_step",
                "lr",
                "rank",
                "alpha",
                "prealign_steps",
                "drop_background",
                "drop_until",
                "init_from",
            )
        }
        _update_record(out, "lm_continued" if args.init_from else "lm", {**common, **hp, **m})
    if all((out / n).is_file() for n in ("tower.safetensors", "projector.safetensors", "lora.safetensors")):
        write_sums(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
