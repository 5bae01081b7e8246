"""Embedded real text for demos and quality measurements (no downloads; see README.md here)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

__all__ = ["NeedlePrompt", "long_text", "needle_prompt"]


def long_text() -> str:
    """The GNU GPL v3 text (~5,600 words), whitespace-normalised into paragraphs."""
    raw = resources.files(__package__).joinpath("gpl-3.0.txt").read_text(encoding="utf-8")
    paras = [" ".join(p.split()) for p in raw.split("\n\n")]
    return "\n\n".join(p for p in paras if p)


@dataclass(frozen=True)
class NeedlePrompt:
    """A long document with one planted fact, and a question whose answer is that fact."""

    document: str
    question: str
    answer: str

    @property
    def user_message(self) -> str:
        return f"Read this document.\n\n{self.document}\n\nQuestion: {self.question}"


def needle_prompt(words: int = 900, depth: float = 0.4, answer: str = "blue falcon") -> NeedlePrompt:
    """The first ``words`` words of :func:`long_text` with a passphrase sentence at relative ``depth``."""
    tokens = long_text().split(" ")[:words]
    needle = f"The secret passphrase is {answer}. Remember it: the passphrase is {answer}."
    cut = int(len(tokens) * depth)
    doc = " ".join([*tokens[:cut], needle, *tokens[cut:]])
    return NeedlePrompt(doc, "What is the secret passphrase? Answer with the passphrase only.", answer)
