"""``vllm-kvmm bench stats``: its prompt layout, its torch-vs-Triton check, and one interpreted run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_kvmm.bench.stats_kernels import deviation, vision_layout
from vllm_kvmm.ops import LayerStats

REPO = Path(__file__).resolve().parents[2]


def test_vision_layout_spreads_images_through_the_text():
    mask = vision_layout(20, 2, 3)  # 14 text tokens: 4 before each image, 6 after the last
    assert torch.nonzero(mask).flatten().tolist() == [4, 5, 6, 11, 12, 13]
    with pytest.raises(ValueError, match="do not fit"):
        vision_layout(10, 2, 5)


def test_deviation_is_relative_to_the_reference():
    ref = LayerStats(
        colsum=torch.tensor([[2.0, 4.0]]), entropy=torch.tensor(2.0), entropy_tv=torch.tensor(math.nan)
    )
    assert deviation(ref, ref) == 0.0
    off = LayerStats(
        colsum=torch.tensor([[2.0, 4.2]]), entropy=torch.tensor(2.0), entropy_tv=torch.tensor(math.nan)
    )
    assert deviation(off, ref) == pytest.approx(0.05)  # 0.2 off, relative to the largest entry 4
    worse = LayerStats(colsum=ref.colsum, entropy=torch.tensor(1.0), entropy_tv=torch.tensor(math.nan))
    assert deviation(worse, ref) == pytest.approx(0.5)
    lost = LayerStats(colsum=ref.colsum, entropy=ref.entropy, entropy_tv=torch.tensor(1.0))
    assert deviation(lost, ref) == math.inf  # a number where the reference has none (no such rows)


def test_interpreted_run_times_both_paths_and_they_agree(tmp_path):
    out = tmp_path / "stats.json"
    cmd = [sys.executable, "-m", "vllm_kvmm.bench.stats_kernels", "--device", "cpu", "--tokens", "200"]
    cmd += ["--heads", "4", "--kv-heads", "2", "--head-dim", "32", "--images", "2", "--image-tokens", "40"]
    cmd += ["--chunk", "64", "--repeats", "1", "--out", str(out)]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    meta = json.loads(out.read_text())
    rows = {(r["policy"], r["kernels"]): r for r in meta["rows"]}
    policies = ("snapkv", "pyramidkv", "h2o", "lookm", "meda", "hae")
    assert set(rows) == {(p, k) for p in policies for k in ("torch", "triton")}
    wants = {"snapkv": "window", "h2o": "colsum", "meda": "window+cross_entropy", "hae": "t2v"}
    for policy, stats in wants.items():
        assert rows[policy, "torch"]["statistics"] == stats
    for p in policies:
        assert rows[p, "torch"]["max_rel_dev_vs_torch"] is None
        assert rows[p, "triton"]["max_rel_dev_vs_torch"] < 1e-5
        assert rows[p, "triton"]["ms_per_layer"] > 0
    assert "| meda | window+cross_entropy | triton |" in proc.stdout
