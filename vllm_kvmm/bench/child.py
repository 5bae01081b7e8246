"""One benchmark configuration per child process: the protocol the engine benchmarks share.

Why a process per configuration: a vLLM engine does not give everything back when it is dropped (device
memory, CUDA graphs, compiled kernels, the plugin's global state, the allocator's caches). Timing vanilla
and then a policy in the same process would let the first leave its traces in the second. A fresh process
per configuration starts each from the same clean device, and a configuration that crashes or hangs costs
only its own row.

The protocol, both sides:

* the parent runs ``python -m MODULE --child JSON`` with :func:`run_child` (the configuration as one JSON
  object; vLLM's engine core in-process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the child can read the
  scheduler and the block pool, and killing the child ends the engine);
* the child parses the JSON (:func:`add_child_flag` declares the flag), measures, and calls
  :func:`report` once: a line ``RESULT {json}`` on stdout. vLLM logs freely around it;
* the parent takes the first ``RESULT`` line (:func:`parse_result`). No such line (a crash, an exception,
  an out-of-memory kill) or no end within ``timeout`` is a failed configuration, with the reason and the
  tail of the child's output in :attr:`ChildResult.error`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MARKER",
    "ChildResult",
    "ConfigSpec",
    "add_child_flag",
    "machine",
    "parse_config",
    "parse_result",
    "report",
    "run_child",
]

MARKER = "RESULT "
"""What starts the child's result line on stdout; the JSON object follows on the same line."""


@dataclass(frozen=True)
class ConfigSpec:
    """One benchmark configuration named ``NAME[@BUDGET][/GROUPS]`` (``vanilla…`` names run no policy)."""

    label: str
    """The name as given (row label and file stem)."""
    policy: str | None
    """The KV policy; None for a ``vanilla`` configuration."""
    budget: float | None
    """``@BUDGET``; None: the benchmark's default budget."""
    groups: int | None
    """``/GROUPS`` (``--kv-groups``); None: one group per layer."""

    @property
    def stem(self) -> str:
        """The label as a file name (``snapkv@0.2/1`` → ``snapkv@0.2-g1``)."""
        return self.label.replace("/", "-g")


def parse_config(label: str) -> ConfigSpec:
    """``snapkv@0.2/1`` → policy snapkv, budget 0.2, one KV-cache group; raises ``ValueError`` on bad text."""
    spec, slash, groups = label.partition("/")
    name, at, budget = spec.partition("@")
    try:
        b = float(budget) if at else None
        g = int(groups) if slash else None
    except ValueError:
        raise ValueError(f"bad configuration {label!r}: expected NAME[@BUDGET][/GROUPS]") from None
    if not name or (b is not None and not 0 < b <= 1) or (g is not None and g < 1):
        raise ValueError(f"bad configuration {label!r}: expected NAME[@BUDGET][/GROUPS], 0 < BUDGET ≤ 1")
    if name.startswith("vanilla") and (at or slash):
        raise ValueError(f"bad configuration {label!r}: vanilla takes no budget or groups")
    return ConfigSpec(label, None if name.startswith("vanilla") else name, b, g)


def report(result: Mapping[str, Any]) -> None:
    """The child's side: print ``result`` as the ``RESULT {json}`` line and flush (call once, at the end)."""
    print(MARKER + json.dumps(result), flush=True)


def add_child_flag(p: argparse.ArgumentParser) -> None:
    """Declare ``--child JSON`` (hidden from ``--help``): set, the module runs that one configuration."""
    p.add_argument("--child", default=None, metavar="JSON", help=argparse.SUPPRESS)


def parse_result(stdout: str) -> dict[str, Any] | None:
    """The object on the first ``RESULT`` line of ``stdout``; None without one.

    Raises ``ValueError`` when that line does not hold a JSON object.
    """
    line = next((x for x in stdout.splitlines() if x.startswith(MARKER)), None)
    if line is None:
        return None
    result = json.loads(line[len(MARKER) :])
    if not isinstance(result, dict):
        raise ValueError(f"RESULT line holds {type(result).__name__}, not an object")
    return result


@dataclass(frozen=True)
class ChildResult:
    """What one child run gave: its result, or why it has none, and everything it printed."""

    result: dict[str, Any] | None
    """The child's reported object; None when it failed."""
    error: str | None
    """None on success; else the reason (timeout, exit code, no ``RESULT`` line) and the output's tail."""
    output: str
    """The child's stdout followed by its stderr (for a log file)."""
    returncode: int | None
    """The child's exit status (negative: killed by that signal); None when it ran past the timeout."""

    @property
    def ok(self) -> bool:
        """True when the child reported a result."""
        return self.result is not None


def _exit_reason(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def run_child(
    module: str,
    cfg: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    tail: int = 4000,
) -> ChildResult:
    """Run ``python -m module --child json(cfg)`` with this interpreter and wait for its result.

    ``env`` is merged over this process's environment, over a default ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
    that it may override. ``timeout`` (seconds, None: no limit) kills the child and everything it started
    (it runs in its own process group), so nothing it spawned keeps the device. A ``RESULT`` line counts even
    if the child then exits non-zero (engine shutdown at interpreter exit can crash after the measurement);
    errors end with the last ``tail`` characters of the output.
    """
    full_env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--child", json.dumps(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, stderr = proc.communicate()
        return ChildResult(None, f"did not finish in {timeout:g} s", stdout + stderr, None)
    except BaseException:  # Ctrl-C included: the child is in its own session and would not see it
        _kill_group(proc)
        proc.wait()
        raise
    output = stdout + stderr
    try:
        result = parse_result(stdout)
    except ValueError as e:
        reason = f"unreadable RESULT line ({e})"
    else:
        if result is not None:
            return ChildResult(result, None, output, proc.returncode)
        reason = "no RESULT line"
    if proc.returncode != 0:
        reason = f"{_exit_reason(proc.returncode)}, {reason}"
    return ChildResult(None, f"{reason}; output tail:\n{output[-tail:]}", output, proc.returncode)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def machine() -> str:
    """The machine a result was measured on, as result files record it (GPU name, else CPU and cores)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
