"""A resumable store of finished benchmark cases, shared by the quality benchmarks.

A case is one (engine, policy, budget) over the whole prompt set; its result is a JSON-able dict. Cases are
written to disk as they finish, so an interrupted run resumes and a later run with more policies or budgets
computes only the new ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["CaseCache"]


class CaseCache:
    """Finished cases ``{"engine|policy|budget": {...}}`` in one JSON file.

    Keyed by ``setup`` (model, prompts, generation length, device, ...): a file written for another setup
    is ignored and replaced at the first :meth:`put`. ``path`` None: memory only.
    """

    def __init__(self, path: Path | None, setup: dict[str, Any]) -> None:
        self.path = path
        # Round-trip through JSON so that tuples and lists compare equal with what the file holds.
        self.setup = json.loads(json.dumps(setup))
        self.cases: dict[str, dict[str, Any]] = {}
        if path is not None and path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("setup") == self.setup:
                self.cases = saved["cases"]

    @staticmethod
    def _key(engine: str, policy: str, budget: float) -> str:
        return f"{engine}|{policy}|{budget:g}"

    def has(self, engine: str, policy: str, budget: float) -> bool:
        return self._key(engine, policy, budget) in self.cases

    def get(self, engine: str, policy: str, budget: float) -> dict[str, Any]:
        return self.cases[self._key(engine, policy, budget)]

    def put(self, engine: str, policy: str, budget: float, result: dict[str, Any]) -> None:
        self.cases[self._key(engine, policy, budget)] = json.loads(json.dumps(result))
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"setup": self.setup, "cases": self.cases}))
            tmp.replace(self.path)
