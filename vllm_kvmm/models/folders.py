"""Model folders written all at once: an interrupted build never leaves a half-written folder behind."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["MARKER", "is_complete", "write_folder_atomically"]

MARKER = ".vllm_kvmm_complete"


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def write_folder_atomically(dest: Path, write: Callable[[Path], None], note: str) -> Path:
    """Run ``write(tmp)`` into a temporary sibling, mark it complete, then rename it to ``dest``.

    Idempotent: a complete ``dest`` is returned untouched; an incomplete leftover is replaced.
    """
    dest = Path(dest)
    if is_complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        write(tmp)
        (tmp / MARKER).write_text(note + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; models are meant to be shared
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
