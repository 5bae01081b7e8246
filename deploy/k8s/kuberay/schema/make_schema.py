"""Regenerate the vendored KubeRay schemas from KubeRay's CRDs (see README.md next to this file).

    python deploy/k8s/kuberay/schema/make_schema.py --write ray.io_rayclusters.yaml ray.io_rayservices.yaml

writes ``raycluster-v1.schema.json`` and ``rayservice-v1.schema.json`` (``<kind>-<version>``, lower case)
next to this script; with one CRD and no ``--write`` the schema goes to stdout instead.

Takes the ``v1`` version's ``openAPIV3Schema`` from the CRD and
  * drops ``status`` (written by the operator, never by us) and every ``description`` (most of the bytes);
  * makes it strict: every object schema with ``properties`` and no ``additionalProperties`` gets
    ``additionalProperties: false``. The API server rejects unknown fields the same way under strict field
    validation (kubectl's default since Kubernetes 1.27), so a misspelt field fails here too, not silently;
  * moves subtrees that occur more than once (the head's and the worker groups' pod templates share most
    of theirs) into ``$defs`` and refers to them, which keeps the file reviewable.

Everything else (types, enums, patterns, required lists, int-or-string ``anyOf``) is kept as it is. CEL rules
(``x-kubernetes-validations``) stay in the file but JSON Schema validators ignore them.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

MIN_SHARED_BYTES = 2000  # subtrees smaller than this stay inline


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _strip(v) for k, v in node.items() if k != "description"}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _key(node: Any) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def _count(node: Any, counts: dict[str, int]) -> None:
    if isinstance(node, dict):
        if "$ref" not in node:
            k = _key(node)
            if len(k) >= MIN_SHARED_BYTES:
                counts[k] = counts.get(k, 0) + 1
        for v in node.values():
            _count(v, counts)
    elif isinstance(node, list):
        for v in node:
            _count(v, counts)


def _replace(node: Any, target: str, ref: dict[str, str]) -> Any:
    if isinstance(node, dict):
        if _key(node) == target:
            return ref
        return {k: _replace(v, target, ref) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace(v, target, ref) for v in node]
    return node


def _factor(schema: dict[str, Any]) -> dict[str, Any]:
    """Replace repeated large object subtrees with ``$ref``s into ``$defs`` (largest first)."""
    defs: dict[str, Any] = {}
    while True:
        counts: dict[str, int] = {}
        _count(schema, counts)
        repeated = [k for k, n in counts.items() if n > 1]
        if not repeated:
            break
        target = max(repeated, key=len)
        name = "s" + hashlib.sha256(target.encode()).hexdigest()[:12]
        ref = {"$ref": f"#/$defs/{name}"}
        schema = _replace(schema, target, ref)
        defs = {k: _replace(v, target, ref) for k, v in defs.items()}
        defs[name] = json.loads(target)
    return {**schema, "$defs": dict(sorted(defs.items()))} if defs else schema


def make_schema(crd: dict[str, Any], version: str = "v1") -> dict[str, Any]:
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = dict(entry["schema"]["openAPIV3Schema"])
    schema["properties"] = {k: v for k, v in schema["properties"].items() if k != "status"}
    schema = _factor(_strip(schema))
    names = crd["spec"]["names"]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (
            f"{names['kind']} {crd['spec']['group']}/{version}, pruned from KubeRay's CRD "
            f"{crd['metadata']['name']} (Apache-2.0); provenance in README.md, regenerate with make_schema.py"
        ),
        **schema,
    }


def schema_name(crd: dict[str, Any], version: str = "v1") -> str:
    """The file name a CRD's schema is vendored under: ``raycluster-v1.schema.json`` and so on."""
    return f"{crd['spec']['names']['kind'].lower()}-{version}.schema.json"


def render(crd: dict[str, Any]) -> str:
    return json.dumps(make_schema(crd), indent=1, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    args = argv[1:]
    write = "--write" in args
    paths = [a for a in args if a != "--write"]
    if not paths or (not write and len(paths) > 1):
        sys.stderr.write(f"usage: {argv[0]} CRD.yaml  |  {argv[0]} --write CRD.yaml...\n")
        return 2
    for path in paths:
        crd = yaml.safe_load(Path(path).read_text())
        if write:
            out = Path(__file__).resolve().parent / schema_name(crd)
            out.write_text(render(crd))
            sys.stderr.write(f"{path} -> {out}\n")
        else:
            sys.stdout.write(render(crd))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
