"""TorchServe's own commands against our image, and the Kubernetes Deployment played for real (podman).

Each test is a row of the "Coming from TorchServe" table (docs/coming-from-torchserve.md):
the official image's ``docker run ... torchserve --start --model-store model-store --models ...``
serving our archive, a stock-handler archive and the tutorial's R50-FPN model; any other command
run as given from ``/home/model-server``; a user's own ``config.properties`` and ``TS_*``
variables; and ``podman kube play docker/k8s/deployment.yaml`` with its readiness probe.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
import yaml

from serve_demo.archive.builder import build
from serve_demo.serve import container
from serve_demo.serve.process import free_ports
from tests.conftest import DEMO_LABELS, DEMO_WEIGHTS, ROOT, archive_args, container_dir, encode, synth_image
from tests.test_bring_your_own import TUTORIAL, stock_archive

pytestmark = pytest.mark.server  # this file's layer (conftest.py: every test declares one)

OFFICIAL = ["torchserve", "--start", "--model-store", "model-store", "--models"]


def post(url: str, model: str, data: bytes, key: str | None = None, **headers) -> requests.Response:
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{url}/predictions/{model}", data=data, timeout=120,
                         headers={"Content-Type": "image/jpeg", **auth, **headers})


@pytest.fixture(scope="module")
def byo_store(container_tmp, tmp_path_factory) -> Path:
    """What a TorchServe user's model-store/ holds: our archive, a stock `object_detector` archive
    (pets.mar, the archiver's own name) and the tutorial's model.py + R50-FPN state_dict archived by us."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    store = container_dir(container_tmp, "byo-store")
    work = tmp_path_factory.mktemp("byo")
    build(archive_args(name="shapes", weights=str(DEMO_WEIGHTS), labels=str(DEMO_LABELS), arch="fcos_tiny",
                       export_path=str(store), build_dir=str(work / "build")))
    stock_archive(store, "pets", "1.0", work / "stock")
    torch.manual_seed(0)
    torch.save(FasterRCNN(resnet_fpn_backbone(backbone_name="resnet50", weights=None), 91).state_dict(),
               work / "model.pt")
    (work / "index_to_name.json").write_text(json.dumps({str(i): f"class_{i}" for i in range(91)}))
    build(archive_args(name="tutorial", weights=str(work / "model.pt"), labels=str(work / "index_to_name.json"),
                       model_file=str(TUTORIAL), export_path=str(store), build_dir=str(work / "build"), threads=2))
    for p in store.iterdir():
        p.chmod(0o644)
    return store


def test_official_torchserve_start_serves_ours_stock_and_the_tutorial_model(engine, image, byo_store):
    """`docker run -p 127.0.0.1:P:8080 -v $(pwd)/model-store:/home/model-server/model-store IMAGE
    torchserve --start --model-store model-store --models ...`: up while TorchServe runs, healthy once the
    named models' workers are READY, and SIGTERM answers the requests in flight and exits 0."""
    port, name = free_ports(1)[0], f"serve-demo-official-{free_ports(1)[0]}"
    engine("run", "-d", *engine.run_flags(), "--name", name, "-p", f"127.0.0.1:{port}:8080",
           "-v", f"{byo_store}:{container.IMAGE_STORE}", image,
           *OFFICIAL, "shapes=shapes-1.0.mar", "pets.mar", "tutorial=tutorial-1.0.mar")
    try:
        ready = container.wait_healthy(engine, name, 300)
        print(f"\nofficial `torchserve --start --models` (3 models, one R50-FPN): healthy after {ready:.1f} s")
        url, key = f"http://127.0.0.1:{port}", container.container_key(engine, name)
        data = encode(synth_image(3))
        ours = post(url, "shapes", data, key)
        stock = post(url, "pets", data, key)
        tutorial = post(url, "tutorial", data, key, **{"X-Response-Format": "detailed"})
        assert ours.status_code == stock.status_code == tutorial.status_code == 200, (ours.text, stock.text)
        # the stock handler answers our model's boxes in its own format (unrounded floats)
        assert [set(d) for d in ours.json()] == [set(d) for d in stock.json()] and ours.json()
        assert isinstance(tutorial.json()["detections"], list)
        assert post(url, "shapes", data).status_code in (400, 401)  # the image's token authorization is on
        big = encode(synth_image(5, (1600, 1200)))
        answers: list = []
        threads = [threading.Thread(target=lambda: answers.append(post(url, "shapes", big, key).status_code))
                   for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        engine("kill", "--signal", "TERM", name)
        for t in threads:
            t.join(60)
        while engine.inspect(name)["State"].get("Running") and time.monotonic() < t0 + 30:
            time.sleep(0.1)
        state = engine.inspect(name)["State"]
        print(f"SIGTERM with 6 requests in flight: answers {answers}, exit {state.get('ExitCode')} "
              f"after {time.monotonic() - t0:.1f} s")
        assert answers == [200] * 6
        assert not state.get("Running") and state.get("ExitCode") == 0
    finally:
        container.stop(engine, name)


def test_any_other_command_runs_as_given_from_home_model_server(engine, image, container_tmp):
    """`docker run IMAGE torch-model-archiver ...` builds a stock archive into the mounted store (relative
    paths from /home/model-server, as in the official image); one quoted line runs through a shell."""
    store = container_dir(container_tmp, "archiver-store")
    src = container_dir(container_tmp, "archiver-store/src")
    for f in (ROOT / "tests/assets/stock_shapes/model.py", DEMO_WEIGHTS):
        shutil.copy2(f, src / f.name)
    shutil.copy2(ROOT / "serve_demo/core/models.py", src / "shapes_layers.py")
    shutil.copy2(DEMO_LABELS, src / "index_to_name.json")
    for p in (store, src, *src.iterdir()):
        p.chmod(0o777 if p.is_dir() else 0o644)
    proc = engine("run", "--rm", *engine.run_flags(), "-v", f"{store}:{container.IMAGE_STORE}", image,
                  "torch-model-archiver", "--model-name", "pets", "--version", "1.0",
                  "--model-file", "model-store/src/model.py", "--serialized-file", "model-store/src/shapes.pt",
                  "--handler", "object_detector", "--export-path", "model-store",
                  "--extra-files", "model-store/src/index_to_name.json,model-store/src/shapes_layers.py",
                  check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (store / "pets.mar").stat().st_size > 1_000_000
    proc = engine("run", "--rm", *engine.run_flags(), image, "echo $PWD; id -u; ls", check=False, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split()[:2] == ["/home/model-server", "1000"], proc.stdout
    assert "config.properties" in proc.stdout
    proc = engine("run", "--rm", *engine.run_flags(), image, "false", check=False, timeout=120)
    assert proc.returncode == 1  # the command's status is the container's


def test_a_users_config_properties_and_ts_variables_are_honoured(engine, image, container_tmp, container_store):
    """A config.properties mounted at /home/model-server/config.properties (its own ports, no tokens) with
    `serve`, and a TS_* variable on top (TS_MAX_REQUEST_SIZE), as the official image honours them."""
    conf = container_dir(container_tmp, "user-config") / "config.properties"
    conf.write_text("inference_address=http://0.0.0.0:9080\nmanagement_address=http://127.0.0.1:9081\n"
                    "metrics_address=http://127.0.0.1:9082\ndisable_token_authorization=true\n"
                    "enable_envvars_config=true\nenable_model_api=true\n")
    conf.chmod(0o644)
    port, name = free_ports(1)[0], f"serve-demo-userconf-{free_ports(1)[0]}"
    engine("run", "-d", *engine.run_flags(), "--name", name, "-p", f"127.0.0.1:{port}:9080",
           "-v", f"{conf}:/home/model-server/config.properties:ro", "-e", "TS_MAX_REQUEST_SIZE=300000",
           "-v", f"{container_store}:{container.IMAGE_STORE}:ro", image)
    try:
        container.wait_healthy(engine, name, 300)  # the health check found management on 9081
        url = f"http://127.0.0.1:{port}"
        small = encode(synth_image(2))
        assert post(url, "shapes", small).status_code == 200  # no key: the user's config turned tokens off
        large = encode(synth_image(2, (1400, 1400)), "PNG")
        assert len(large) > 300_000
        r = post(url, "shapes", large, **{"Content-Type": "image/png"})
        assert r.status_code == 413, (r.status_code, r.text[:200])  # TS_MAX_REQUEST_SIZE
        plan = json.loads(engine("exec", name, "cat", f"{container.IMAGE_RUN}/health.json").stdout)
        assert plan["management"] == "http://127.0.0.1:9081" and "shapes" in plan["expect"]
    finally:
        container.stop(engine, name)


# ------------------------------------------------------------------------------ podman kube play


DEPLOYMENT = ROOT / "docker" / "k8s" / "deployment.yaml"


def deployment_docs(image: str, claim: str, name: str | None = None, shift: int = 0) -> list[dict]:
    """The manifest as written, with only the image and the store's claim swapped for local ones; for a
    second replica (``name``, ``shift``) its own name, ports (podman publishes every containerPort) and
    emptyDir volumes."""
    docs = [d for d in yaml.safe_load_all(DEPLOYMENT.read_text()) if d]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    c["image"] = image if "/" in image.split(":")[0] else f"localhost/{image}"
    (vol,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    vol["persistentVolumeClaim"]["claimName"] = claim
    if name:
        dep["metadata"]["name"] = name
        # podman 4.3 makes each emptyDir a named volume shared by every pod using that name: give this
        # replica its own (a Kubernetes emptyDir is per pod anyway)
        empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for item in [*pod["volumes"], *c["volumeMounts"]]:
            if item["name"] in empty:
                item["name"] = f"{name}-{item['name']}"
        for p in c["ports"]:
            p["containerPort"] += shift
        c["env"] = [e for e in c["env"] if e["name"] != "TS_METRICS_ADDRESS"] + [
            {"name": "TS_INFERENCE_ADDRESS", "value": f"http://0.0.0.0:{8080 + shift}"},
            {"name": "TS_METRICS_ADDRESS", "value": f"http://0.0.0.0:{8082 + shift}"}]
    return [dep]  # Service and HPA: podman kube play plays pods, see the docs


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def test_the_kubernetes_deployment_plays_and_its_readiness_probe_turns_ready(engine, image, container_store,
                                                                            tmp_path):
    """`podman kube play docker/k8s/deployment.yaml`: two replicas (a second play on its own ports), each
    turns ready by the manifest's own readiness probe and answers curl (tokens off, as the manifest says)."""
    if not engine.podman:
        pytest.skip("kube play is podman's; with docker, kubectl apply the manifest to a cluster")
    busy = [p for p in (8080, 8082, 8180, 8182) if not port_free(p)]
    if busy:
        pytest.fail(f"ports {busy} are in use: the manifest's containerPorts are published on the host by "
                    "podman kube play; stop what listens there (make stop, make docker-stop)")
    conf = tmp_path / "containers.conf"  # this VM's limits: the same settings as container.Engine.run_flags
    conf.write_text('[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
                    '[engine]\nruntime = "runc"\n')
    env = {"CONTAINERS_CONF": str(conf), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
    claim = f"serve-demo-model-store-test-{free_ports(1)[0]}"
    engine("volume", "create", claim)
    mount = Path(engine("volume", "inspect", claim, "--format", "{{.Mountpoint}}").stdout.strip())
    for mar in container_store.glob("*.mar"):
        shutil.copy2(mar, mount / mar.name)
    mount.chmod(0o755)
    plays = [(tmp_path / "replica-0.yaml", deployment_docs(image, claim), 8080),
             (tmp_path / "replica-1.yaml", deployment_docs(image, claim, "serve-demo-2", 100), 8180)]
    (probe,) = [c["readinessProbe"]["exec"]["command"] for d in plays[0][1]
                for c in d["spec"]["template"]["spec"]["containers"]]
    try:
        started = time.monotonic()
        for path, docs, _ in plays:
            path.write_text(yaml.safe_dump_all(docs))
            proc = subprocess.run([engine.exe, "kube", "play", str(path)], env=env, capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode == 0, proc.stderr
        names = [f"{docs[0]['metadata']['name']}-pod-0-torchserve" for _, docs, _ in plays]
        for n in names:
            deadline = time.monotonic() + 300
            while True:  # what the kubelet does with an exec readiness probe
                proc = engine("exec", n, *probe, check=False, timeout=30)
                if proc.returncode == 0:
                    break
                assert time.monotonic() < deadline, f"{n} not ready: {proc.stdout} {container.logs(engine, n)}"
                time.sleep(2)
        print(f"\nkube play: 2 replicas ready by the manifest's readiness probe after "
              f"{time.monotonic() - started:.1f} s")
        for n, (_, _, port) in zip(names, plays):
            info = engine.inspect(n)
            assert info["HostConfig"]["ReadonlyRootfs"] is True and info["Config"]["User"].startswith("1000")
            out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "-X", "POST",
                                  f"http://127.0.0.1:{port}/predictions/shapes", "-T", "-"],
                                 input=encode(synth_image(3)), capture_output=True, check=True).stdout.decode()
            body, code = out.rsplit("\n", 1)
            assert code == "200" and json.loads(body), body
            metrics = requests.get(f"http://127.0.0.1:{port + 2}/metrics", timeout=10).text
            assert "ts_inference_requests_total" in metrics
    finally:
        for path, _, _ in plays:
            if path.is_file():
                subprocess.run([engine.exe, "kube", "play", "--down", str(path)], env=env, capture_output=True,
                               timeout=120)
        engine("volume", "rm", "-f", claim, check=False)
