"""A local ``vllm serve`` for the demo and the soak: started on 127.0.0.1, awaited until healthy, stopped.

The server runs in its own session (a Ctrl-C in the terminal reaches only the caller, which then stops the
server) and is always stopped on the way out; every request to it bypasses proxy settings (loopback only).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["OPENER", "free_port", "vllm_exe", "vllm_server"]

# Loopback only: never through a proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_exe() -> str:
    exe = Path(sys.executable).parent / "vllm"
    return str(exe) if exe.exists() else (shutil.which("vllm") or "vllm")


def _stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the server (its engine processes follow), SIGKILL its whole process group if it hangs."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only the server and its children
        proc.wait(10)


@contextmanager
def vllm_server(cmd: list[str], log: Path, start_timeout: float) -> Iterator[str]:
    """Run ``cmd`` (``vllm serve ... --host 127.0.0.1 --port P``), its output in ``log``; yield the base URL
    once ``/health`` answers. A small ``VLLM_CPU_KVCACHE_SPACE`` unless set; the real multi-process server."""
    port = cmd[cmd.index("--port") + 1]
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the real multi-process server (tests set it to 0)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({proc.returncode}); last lines of {log}:\n"
                                   f"{log.read_text()[-3000:]}")  # fmt: skip
            try:
                with OPENER.open(f"{base}/health", timeout=2):
                    break
            except OSError:
                if time.time() - t0 > start_timeout:
                    raise RuntimeError(
                        f"vllm serve did not become ready in {start_timeout:.0f} s (log: {log})"
                    ) from None
                time.sleep(1)
        print(f"server ready in {time.time() - t0:.0f} s at {base}", flush=True)
        yield base
    finally:
        _stop(proc)
        print("server stopped", flush=True)
