"""What can be checked here of the container and Kubernetes path (no Docker engine, no GPU):
lint, build inputs, config keys, the environment-override mechanism and the health check
against a real TorchServe, Python 3.9 compatibility of container-side code, and the manifests
validated offline. `scripts/verify_gpu_container.sh` checks the rest on a Docker + GPU host."""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import requests
import yaml

from serve_demo.serve.torchserve import read_properties
from tests.conftest import ROOT, encode, make_server, synth_image

DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent


@pytest.mark.integration
def test_hadolint_clean():
    proc = subprocess.run([str(BIN / "hadolint"), str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def dockerfile_copies() -> list[str]:
    text = (DOCKER / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    sources = []
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        parts = [p for p in line.split() if not p.startswith("--")]
        for src in parts[:-1]:
            sources.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], src).rstrip("/"))
    return sources


@pytest.mark.integration
def test_copy_sources_exist_and_reach_the_build_context():
    rules = [r.strip() for r in (ROOT / ".dockerignore").read_text().splitlines() if r.strip() and r[0] != "#"]

    def included(path: str) -> bool:
        keep = True
        for rule in rules:
            negate = rule.startswith("!")
            if fnmatch.fnmatch(path, rule.lstrip("!")):
                keep = negate
        return keep

    sources = dockerfile_copies()
    assert set(sources) == {"pyproject.toml", "README.md", "serve_demo", "docker/config.properties",
                            "docker/metrics.yaml", "docker/log4j2.xml", "docker/healthcheck.py"}
    for src in sources:
        assert (ROOT / src).exists(), src
        assert included(src), f"{src} is excluded by .dockerignore"
    # archives are mounted, not baked in; nothing heavy or private reaches the build
    assert not included("model-store/shapes-1.0.mar") and not included("weights/shapes.pt")
    assert not included(".venv/bin/python") and not included("data/shapes/test/test_00000.jpg")
    assert not included("serve_demo/core/__pycache__") and not included("build/server/key_file.json")


def torchserve_config_keys() -> set[str]:
    """The property names TorchServe 0.12 knows: string constants of its ConfigManager class."""
    import ts

    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    with zipfile.ZipFile(jar) as z:
        data = z.read("org/pytorch/serve/util/ConfigManager.class")
    return {s.decode() for s in re.findall(rb"[a-z][a-z0-9_]{2,}", data)}


@pytest.mark.integration
def test_config_keys_are_known_to_torchserve():
    known = torchserve_config_keys()
    props = read_properties(DOCKER / "config.properties")
    unknown = sorted(set(props) - known)
    assert not unknown, f"keys TorchServe 0.12 does not read: {unknown}"
    assert "inference_address" in known and "nonsense_key" not in known
    env = dict(re.findall(r"(TS_\w+)=(\S+)", (DOCKER / "Dockerfile").read_text()))
    for manifest in (DOCKER / "k8s").glob("*.yaml"):
        env.update(dict(re.findall(r"name: (TS_\w+)\s+value: \"?([^\"\n]+)", manifest.read_text())))
    for name in env:
        assert name[3:].lower() in known, f"{name} does not name a TorchServe key"


@pytest.mark.integration
def test_archive_code_runs_on_python_39():
    """Archives carry core/ and the handler, and may be served by the official TorchServe image (Python
    3.9): they must parse there (our own image runs 3.11)."""
    files = sorted((ROOT / "serve_demo" / "core").glob("*.py")) + [ROOT / "handlers" / "detector_handler.py",
                                                                    DOCKER / "healthcheck.py"]
    for path in files:
        src = path.read_text()
        ast.parse(src, filename=str(path), feature_version=(3, 9))
        assert "from __future__ import annotations" in src or path.name == "__init__.py", path
        assert not re.search(r"zip\([^)]*strict=|slots=True|kw_only=", src), path


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, model_store) -> Path:
    store = tmp_path_factory.mktemp("docker-store")
    shutil.copy(model_store / "fixed-1.0.mar", store)
    return store


@pytest.mark.server
def test_environment_overrides_and_healthcheck(tmp_path, small_store):
    """The container's mechanism on a real TorchServe: TS_* variables override the shipped config
    (a different inference address; tokens off, as the Kubernetes manifests set), and
    healthcheck.py reports healthy only once workers are READY."""
    from serve_demo.serve.process import free_ports

    ts = make_server(tmp_path / "home", small_store)
    moved = free_ports(1)[0]
    ts.environment = {"TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{moved}", "TS_DISABLE_TOKEN_AUTHORIZATION": "true"}
    health = [sys.executable, str(DOCKER / "healthcheck.py")]
    henv = {"HEALTHCHECK_HOME": str(ts.home), "TS_MANAGEMENT_ADDRESS": ts.management_url, "PATH": "/usr/bin:/bin"}
    assert subprocess.run(health, env=henv, capture_output=True).returncode == 1  # nothing running
    ts.start()
    try:
        ts.wait_ready(timeout=120)
        proc = subprocess.run(health, env=henv, capture_output=True, text=True)
        assert proc.returncode == 0 and "healthy: fixed" in proc.stdout, proc.stdout
        img = encode(synth_image(80, (100, 80)))
        r = requests.post(f"http://127.0.0.1:{moved}/predictions/fixed", data=img, timeout=30)
        assert r.status_code == 200, r.text  # moved, and no key needed
        with pytest.raises(requests.ConnectionError):
            requests.post(f"{ts.inference_url}/predictions/fixed", data=img, timeout=5)
    finally:
        ts.stop()
    assert subprocess.run(health, env=henv, capture_output=True).returncode == 1


@pytest.mark.integration
def test_healthy_means_every_recorded_version_registered_with_its_default(tmp_path, model_store, fixed_weights):
    """The restart race: a server still registering the recorded 2.0 (or not yet making it the
    default) is not healthy, whatever its READY workers say."""
    from serve_demo.archive.builder import build
    from serve_demo.serve.management import Management
    from tests.conftest import ASSETS, archive_args

    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(model_store / "fixed-1.0.mar", store)
    build(archive_args(name="fixed", version="2.0", weights=str(fixed_weights),
                       labels=str(ASSETS / "fixed_labels.json"), model_file=str(ASSETS / "fixed_detector.py"),
                       export_path=str(store), build_dir=str(tmp_path / "build")))
    ts = make_server(tmp_path / "home", store)
    ts.models = "fixed-1.0.mar"
    ts.home.mkdir(parents=True)
    (ts.home / "health.json").write_text(json.dumps({
        "management": ts.management_url, "keys": [str(ts.home / "key_file.json")],
        "expect": {"fixed": {"versions": ["1.0", "2.0"], "default": "2.0"}}}))
    health = [sys.executable, str(DOCKER / "healthcheck.py")]
    henv = {"HEALTHCHECK_HOME": str(ts.home), "PATH": "/usr/bin:/bin"}

    def probe() -> tuple[int, str]:
        proc = subprocess.run(health, env=henv, capture_output=True, text=True, timeout=30)
        return proc.returncode, proc.stdout.strip()

    with ts.running(120):
        assert probe() == (1, "fixed: recorded versions 2.0 not registered yet")
        mgmt = Management(ts.management_url, home=ts.home)
        mgmt.register("fixed-2.0.mar")
        assert probe() == (1, "fixed: default is 1.0, recorded 2.0 (not set yet)")
        mgmt.set_default("fixed", "2.0")
        assert probe() == (0, "healthy: fixed")


def load_manifests(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DOCKER / "k8s" / name).read_text()) if d]


@pytest.mark.integration
def test_kubernetes_manifests_validate_offline():
    import kubernetes_validate

    docs = load_manifests("deployment.yaml")
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "HorizontalPodAutoscaler"]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    svc = docs[1]
    assert [p["port"] for p in svc["spec"]["ports"]] == [8080]  # only inference is exposed
    (c,) = docs[0]["spec"]["template"]["spec"]["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/home/model-server/model-store"]["readOnly"] is True
    assert {"/home/model-server/run", "/tmp"} <= set(mounts)  # the only writable paths


PREDICTOR_FIELDS = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "containerConcurrency", "timeout",
                    "canaryTrafficPercent", "containers", "serviceAccountName", "nodeSelector", "tolerations"}


@pytest.mark.integration
@pytest.mark.parametrize("name", ["inferenceservice.yaml", "inferenceservice-canary.yaml"])
def test_inferenceservice(name):
    """KServe's schema is not bundled: known v1beta1 predictor fields, and the container checked
    as a Kubernetes Pod spec (strict)."""
    import kubernetes_validate

    (isvc,) = load_manifests(name)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    pred = isvc["spec"]["predictor"]
    assert set(pred) <= PREDICTOR_FIELDS, set(pred) - PREDICTOR_FIELDS
    assert pred["scaleMetric"] == "concurrency" and pred["scaleTarget"] > 0
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": pred["containers"]}}
    kubernetes_validate.validate(pod, "1.30.0", strict=True)
    (c,) = pred["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["readinessProbe"]["exec"]["command"][-1] == "/home/model-server/healthcheck.py"
    assert c["livenessProbe"]["httpGet"]["path"] == "/ping"
    assert isvc["metadata"]["annotations"]["prometheus.io/port"] == "8082"
    # the archives come from storage: the entry point reads the folder KServe fills
    assert c["args"] == ["--model-store", "/mnt/models"]
    assert any(e["name"] == "STORAGE_URI" for e in c["env"])
    from serve_demo.serve.entrypoint import build_parser

    assert str(build_parser().parse_args(c["args"]).model_store) == "/mnt/models"
    if "canary" in name:
        assert pred["canaryTrafficPercent"] == 10


@pytest.mark.integration
def test_compose_publishes_management_on_loopback_only():
    svc = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["serve-demo"]
    assert "8080:8080" in svc["ports"]
    assert {p for p in svc["ports"] if not p.startswith("127.0.0.1:")} == {"8080:8080"}
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


@pytest.mark.integration
def test_inferenceservice_for_the_kserve_server():
    """The KServe-server predictor: a valid Pod container that runs our ModelServer on the archive,
    probed on the OIP v2 health routes that server answers."""
    import kubernetes_validate

    (isvc,) = load_manifests("inferenceservice-kserve.yaml")
    pred = isvc["spec"]["predictor"]
    assert set(pred) <= PREDICTOR_FIELDS, set(pred) - PREDICTOR_FIELDS
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": pred["containers"]}}
    kubernetes_validate.validate(pod, "1.30.0", strict=True)
    (c,) = pred["containers"]
    assert c["command"][-1] == "serve_demo.serve.kserve_server" and "--archive" in c["args"]
    flags = dict(zip(c["args"][::2], c["args"][1::2]))  # in the pod: every interface, the gateway authenticates
    assert flags["--bind"] == "0.0.0.0" and flags["--auth"] == "off", flags
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/models/shapes/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
