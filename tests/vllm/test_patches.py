"""The unavoidable patches: vLLM internals still where we expect them, diffs apply, wrappers install once."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PATCHES = Path(__file__).resolve().parents[2] / "patches"


def test_vllm_is_the_pinned_release() -> None:
    import vllm

    assert vllm.__version__.startswith("0.26.0"), vllm.__version__


def test_internals_we_patch_are_still_there() -> None:
    from vllm_kvmm.vllm_ext.patches import check_vllm_internals

    check_vllm_internals()


@pytest.mark.parametrize("diff", sorted(PATCHES.glob("*.diff")), ids=lambda p: p.name)
def test_diff_applies_cleanly(diff: Path, tmp_path: Path) -> None:
    import vllm

    site = Path(vllm.__file__).parent.parent
    targets = [line[6:].strip() for line in diff.read_text().splitlines() if line.startswith("--- a/")]
    assert targets, f"{diff.name} names no file"
    for t in targets:
        (tmp_path / t).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(site / t, tmp_path / t)
    res = subprocess.run(
        ["patch", "-p1", "--fuzz=0", "--forward", "-i", str(diff)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "offset" not in res.stdout and "fuzz" not in res.stdout, res.stdout


def test_every_diff_has_a_runtime_wrapper_and_wrappers_install_once() -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_kvmm.vllm_ext.patches import apply_patches

    apply_patches()
    apply_patches()  # the plugin loads several times per process
    wrapped = {
        "0001-kv-cache-groups.diff": kv_cache_utils.get_kv_cache_groups,
        "0002-row-request-ids.diff": GPUModelRunner._build_attention_metadata,
        "0003-platform-spec-hook.diff": type(current_platform).register_custom_kv_cache_specs.__func__,
        "0004-cli-and-engine-config.diff": EngineArgs.create_engine_config,
        "0005-no-full-graph-while-observing.diff": CudagraphDispatcher.dispatch,
        "0006-report-before-finishing.diff": Scheduler.update_from_output,
    }
    assert sorted(wrapped) == sorted(p.name for p in PATCHES.glob("*.diff"))
    for name, fn in wrapped.items():
        assert getattr(fn, "__kvmm_patched__", False), name
        assert not getattr(fn.__wrapped__, "__kvmm_patched__", False), f"{name} wrapped twice"
