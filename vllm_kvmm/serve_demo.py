"""The main job: `vllm serve MODEL --kv-policy meda` on an embedded model, asked real questions.

Starts the OpenAI-compatible server as a user would (a separate process on 127.0.0.1), sends the requests
through the OpenAI client — under the server's default policy and once per comparison policy through
``vllm_xargs`` — prints each answer with the KV blocks compression gave back (read from ``/metrics``), and
stops the server.

* :func:`run_vlm_demo` (the default): the embedded VLM (docs/vlm.md) looks at 16 held-out easy-VQA images
  (1,024 image tokens) and answers which image shows an object, what is in image k, and a count.
* :func:`run_serve_demo` (``--text``): SmolLM2 reads a ~1,250-token document with a planted passphrase.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_kvmm import local_server
from vllm_kvmm.data import needle_prompt


def _metrics(base: str) -> dict[str, float]:
    out: dict[str, float] = {}
    with local_server.OPENER.open(f"{base}/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith("vllm_kvmm:") and "_total{" in line:
            out[line.split("_total{")[0].removeprefix("vllm_kvmm:")] = float(line.rsplit(" ", 1)[1])
    return out


@contextmanager
def vllm_server(
    model: Path, name: str, policy: str, budget: float, extra: Sequence[str] = ()
) -> Iterator[str]:
    """``vllm serve model --kv-policy policy --kv-budget budget`` on a free local port; yields its base URL.

    float32 (the embedded weights' dtype: the numbers the dense reference sees) and eager (torch.compile
    costs ~100 s of start-up on a CPU for no gain here). The log goes to ``$VLLM_KVMM_HOME/serve-demo.log``.
    """
    port = local_server.free_port()
    log = Path(os.environ.get("VLLM_KVMM_HOME", Path.home() / ".cache" / "vllm-kvmm")) / "serve-demo.log"
    cmd = [
        local_server.vllm_exe(), "serve", str(model),
        "--served-model-name", name,
        "--kv-policy", policy,
        "--kv-budget", str(budget),
        "--dtype", "float32",
        "--enforce-eager",
        "--host", "127.0.0.1",
        "--port", str(port),
        *extra,
    ]  # fmt: skip
    print(f"$ vllm serve {model} --kv-policy {policy} --kv-budget {budget} ...   (log: {log})")
    with local_server.vllm_server(cmd, log, start_timeout=300) as base:
        yield base


@dataclass(frozen=True)
class DemoAnswer:
    question: str
    truth: str
    run: str  # the policy label
    answer: str
    prompt_tokens: int
    blocks_freed: int

    @property
    def right(self) -> bool:
        return self.answer.strip().lower() == self.truth


def _runs(policy: str, budget: float, compare: Sequence[str], compare_budget: float) -> list[tuple[str, Any]]:
    """``(label, vllm_xargs)`` of the server's default run, then one per comparison policy."""
    runs: list[tuple[str, Any]] = [(f"{policy} (server default, budget {budget:g})", None)]
    for name in compare:
        if name == "full":
            runs.append(("full", {"kv_policy": "full"}))
        else:
            runs.append(
                (f"{name} (budget {compare_budget:g})", {"kv_policy": name, "kv_budget": compare_budget})
            )
    return runs


def _kv_line(before: dict[str, float], after: dict[str, float]) -> str:
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    if not delta.get("compressed_requests"):
        return "not compressed (every prompt token kept)"
    kept, full = delta.get("kv_token_layers_kept", 0), delta.get("kv_token_layers_prompt", 1)
    return (
        f"{int(delta.get('blocks_freed', 0))} blocks freed back to the pool; {int(kept)} of {int(full)} "
        f"prompt KV entries kept ({100 * kept / full:.0f}%), compression took "
        f"{1000 * delta.get('compression_seconds', 0):.0f} ms"
    )


def _image_part(image: Any) -> dict[str, Any]:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def contact_sheet(images: Sequence[Any], path: Path, columns: int = 8) -> Path:
    """The demo's images side by side, numbered as in the prompt (so a reader can check the answers)."""
    from PIL import Image, ImageDraw

    w, h = images[0].size
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * w, rows * (h + 12)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, im in enumerate(images):
        x, y = (k % columns) * w, (k // columns) * (h + 12)
        sheet.paste(im, (x, y + 12))
        draw.text((x + 2, y), f"{k + 1}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def run_vlm_demo(
    policy: str = "meda",
    budget: float = 0.2,
    compare: Sequence[str] = ("full", "snapkv"),
    compare_budget: float = 0.2,
    n_images: int = 16,
    max_tokens: int = 8,
    sheet: Path | None = Path("out") / "demo_images.png",
) -> list[DemoAnswer]:
    """Ask the embedded VLM about ``n_images`` held-out images under the server's policy and the others.

    Prints every answer and returns them (one :class:`DemoAnswer` per question and run).
    """
    import random

    from openai import OpenAI

    from vllm_kvmm.policies import make_policy
    from vllm_kvmm.vlm import data
    from vllm_kvmm.vlm.assemble import ensure_vlm

    make_policy(policy, budget)  # a bad name or budget fails before anything starts
    for name in compare:
        make_policy(name, 1.0 if name == "full" else compare_budget)
    model = ensure_vlm()
    ctx = data.multi_context(
        random.Random(f"demo/{n_images}"), "test", n_images, {"needle": 1, "lookup": 1, "order": 1}
    )
    images = ctx.images()
    where = f": {contact_sheet(images, sheet)}" if sheet is not None else ""
    print(f"{n_images} held-out easy-VQA images (never trained on), numbered as the model sees them{where}")
    print(
        "truth: "
        + ", ".join(f"{k + 1} {' '.join(data.label('test', i))}" for k, i in enumerate(ctx.image_ids))
    )
    extra = ["--max-model-len", "2048", "--limit-mm-per-prompt", json.dumps({"image": n_images})]
    results: list[DemoAnswer] = []
    with vllm_server(model, "vlm", policy, budget, extra) as base:
        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        for q in ctx.questions:
            content: list[dict[str, Any]] = []
            for k, im in enumerate(images, start=1):
                content += [{"type": "text", "text": f"Image {k}: "}, _image_part(im)]
            content.append({"type": "text", "text": q.text})
            print(f"\nQ: {q.text}   (right answer: {q.answer})")
            for label, xargs in _runs(policy, budget, compare, compare_budget):
                before = _metrics(base)
                t1 = time.time()
                resp = client.chat.completions.create(
                    model="vlm",
                    messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
                    max_tokens=max_tokens,
                    temperature=0,
                    extra_body={"vllm_xargs": xargs} if xargs else None,
                )
                dt = time.time() - t1
                answer = (resp.choices[0].message.content or "").strip()
                ok = answer.lower() == q.answer  # the same rule as DemoAnswer.right
                n_prompt = resp.usage.prompt_tokens if resp.usage else 0
                verdict = "right" if ok else "WRONG"
                after = _metrics(base)
                print(f"   {label:<32} {answer!r:<12} {verdict:<6} [{dt:.1f} s, {n_prompt} tokens]")
                print(f"   {'':<32} KV: {_kv_line(before, after)}")
                freed = int(after.get("blocks_freed", 0) - before.get("blocks_freed", 0))
                results.append(DemoAnswer(q.text, q.answer, label, answer, n_prompt, freed))
    return results


def run_serve_demo(
    policy: str = "meda",
    budget: float = 0.5,
    compare: Sequence[str] = ("full", "snapkv"),
    max_tokens: int = 24,
    doc_words: int = 900,
) -> int:
    """SmolLM2 reads a long document with a planted passphrase and is asked for it."""
    from openai import OpenAI

    from vllm_kvmm.models.smollm2 import ensure_smollm2
    from vllm_kvmm.policies import make_policy

    make_policy(policy, budget)  # a bad name or budget fails before anything starts
    model = ensure_smollm2()
    with vllm_server(model, "smollm2", policy, budget, ["--max-model-len", "4096"]) as base:
        task = needle_prompt(words=doc_words)
        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        print(f"question: {task.question}  (planted answer: {task.answer!r})")
        for label, xargs in _runs(policy, budget, compare, 0.3):
            before = _metrics(base)
            t1 = time.time()
            resp = client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": task.user_message}],
                max_tokens=max_tokens,
                temperature=0,
                extra_body={"vllm_xargs": xargs} if xargs else None,
            )
            dt = time.time() - t1
            answer = (resp.choices[0].message.content or "").strip().replace("\n", " ")
            n_prompt = resp.usage.prompt_tokens if resp.usage else 0
            print(f"\n== {label}   [{dt:.1f} s, {n_prompt} prompt tokens]")
            found = "yes" if task.answer in answer.lower() else "no"
            print(f"   answer:  {answer!r}   (passphrase recalled: {found})")
            print(f"   KV:      {_kv_line(before, _metrics(base))}")
    return 0
