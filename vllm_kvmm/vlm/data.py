"""easy-VQA images, their labels, the splits, and the multi-image tasks built from them.

`easy-vqa <https://pypi.org/project/easy-vqa/>`_ (MIT) ships 5,000 64×64 RGB images, each with one shape
(circle, rectangle or triangle) in one of 8 colours on a light background, and 48,248 yes/no or one-word
questions about them. Labels (colour, shape) are read from the pixels: the shape is drawn in an exact
palette colour, and its fill ratio / outline tells the shape. They agree with every one of the package's
48,248 answers (``tests/unit/test_vlm.py`` checks a sample).

Splits (by image, never mixed):

* ``train``: the package's train images whose id is not a multiple of 10 (3,600 images);
* ``val``: the package's train images with ``id % 10 == 0`` (400), for development checks during training;
* ``test``: the package's 1,000 test images: held out, never trained on.

Tasks, in the spirit of MileBench's needle and retrieval subsets; answers are one word or a number, scored
by exact match of greedy decoding. ``N`` images are labelled ``Image 1:`` … ``Image N:`` in the prompt:

* ``single`` (N = 1): the package's own questions ("is there a red shape?", "what shape is present?");
* ``needle``: "Which image shows a red circle?" → ``k`` (the object is unique in the context);
* ``color_k`` / ``shape_k``: "What color is the shape in image k?" → ``red``; "What shape is in image k?";
* ``count``: "How many images show a circle?" → ``3``;
* ``order``: "Does the red circle appear before the blue triangle?" → ``yes`` / ``no``.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "COLORS",
    "SHAPES",
    "SPLITS",
    "TASKS",
    "Context",
    "Example",
    "Question",
    "answer_from_label",
    "easy_vqa_available",
    "eval_contexts",
    "examples",
    "image_ids",
    "label",
    "load_image",
    "messages",
    "package_questions",
    "train_contexts",
]

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "teal", "brown", "gray", "black")
SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")
SPLITS: tuple[str, ...] = ("train", "val", "test")
TASKS: tuple[str, ...] = ("single", "needle", "color_k", "shape_k", "count", "order")
# The exact RGB values easy-VQA draws shapes with (anti-aliased edges take other values).
_PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}


def easy_vqa_available() -> bool:
    """True when the ``easy-vqa`` package (the images) is installed."""
    import importlib.util

    return importlib.util.find_spec("easy_vqa") is not None


@functools.cache
def _paths(package_split: str) -> dict[int, str]:
    import easy_vqa

    fn = easy_vqa.get_train_image_paths if package_split == "train" else easy_vqa.get_test_image_paths
    return dict(fn())


def _package_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return "test" if split == "test" else "train"


@functools.cache
def image_ids(split: str) -> tuple[int, ...]:
    """Sorted easy-VQA image ids of a split (ids are per package split: ``test`` 0..999)."""
    ids = sorted(_paths(_package_split(split)))
    if split == "train":
        return tuple(i for i in ids if i % 10 != 0)
    if split == "val":
        return tuple(i for i in ids if i % 10 == 0)
    return tuple(ids)


def image_path(split: str, image_id: int) -> Path:
    return Path(_paths(_package_split(split))[image_id])


def load_image(split: str, image_id: int) -> Any:
    """The RGB ``PIL.Image`` (64×64) of an image."""
    from PIL import Image

    with Image.open(image_path(split, image_id)) as im:
        return im.convert("RGB")


def _label_pixels(rgb: np.ndarray) -> tuple[str, str]:
    """(colour, shape) of a ``[64, 64, 3]`` uint8 easy-VQA image.

    The colour is the palette colour covering most pixels; the shape: a filled bounding box is a rectangle;
    otherwise a triangle (drawn apex up) has a bottom row much wider than its top row, a circle does not.
    """
    flat = rgb.reshape(-1, 3)
    counts = {name: int((flat == np.array(c)).all(-1).sum()) for name, c in _PALETTE.items()}
    color = max(counts, key=lambda k: counts[k])
    mask = (rgb == np.array(_PALETTE[color])).all(-1)
    ys, xs = np.nonzero(mask)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    if mask.sum() / (h * w) > 0.95:
        return color, "rectangle"
    top, bottom = int(mask[ys.min()].sum()), int(mask[ys.max()].sum())
    return color, ("triangle" if abs(bottom - top) / w > 0.3 else "circle")


@functools.cache
def _labels(split: str) -> dict[int, tuple[str, str]]:
    from PIL import Image

    out = {}
    for i in image_ids(split):
        with Image.open(image_path(split, i)) as im:
            out[i] = _label_pixels(np.asarray(im.convert("RGB")))
    return out


def label(split: str, image_id: int) -> tuple[str, str]:
    """(colour, shape) of an image, e.g. ``("red", "circle")``."""
    return _labels(split)[image_id]


def answer_from_label(question: str, obj: tuple[str, str]) -> str:
    """The answer to a package question implied by an image's (colour, shape).

    "what color …" → the colour; other "what …" questions → the shape; yes/no questions: whether every
    colour / shape word they name is the image's, flipped by "not" / "no".
    """
    words = question.lower().rstrip("?").split()
    color, shape = obj
    if words[0] == "what":
        return color if "color" in words else shape
    negated = "not" in words or "no" in words
    named = [w for w in words if w in COLORS or w in SHAPES]
    holds = all(w in (color, shape) for w in named)
    return "yes" if holds != negated else "no"


@functools.cache
def package_questions(split: str) -> dict[int, tuple[tuple[str, str], ...]]:
    """The package's own (question, answer) pairs per image id of a split."""
    import easy_vqa

    ps = _package_split(split)
    texts, answers, ids = easy_vqa.get_train_questions() if ps == "train" else easy_vqa.get_test_questions()
    keep = set(image_ids(split))
    out: dict[int, list[tuple[str, str]]] = {}
    for q, a, i in zip(texts, answers, ids, strict=True):
        if i in keep:
            out.setdefault(i, []).append((q, a))
    return {i: tuple(v) for i, v in out.items()}


# --------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Question:
    """One question about a context; ``answer`` is the exact expected greedy output."""

    task: str
    text: str
    answer: str


@dataclass(frozen=True)
class Context:
    """``N`` images of one split (in prompt order) and questions about them (each asked on its own)."""

    split: str
    image_ids: tuple[int, ...]
    questions: tuple[Question, ...]

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    def images(self) -> list[Any]:
        return [load_image(self.split, i) for i in self.image_ids]


@dataclass(frozen=True)
class Example:
    """One prompt: a context's images and one of its questions."""

    context: Context
    question: Question

    @property
    def task(self) -> str:
        return self.question.task

    @property
    def n_images(self) -> int:
        return self.context.n_images

    def messages(self) -> list[dict[str, Any]]:
        return messages(self.context.n_images, self.question.text)


def messages(n_images: int, question: str) -> list[dict[str, Any]]:
    """Chat messages of a prompt: ``<image>`` then the question, or ``Image k: <image>`` lines then it.

    With the project's template an image item renders as ``<image>\\n``, so ``N = 3`` reads
    ``Image 1: <image>\\nImage 2: <image>\\nImage 3: <image>\\n<question>``.
    """
    if n_images == 1:
        content: list[dict[str, Any]] = [{"type": "image"}]
    else:
        content = []
        for k in range(1, n_images + 1):
            content += [{"type": "text", "text": f"Image {k}: "}, {"type": "image"}]
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def examples(contexts: Sequence[Context]) -> list[Example]:
    """Every (context, question) pair, contexts in order."""
    return [Example(c, q) for c in contexts for q in c.questions]


def _by_object(split: str) -> dict[tuple[str, str], list[int]]:
    out: dict[tuple[str, str], list[int]] = {}
    for i in image_ids(split):
        out.setdefault(label(split, i), []).append(i)
    return out


def _objects(rng: random.Random, n: int, distinct: bool) -> list[tuple[str, str]]:
    """``n`` (colour, shape) objects; all different when ``distinct`` (needs ``n <= 24``)."""
    all_objs = [(c, s) for c in COLORS for s in SHAPES]
    if distinct:
        return rng.sample(all_objs, n)
    return [rng.choice(all_objs) for _ in range(n)]


def _pick_images(rng: random.Random, split: str, objs: Sequence[tuple[str, str]]) -> tuple[int, ...]:
    pool = _by_object(split)
    chosen: list[int] = []
    for o in objs:
        cands = [i for i in pool[o] if i not in chosen]
        chosen.append(rng.choice(cands))
    return tuple(chosen)


def _name(o: tuple[str, str]) -> str:
    return f"{o[0]} {o[1]}"


def _needles(rng: random.Random, objs: Sequence[tuple[str, str]], k: int) -> list[Question]:
    counts = Counter(objs)
    unique = [i for i, o in enumerate(objs) if counts[o] == 1]
    picks = rng.sample(unique, min(k, len(unique)))
    return [Question("needle", f"Which image shows a {_name(objs[i])}?", str(i + 1)) for i in picks]


def _lookups(rng: random.Random, objs: Sequence[tuple[str, str]], k: int) -> list[Question]:
    out = []
    for i in rng.sample(range(len(objs)), min(k, len(objs))):
        if rng.random() < 0.5:
            out.append(Question("color_k", f"What color is the shape in image {i + 1}?", objs[i][0]))
        else:
            out.append(Question("shape_k", f"What shape is in image {i + 1}?", objs[i][1]))
    return out


def _counts(rng: random.Random, objs: Sequence[tuple[str, str]], k: int) -> list[Question]:
    out = []
    for _ in range(k):
        if rng.random() < 0.5:
            s = rng.choice(SHAPES)
            n = sum(o[1] == s for o in objs)
            out.append(Question("count", f"How many images show a {s}?", str(n)))
        else:
            c = rng.choice(COLORS)
            n = sum(o[0] == c for o in objs)
            out.append(Question("count", f"How many images show a {c} shape?", str(n)))
    return out


def _orders(rng: random.Random, objs: Sequence[tuple[str, str]], k: int) -> list[Question]:
    counts = Counter(objs)
    unique = [i for i, o in enumerate(objs) if counts[o] == 1]
    out = []
    if len(unique) < 2:
        return out
    for _ in range(k):
        a, b = rng.sample(unique, 2)
        text = f"Does the {_name(objs[a])} appear before the {_name(objs[b])}?"
        out.append(Question("order", text, "yes" if a < b else "no"))
    return out


def _lists(rng: random.Random, objs: Sequence[tuple[str, str]], k: int) -> list[Question]:
    """Training only (dense supervision): describe every image in order."""
    text = ", ".join(f"{i + 1}: {_name(o)}" for i, o in enumerate(objs))
    return [Question("list", "Describe each image.", text)] * min(k, 1)


def _find_all(rng: random.Random, objs: Sequence[tuple[str, str]], k: int) -> list[Question]:
    """Training only (dense supervision): every image of a shape or a colour, or ``none``."""
    out = []
    for _ in range(k):
        if rng.random() < 0.5:
            s = rng.choice(SHAPES)
            hits, what = [i for i, o in enumerate(objs) if o[1] == s], f"a {s}"
        else:
            c = rng.choice(COLORS)
            hits, what = [i for i, o in enumerate(objs) if o[0] == c], f"a {c} shape"
        answer = ", ".join(str(i + 1) for i in hits) or "none"
        out.append(Question("find_all", f"Which images show {what}?", answer))
    return out


_BUILDERS = {
    "needle": _needles,
    "color_k": _lookups,
    "count": _counts,
    "order": _orders,
    "list": _lists,
    "find_all": _find_all,
}


def multi_context(
    rng: random.Random, split: str, n_images: int, per_task: dict[str, int], distinct: bool | None = None
) -> Context:
    """``n_images`` images of ``split`` and ``per_task[task]`` questions of each multi-image task.

    Objects are all different when ``distinct`` (default: when ``n_images <= 24``, i.e. always possible);
    otherwise drawn with repetition, and needle / order questions only name objects that are unique.
    ``per_task`` keys: ``needle``, ``lookup`` (``color_k`` or ``shape_k``), ``count``, ``order``, and the
    training-only ``list`` ("Describe each image." → ``1: red circle, 2: …``) and ``find_all``.
    """
    if n_images < 2:
        raise ValueError("multi-image contexts need at least 2 images")
    if distinct is None:
        distinct = n_images <= len(COLORS) * len(SHAPES)
    objs = _objects(rng, n_images, distinct)
    ids = _pick_images(rng, split, objs)
    qs: list[Question] = []
    for task, k in per_task.items():
        builder = _BUILDERS["color_k" if task == "lookup" else task]
        qs += builder(rng, objs, k)
    return Context(split, ids, tuple(qs))


def single_context(
    rng: random.Random, split: str, image_id: int, k: int | None = None, describe: bool = False
) -> Context:
    """One image with ``k`` of the package's questions about it (all of them when ``k`` is None).

    ``describe``: add the training-only "Describe the image." → ``red circle``.
    """
    qa = list(package_questions(split)[image_id])
    if k is not None and k < len(qa):
        qa = rng.sample(qa, k)
    qs = [Question("single", q, a) for q, a in qa]
    if describe:
        qs.append(Question("describe", "Describe the image.", _name(label(split, image_id))))
    return Context(split, (image_id,), tuple(qs))


def eval_contexts(
    task: str, n_images: int, count: int, *, split: str = "test", seed: int = 0
) -> list[Context]:
    """A fixed evaluation set: ``count`` contexts of ``n_images`` images, questions of one task family.

    ``task``: ``single`` (``n_images`` must be 1; every package question of ``count`` images), ``needle``
    (up to 8 needles a context), ``lookup`` (8 ``color_k`` / ``shape_k``), ``count`` (4), ``order`` (4) or
    ``find_all`` (4: "Which images show a circle?" → ``2, 7, 9``, every image of a shape or colour: the
    multi-needle task, several answers from several images).
    Deterministic for (task, n_images, count, split, seed).
    """
    rng = random.Random(f"vlm-eval/{task}/{n_images}/{split}/{seed}")
    if task == "single":
        if n_images != 1:
            raise ValueError("single-image questions use one image")
        ids = rng.sample(image_ids(split), count)
        return [single_context(rng, split, i) for i in ids]
    per = {"needle": 8, "lookup": 8, "count": 4, "order": 4, "find_all": 4}[task]
    return [multi_context(rng, split, n_images, {task: per}) for _ in range(count)]


# Context sizes and task mix of the training stream (see docs/vlm.md).
TRAIN_SIZES: tuple[tuple[int, float], ...] = (
    (1, 0.25),
    (2, 0.05),
    (4, 0.15),
    (8, 0.2),
    (12, 0.15),
    (16, 0.2),
)


def train_contexts(seed: int, split: str = "train") -> Iterator[Context]:
    """Endless deterministic stream of training contexts (single-image and multi-image, mixed).

    A multi-image context of ``N`` images carries ``N`` needle (one per image), ``min(N, 8)`` lookup,
    2 count, 2 order, 2 find-all questions and one list; a single-image context carries up to 8 of the
    package's questions of its image and "Describe the image.". ``list``, ``find_all`` and ``describe``
    are training-only tasks that supervise every image, not one token per question.
    """
    rng = random.Random(f"vlm-train/{seed}/{split}")
    sizes, weights = zip(*TRAIN_SIZES, strict=True)
    ids = image_ids(split)
    while True:
        n = rng.choices(sizes, weights)[0]
        if n == 1:
            yield single_context(rng, split, rng.choice(ids), k=8, describe=True)
        else:
            per = {"needle": n, "lookup": min(n, 8), "count": 2, "order": 2, "find_all": 2, "list": 1}
            yield multi_context(rng, split, n, per)
