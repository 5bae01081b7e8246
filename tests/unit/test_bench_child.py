"""The one-configuration-per-process protocol of the benchmarks, on a stand-in child (no engine), and the
``vllm-kvmm bench`` subcommands."""

from __future__ import annotations

import importlib
import json
import os
import re
import time
from pathlib import Path

import pytest

from vllm_kvmm.bench.child import ChildResult, ConfigSpec, parse_config, parse_result, run_child
from vllm_kvmm.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
CHILD = "tests.unit.data.child_echo"


def _env(**extra: str) -> dict[str, str]:
    """The repository root on the child's path, so ``-m tests.unit.data.child_echo`` imports from any cwd."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, **extra}


def test_a_reported_result_comes_back_with_the_environment() -> None:
    cfg = {"mode": "echo", "name": "snapkv@0.2", "budgets": [0.2, 0.5], "policy": None}
    res = run_child(CHILD, cfg, env=_env(KVMM_TEST_VAR="x"))
    assert res.ok and res.error is None and res.returncode == 0
    assert res.result == {"cfg": cfg, "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "KVMM_TEST_VAR": "x"}}
    assert res.output == (
        "engine log line before the result\n"
        f"RESULT {json.dumps(res.result)}\n"
        "engine log line after the result\n"
    )


def test_env_overrides_the_in_process_engine_default() -> None:
    res = run_child(CHILD, {"mode": "echo"}, env=_env(VLLM_ENABLE_V1_MULTIPROCESSING="1"))
    assert res.result is not None
    assert res.result["env"] == {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "KVMM_TEST_VAR": None}


def test_a_failing_child_gives_its_exit_code_and_output() -> None:
    res = run_child(CHILD, {"mode": "fail"}, env=_env())
    output = "loading the model\nValueError: budget must be in (0, 1]\n"
    assert res == ChildResult(
        result=None,
        error="exit code 3, no RESULT line; output tail:\n" + output,
        output=output,
        returncode=3,
    )
    assert not res.ok


def test_a_child_without_a_result_line_fails_with_the_output_tail() -> None:
    res = run_child(CHILD, {"mode": "silent"}, env=_env(), tail=10)
    assert not res.ok and res.result is None and res.returncode == 0
    assert res.output == "finished without a result\n"
    assert res.error == "no RESULT line; output tail:\n a result\n"  # the last 10 characters


def test_a_timeout_kills_the_child_and_what_it_started() -> None:
    res = run_child(CHILD, {"mode": "hang"}, env=_env(), timeout=1)
    assert res.result is None and res.returncode is None
    assert res.error == "did not finish in 1 s"
    match = re.fullmatch(r"grandchild (\d+)\n", res.output)
    assert match, res.output
    # Killed: gone, or a zombie nobody reaps (in a container). Its pipes close before it is through exiting.
    stat, deadline = Path(f"/proc/{match[1]}/stat"), time.monotonic() + 5
    while stat.exists() and _state(stat) != "Z" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not stat.exists() or _state(stat) == "Z"


def _state(stat: Path) -> str:
    """A process's state letter from ``/proc/PID/stat`` (``""`` if it has gone meanwhile)."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return ""


def test_parse_config_reads_policy_budget_and_groups() -> None:
    assert parse_config("snapkv@0.2/1") == ConfigSpec("snapkv@0.2/1", "snapkv", 0.2, 1)
    assert parse_config("snapkv@0.2/1").stem == "snapkv@0.2-g1"
    assert parse_config("meda") == ConfigSpec("meda", "meda", None, None)
    assert parse_config("h2o/8") == ConfigSpec("h2o/8", "h2o", None, 8)
    assert parse_config("vanilla-piecewise") == ConfigSpec("vanilla-piecewise", None, None, None)
    for bad in (
        "snapkv@x",
        "snapkv@0",
        "snapkv@1.5",
        "snapkv/0",
        "snapkv/a",
        "@0.2",
        "vanilla@0.2",
        "vanilla/1",
    ):
        with pytest.raises(ValueError, match="bad configuration"):
            parse_config(bad)


def test_parse_result_takes_the_first_result_line() -> None:
    out = 'INFO starting\nRESULT {"a": 1, "b": [2.5, null]}\nRESULT {"a": 2}\n'
    assert parse_result(out) == {"a": 1, "b": [2.5, None]}
    assert parse_result("INFO no result\nRESULTS {}\n") is None
    with pytest.raises(ValueError, match="holds list, not an object"):
        parse_result("RESULT [1, 2]\n")
    with pytest.raises(ValueError):
        parse_result("RESULT {truncated\n")


def test_every_bench_is_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["bench", "--help"])
    assert e.value.code == 0
    choices = re.search(r"\{([a-z,-]+)\}", capsys.readouterr().out)
    assert choices is not None
    assert sorted(choices[1].split(",")) == [
        "decode", "entropy-sample", "multiturn", "overhead", "perf", "profile-decode", "quality", "retrieval",
        "score-sample", "soak", "stats", "sweep",
    ]  # fmt: skip


def test_every_bench_module_with_flags_is_registered() -> None:
    # A new benchmark module (build_parser + run) is reachable from `vllm-kvmm bench` or this fails.
    import importlib
    import pkgutil

    import vllm_kvmm.bench
    from vllm_kvmm.cli import MODULE_BENCHES

    runnable = set()
    for info in pkgutil.iter_modules(vllm_kvmm.bench.__path__):
        mod = importlib.import_module(f"vllm_kvmm.bench.{info.name}")
        if callable(getattr(mod, "build_parser", None)) and callable(getattr(mod, "run", None)):
            runnable.add(info.name)
    assert runnable == {module for _, module, _ in MODULE_BENCHES}


@pytest.mark.parametrize(
    ("argv", "module", "expected"),
    [
        (["decode"], "decode", dict(requests=4, prompt=256, out=768, budget=0.25, interval=16, child=None)),
        (["overhead", "--configs", "vanilla,h2o@0.3"], "overhead", dict(configs="vanilla,h2o@0.3")),
        (["profile-decode"], "profile_decode", dict(configs="vanilla,vanilla-piecewise,snapkv", ctx=4096)),
    ],
)
def test_new_benches_parse_into_their_module_run(argv: list[str], module: str, expected: dict) -> None:
    a = build_parser().parse_args(["bench", *argv])
    assert a.func is importlib.import_module(f"vllm_kvmm.bench.{module}").run
    assert {k: getattr(a, k) for k in expected} == expected
