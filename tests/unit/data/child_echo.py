"""A stand-in benchmark child for ``tests/unit/test_bench_child.py`` (no engine): ``--child JSON`` picks
what it does: ``echo`` reports, ``fail`` exits non-zero, ``silent`` reports nothing, ``hang`` starts a
grandchild and sleeps."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from vllm_kvmm.bench.child import add_child_flag, report


def main() -> None:
    p = argparse.ArgumentParser()
    add_child_flag(p)
    cfg = json.loads(p.parse_args().child)
    mode = cfg["mode"]
    if mode == "echo":
        print("engine log line before the result")
        env = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "KVMM_TEST_VAR")}
        report({"cfg": cfg, "env": env})
        print("engine log line after the result", file=sys.stderr)
    elif mode == "fail":
        print("loading the model", flush=True)
        print("ValueError: budget must be in (0, 1]", file=sys.stderr)
        sys.exit(3)
    elif mode == "silent":
        print("finished without a result")
    elif mode == "hang":
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(f"grandchild {grandchild.pid}", flush=True)
        time.sleep(60)


if __name__ == "__main__":
    main()
