"""``vllm-kvmm bench quality`` (text) on the CPU build: perplexity through vLLM by teacher forcing equals a
plain Hugging Face forward, the vLLM path equals the dense reference in every case, and a policy at budget
1.0 is the full cache."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_kvmm.bench.quality_text import QualityRow, text_segments

ARGS = dict(prompt=192, cont=24, gen=8, segments=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> tuple[list[QualityRow], Path]:
    # Own process: an in-process engine would reconfigure the worker state the session's engines share.
    out = tmp_path_factory.mktemp("quality_text") / "q.json"
    cmd = [
        sys.executable, "-m", "vllm_kvmm.cli", "bench", "quality", "--policies", "snapkv,streamingllm",
        "--budgets", "1.0,0.5", "--prompt-tokens", str(ARGS["prompt"]), "--cont-tokens", str(ARGS["cont"]),
        "--gen-tokens", str(ARGS["gen"]), "--segments", str(ARGS["segments"]), "--texts", "gpl3",
        "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [QualityRow(**r) for r in json.loads(out.read_text())["rows"]], out


def _row(rows: list[QualityRow], policy: str, budget: float, engine: str) -> QualityRow:
    return next(r for r in rows if (r.policy, r.budget, r.engine) == (policy, budget, engine))


def test_every_case_on_both_paths_and_the_files(run: tuple[list[QualityRow], Path]) -> None:
    rows, out = run
    cases = {(r.policy, r.budget, r.engine) for r in rows}
    expect = {("full", 1.0)} | {(p, b) for p in ("snapkv", "streamingllm") for b in (1.0, 0.5)}
    assert cases == {(p, b, e) for p, b in expect for e in ("dense", "vllm")}
    assert out.with_suffix(".png").stat().st_size > 0
    assert set(json.loads(out.with_suffix(".cases.json").read_text())["cases"]) == {
        f"{e}|{p}|{b:g}" for p, b in expect for e in ("dense", "vllm")
    }


def test_vllm_path_equals_the_dense_reference(run: tuple[list[QualityRow], Path]) -> None:
    rows, _ = run
    for r in rows:
        assert (r.agree_top1, r.agree_greedy) == (1.0, 1.0), r
        assert r.max_dlogp is not None and r.max_dlogp < 1e-3, r
        other = _row(rows, r.policy, r.budget, "vllm" if r.engine == "dense" else "dense")
        assert r.ppl == pytest.approx(other.ppl, rel=1e-4)


def test_forced_perplexity_equals_a_plain_forward(
    run: tuple[list[QualityRow], Path], smollm2_dir: Path
) -> None:
    """The full cache's perplexity, recomputed here from one Hugging Face forward per segment."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    nll = []
    for prompt, cont in text_segments(tok, ARGS["prompt"], ARGS["cont"], ARGS["segments"]):
        ids = torch.tensor([prompt + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), -1)
        nll += (-logp.gather(1, torch.tensor(cont)[:, None])[:, 0]).tolist()
    expected = math.exp(sum(nll) / len(nll))
    rows, _ = run
    assert expected > 1.5  # a real continuation, not the forced tokens' probability 1
    for engine in ("dense", "vllm"):
        assert _row(rows, "full", 1.0, engine).ppl == pytest.approx(expected, rel=1e-3)


def test_budget_one_is_the_full_cache_and_half_compresses(run: tuple[list[QualityRow], Path]) -> None:
    rows, _ = run
    for policy in ("snapkv", "streamingllm"):
        for engine in ("dense", "vllm"):
            same = _row(rows, policy, 1.0, engine)
            assert (same.dppl_pct, same.top1, same.greedy, same.kv) == (0.0, 1.0, 1.0, 1.0)
            half = _row(rows, policy, 0.5, engine)
            # 192-token prompt, block 16: exactly 6 of 12 blocks kept.
            assert half.kv == 0.5
            assert abs(half.dppl_pct) > 0.1 and half.top1 < 1.0
