"""The README's main job, small: `vllm serve VLM --kv-policy meda` asked about held-out images through the
OpenAI client (image_url parts), with `full` per request; the prompts are the processor's, the full cache
answers right, and MEDA gives blocks back to the pool."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_kvmm.vlm import data

pytestmark = pytest.mark.skipif(
    not data.easy_vqa_available(), reason="easy-vqa (the images) is not installed: run scripts/setup.sh"
)


def test_vlm_demo_over_the_openai_api(smollm2_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vllm_kvmm.serve_demo import run_vlm_demo
    from vllm_kvmm.vlm.assemble import build_tokenizer
    from vllm_kvmm.vlm.model import prompt_ids

    results = run_vlm_demo(policy="meda", budget=0.2, compare=["full"], n_images=4, sheet=None)
    assert [r.run for r in results] == ["meda (server default, budget 0.2)", "full"] * 3
    tok = build_tokenizer()
    for r in results:
        # The chat API renders the images exactly as the Hugging Face processor does (64 tokens each).
        assert r.prompt_tokens == len(prompt_ids(tok, 4, r.question, tok.convert_tokens_to_ids("<image>")))
    full = [r for r in results if r.run == "full"]
    meda = [r for r in results if r.run != "full"]
    assert all(r.right for r in full), full
    assert all(r.blocks_freed == 0 for r in full)
    assert all(r.blocks_freed > 0 for r in meda), meda
    out = capsys.readouterr().out
    assert "truth: 1 " in out and "server stopped" in out
