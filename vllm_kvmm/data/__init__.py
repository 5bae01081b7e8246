"""Embedded real text for demos and quality measurements (no downloads; see README.md here)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

__all__ = ["TEXTS", "NeedlePrompt", "long_text", "long_texts", "needle_prompt"]

# Real long English texts that ship with this package or with every CPython (no download): name → where.
TEXTS = ("gpl3", "python-reference", "idle-help")


def _paragraphs(raw: str, sep: str = "\n\n") -> str:
    paras = [" ".join(p.split()) for p in raw.split(sep)]
    return "\n\n".join(p for p in paras if p)


def long_text() -> str:
    """The GNU GPL v3 text (~5,600 words), whitespace-normalised into paragraphs."""
    return long_texts("gpl3")


def long_texts(name: str) -> str:
    """One of :data:`TEXTS`, whitespace-normalised into paragraphs.

    * ``gpl3``: the GNU GPL v3 (this package's data, from Debian's ``common-licenses``), ~5,600 words;
    * ``python-reference``: the Python Language Reference topics CPython ships for ``help()``
      (``pydoc_data.topics``, PSF licence), ~60,000 words of technical prose, topics in sorted order;
    * ``idle-help``: IDLE's user manual (``idlelib/help.html``, PSF licence) with the markup removed,
      ~9,000 words.
    """
    if name == "gpl3":
        return _paragraphs(resources.files(__package__).joinpath("gpl-3.0.txt").read_text(encoding="utf-8"))
    if name == "python-reference":
        from pydoc_data.topics import topics

        return _paragraphs("\n\n".join(topics[k] for k in sorted(topics)))
    if name == "idle-help":
        import html
        import idlelib
        import re

        raw = resources.files(idlelib).joinpath("help.html").read_text(encoding="utf-8")
        body = raw[raw.find("<body") :]
        body = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", body, flags=re.S)
        body = re.sub(r"</(p|div|h[1-6]|li|dt|dd|pre|tr)>", "\n\n", body)
        return _paragraphs(html.unescape(re.sub(r"<[^>]+>", " ", body)))
    raise ValueError(f"unknown text {name!r}; choose one of {', '.join(TEXTS)}")


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
