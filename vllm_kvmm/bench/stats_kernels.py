"""Prefill statistics cost per policy: the torch path and the Triton kernels side by side, one layer.

What each policy's scoring adds to a prefill is the :class:`~vllm_kvmm.ops.StatsAccumulator` work of
every layer. This times it alone, on a LLaVA-1.5-7B-shaped layer (32 query and KV heads, head dim 128,
an 8k prompt holding 8 images of 576 tokens spread through the text), for the torch ops and the Triton
kernels, next to the layer's own causal attention (``scaled_dot_product_attention``) as the yardstick.
It also checks the two paths against each other on the very tensors it timed.

    vllm-kvmm bench stats --device cuda                       # the GPU numbers of docs/benchmarks.md
    TRITON_INTERPRET=1 vllm-kvmm bench stats --device cpu --tokens 256 --heads 4 --kv-heads 2 \\
        --head-dim 32 --images 2 --image-tokens 48            # a smoke run of both paths on CPU
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from vllm_kvmm.bench.cases import build_policy
from vllm_kvmm.ops import LayerStats, StatsAccumulator, StatsRequest
from vllm_kvmm.policies import PromptInfo

__all__ = ["build_parser", "run", "vision_layout"]


def vision_layout(num_tokens: int, images: int, image_tokens: int) -> torch.Tensor:
    """``[N]`` bool: ``images`` spans of ``image_tokens`` spread evenly through the text, text last.

    The layout of ``bench perf``'s prompts: equal text segments before each image and after the last.
    """
    if images * image_tokens >= num_tokens:
        raise ValueError(f"{images} × {image_tokens} image tokens do not fit {num_tokens} tokens with text")
    mask = torch.zeros(num_tokens, dtype=torch.bool)
    step = (num_tokens - images * image_tokens) // (images + 1)
    for k in range(images):
        s = (k + 1) * step + k * image_tokens
        mask[s : s + image_tokens] = True
    return mask


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn: Any, dev: torch.device, repeats: int) -> tuple[float, float, Any]:
    """Median milliseconds over ``repeats`` runs after one warm-up, peak extra MiB (CUDA), last result."""
    out = fn()  # warm-up: compilation, allocator
    _sync(dev)
    base = 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        _sync(dev)
        times.append((time.perf_counter() - t) * 1e3)
    peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if dev.type == "cuda" else math.nan
    return statistics.median(times), peak, out


def _layer_stats(
    request: StatsRequest, q: torch.Tensor, k: torch.Tensor, vision: torch.Tensor, chunk: int, kernels: str
) -> LayerStats:
    n, h, d = q.shape
    acc = StatsAccumulator(request, n, h, k.shape[1], vision, d**-0.5, kernels=kernels)  # type: ignore[arg-type]
    for s in range(0, n, chunk):  # vLLM's prefill chunks: the keys so far, the chunk's queries
        e = min(n, s + chunk)
        acc.update(q[s:e], k[:e], s)
    return acc.result()


def deviation(a: LayerStats, b: LayerStats) -> float:
    """Largest relative difference over the statistics both hold (tensors: relative to their max)."""
    worst = 0.0
    for f in LayerStats.__slots__:
        x, y = getattr(a, f), getattr(b, f)
        if x is None or y is None:
            continue
        x, y = x.double().cpu(), y.double().cpu()
        if x.dim() == 0:
            if math.isnan(float(y)):
                worst = max(worst, 0.0 if math.isnan(float(x)) else math.inf)
                continue
            worst = max(worst, abs(float(x - y)) / max(abs(float(y)), 1e-12))
        else:
            worst = max(worst, float((x - y).abs().max()) / max(float(y.abs().max()), 1e-12))
    return worst


def measure(a: argparse.Namespace) -> list[dict[str, Any]]:
    """Time every policy's statistics for each of ``a.kernels``; returns (and writes) the rows."""
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    gen = torch.Generator(device=dev).manual_seed(0)
    n = a.tokens
    # Spread logits (×1.5) so the maps are neither uniform nor one-hot.
    q = (torch.randn(n, a.heads, a.head_dim, device=dev, generator=gen) * 1.5).to(dtype)
    k = (torch.randn(n, a.kv_heads, a.head_dim, device=dev, generator=gen) * 1.5).to(dtype)
    v = torch.randn(n, a.kv_heads, a.head_dim, device=dev, generator=gen).to(dtype)
    vision = vision_layout(n, a.images, a.image_tokens)
    info = PromptInfo(n, vision, a.layers, a.kv_heads)
    kernels = [x for x in a.kernels.split(",") if x]

    def attention() -> torch.Tensor:
        qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(
            qt, kt, vt, is_causal=True, enable_gqa=a.heads != a.kv_heads
        )

    attn_ms, attn_mib, _ = _timed(attention, dev, a.repeats)
    rows: list[dict[str, Any]] = []
    for name in [p for p in a.policies.split(",") if p]:
        request = build_policy(name, 0.2).stats_request(info)
        if request.empty:
            continue
        wants = [f for f in ("colsum", "window", "entropy", "cross_entropy", "t2v") if getattr(request, f)]
        results: dict[str, LayerStats] = {}
        for kern in kernels:
            ms, mib, stats = _timed(
                lambda kern=kern, req=request: _layer_stats(req, q, k, vision, a.chunk, kern), dev, a.repeats
            )
            results[kern] = stats
            rows.append(
                {
                    "policy": name,
                    "statistics": "+".join(wants),
                    "kernels": kern,
                    "ms_per_layer": ms,
                    "ms_per_prompt": ms * a.layers,
                    "vs_attention": ms / attn_ms,
                    "peak_extra_mib": mib,
                    "max_rel_dev_vs_torch": (
                        deviation(stats, results["torch"]) if kern != "torch" and "torch" in results else None
                    ),
                }
            )
    for row in rows:
        ref = next((r for r in rows if r["policy"] == row["policy"] and r["kernels"] == "torch"), None)
        row["speedup_vs_torch"] = ref["ms_per_layer"] / row["ms_per_layer"] if ref else None
    meta = {
        "machine": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "shape": {
            f: getattr(a, f) for f in ("tokens", "heads", "kv_heads", "head_dim", "images", "image_tokens")
        },
        "chunk": a.chunk,
        "layers": a.layers,
        "attention_ms_per_layer": attn_ms,
        "attention_peak_extra_mib": attn_mib,
        "rows": rows,
    }
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(meta, indent=1))
    print(table(meta))
    return rows


def table(meta: dict[str, Any]) -> str:
    s = meta["shape"]
    lines = [
        f"{meta['machine']}, {meta['dtype']}, {s['tokens']} tokens "
        f"({s['images']} × {s['image_tokens']} image), "
        f"{s['heads']}/{s['kv_heads']} heads × {s['head_dim']}, prefill chunk {meta['chunk']}; "
        f"causal attention of one layer: {meta['attention_ms_per_layer']:.2f} ms",
        "",
        "| policy | statistics | kernels | ms / layer | ms / prompt | × attention | speed-up "
        "| peak extra MiB | max rel. dev. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in meta["rows"]:
        dev = r["max_rel_dev_vs_torch"]
        sp = r["speedup_vs_torch"]
        lines.append(
            f"| {r['policy']} | {r['statistics']} | {r['kernels']} | {r['ms_per_layer']:.2f} | "
            f"{r['ms_per_prompt']:.0f} | {r['vs_attention']:.2f}× | {'—' if sp is None else f'{sp:.1f}×'} | "
            f"{_fmt(r['peak_extra_mib'], '.0f')} | {_fmt(dev, '.1e')} |"
        )
    return "\n".join(lines)


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None or math.isnan(x) else format(x, spec)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="vllm-kvmm bench stats", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--policies", default="snapkv,pyramidkv,h2o,lookm,meda,hae")
    p.add_argument(
        "--kernels", default="torch,triton", help="torch, triton or both (triton on CPU: TRITON_INTERPRET=1)"
    )
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--image-tokens", type=int, default=576)
    p.add_argument("--chunk", type=int, default=8192, help="prefill chunk (queries per update)")
    p.add_argument("--layers", type=int, default=32, help="layers per prompt, for the per-prompt column")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON file for the rows")
    return p


def run(a: argparse.Namespace) -> int:
    """``vllm-kvmm bench stats``: 0 when rows were measured."""
    return 0 if measure(a) else 1


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
