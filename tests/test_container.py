"""The image users deploy, built and run for real (podman here, docker where its daemon answers).

`make test` builds the image first (`make docker-build`, cached layers). The behavioural suite
(bad input, envelopes, formats, batches) also runs against it through the ``target`` fixture;
this file checks what only a container has: the classic ``docker run`` command, the user, the
pins, the health check, a worker killed inside, SIGTERM, ``--read-only`` + ``--memory``, and
the version life cycle across a restart.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time

import pytest
import requests
import tomllib

from serve_demo import cli
from serve_demo.archive.builder import build
from serve_demo.evaluate.evaluator import evaluate
from serve_demo.serve import container
from serve_demo.serve.management import Management
from serve_demo.serve.process import free_ports, wait_until
from tests.conftest import (
    DEMO_LABELS,
    DEMO_WEIGHTS,
    ROOT,
    archive_args,
    container_dir,
    encode,
    make_container,
    synth_image,
    workers,
)

LABELS = set(json.loads(DEMO_LABELS.read_text()).values())


def exec_python(engine, name: str, code: str) -> str:
    return engine("exec", name, "python", "-c", code).stdout


def in_image(engine, image: str, *cmd: str) -> str:
    """Run ``cmd`` in a throwaway container of ``image`` (entry point replaced)."""
    return engine("run", "--rm", *engine.run_flags(), "--entrypoint", cmd[0], image, *cmd[1:]).stdout


def labelled_boxes(body: object) -> list[dict]:
    assert isinstance(body, list) and body, body
    for det in body:
        (label,) = [k for k in det if k != "score"]
        assert label in LABELS and len(det[label]) == 4 and 0 <= det["score"] <= 1, det
    return body


@pytest.mark.server
def test_image_has_the_project_pins_java_17_and_a_non_root_user(engine, image):
    pins = dict(d.split("==") for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                if "==" in d)
    code = ("import json, os, sys, importlib.metadata as m; print(json.dumps({'uid': os.getuid(), "
            "'python': sys.version.split()[0], "
            "'dists': {d.metadata['Name'].lower(): d.version for d in m.distributions()}}))")
    facts = json.loads(in_image(engine, image, "python", "-c", code))
    assert facts["uid"] != 0
    assert facts["python"].startswith("3.11")
    assert {k: facts["dists"].get(k) for k in pins} == pins
    assert "serve-demo" in facts["dists"]
    java = engine("run", "--rm", *engine.run_flags(), "--entrypoint", "java", image, "-version").stderr
    assert 'version "17.' in java, java
    size = json.loads(engine("image", "inspect", image).stdout)[0]["Size"]
    print(f"\nimage {image}: {size / 1e9:.2f} GB, python {facts['python']}, torch {facts['dists']['torch']}")


@pytest.mark.server
def test_classic_docker_run_serves_labelled_boxes_as_non_root(engine, image, container_store, tmp_path):
    """`docker run --rm -p 127.0.0.1:PORT:8080 -v $(pwd)/model-store:/home/model-server/model-store IMAGE`."""
    port, name = free_ports(1)[0], f"serve-demo-classic-{free_ports(1)[0]}"
    cmd = [engine.exe, "run", "-d", "--rm", *engine.run_flags(), "--name", name, "-p", f"127.0.0.1:{port}:8080",
           "-v", f"{container_store}:/home/model-server/model-store", image]
    started = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True)
    try:
        ready = container.wait_healthy(engine, name, 300)
        print(f"\nclassic run: healthy {ready:.1f} s after `run` ({time.monotonic() - started:.1f} s with the command)")
        assert engine.health(name) == "healthy"
        key = container.container_key(engine, name)
        img = tmp_path / "shapes.jpg"
        img.write_bytes(encode(synth_image(3)))
        out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "-X", "POST",
                              f"http://127.0.0.1:{port}/predictions/shapes", "-T", str(img),
                              "-H", f"Authorization: Bearer {key}"], capture_output=True, text=True, check=True).stdout
        body, code = out.rsplit("\n", 1)
        assert code == "200", body
        labelled_boxes(json.loads(body))
        # every process of the container (entry point, JVM, Python workers) runs as model-server
        uids = json.loads(exec_python(engine, name, (
            "import glob, json; print(json.dumps(sorted({int(l.split()[1]) for f in glob.glob('/proc/[0-9]*/status') "
            "for l in open(f) if l.startswith('Uid:')})))")))
        assert uids == [container.IMAGE_UID], uids
        assert requests.post(f"http://127.0.0.1:{port}/predictions/shapes", data=b"x", timeout=10).status_code in (
            400, 401)  # no key: refused
    finally:
        container.stop(engine, name)


@pytest.mark.server
def test_container_is_healthy_and_reports_its_models(served_container):
    assert served_container.engine.health(served_container.name) == "healthy"
    print(f"\nmake docker-run's command: healthy after {served_container.startup_s:.1f} s")
    r = requests.get(f"{served_container.inference_url}/ping", headers=served_container.auth("inference"), timeout=10)
    assert r.status_code == 200
    names = set(served_container.models_status())
    assert {"shapes", "shapes_b4", "fixed"} <= names


@pytest.mark.server
def test_served_map_in_the_container_equals_the_host(served_container, server, test_split, tmp_path):
    results = {}
    for label, ts in (("host", server), ("container", served_container)):
        results[label] = evaluate(test_split, "test", model="shapes", url=ts.inference_url,
                                  management=Management(ts.management_url, home=ts.home), store=ts.model_store,
                                  token=ts.key("inference"), out=tmp_path / label, samples=0)
    host, cont = (results[k]["metrics"]["coco"] for k in ("host", "container"))
    print(f"\nmAP host {host['mAP']:.6f} container {cont['mAP']:.6f}; "
          f"mAP@0.5 {host['mAP_50']:.6f} {cont['mAP_50']:.6f}")
    assert not results["container"]["failures"] and not results["host"]["failures"]
    assert abs(host["mAP"] - cont["mAP"]) <= 1e-4 and abs(host["mAP_50"] - cont["mAP_50"]) <= 1e-4


@pytest.mark.server
def test_a_worker_killed_inside_the_container_is_replaced(served_container):
    c = served_container
    before = workers(c, "fixed")[0]["pid"]
    exec_python(c.engine, c.name, f"import os, signal; os.kill({before}, signal.SIGKILL)")
    started = time.monotonic()
    while time.monotonic() < started + 120:
        now = workers(c, "fixed")
        if now and now[0]["pid"] != before and now[0]["status"] == "READY":
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"worker {before} not replaced: {workers(c, 'fixed')}")
    print(f"\nworker {before} killed -> {now[0]['pid']} READY after {time.monotonic() - started:.1f} s")
    r = requests.post(f"{c.inference_url}/predictions/fixed", data=encode(synth_image(1)),
                      headers={"Content-Type": "image/jpeg", **c.auth("inference")}, timeout=60)
    assert r.status_code == 200, r.text
    assert c.engine.health(c.name) == "healthy"


def connected(port: int) -> int:
    """This process's established TCP connections to ``port`` (requests sent, not yet answered)."""
    import psutil

    proc = psutil.Process()
    conns = (getattr(proc, "net_connections", None) or proc.connections)("tcp")  # psutil < 6: connections
    return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == port)


@pytest.mark.server
def test_read_only_with_4g_serves_and_sigterm_drains(engine, image, container_store):
    """`--read-only --tmpfs /home/model-server/run --memory 4g`: serves; SIGTERM with requests in flight
    answers them all and exits 0 (drained, not killed)."""
    c = make_container(engine, image, None, container_store, read_only=True, memory="4g")
    c.start()
    try:
        info = engine.inspect(c.name)
        assert info["HostConfig"]["ReadonlyRootfs"] is True
        assert info["HostConfig"]["Memory"] == 4 << 30
        key = container.container_key(engine, c.name)
        headers = {"Content-Type": "image/jpeg", "Authorization": f"Bearer {key}"}
        url = f"{c.inference_url}/predictions/shapes"
        assert requests.post(url, data=encode(synth_image(2)), headers=headers, timeout=60).status_code == 200
        big = encode(synth_image(5, (1600, 1200)))
        answers: list[int] = []

        def send() -> None:
            try:
                answers.append(requests.post(url, data=big, headers=headers, timeout=60).status_code)
            except requests.RequestException as exc:
                answers.append(repr(exc))

        threads = [threading.Thread(target=send) for _ in range(12)]
        for t in threads:
            t.start()
        port = int(c.inference_url.rsplit(":", 1)[1])

        def all_sent() -> bool:  # each of the 12 is in flight or answered (answers first: never counted twice)
            done = len(answers)
            return done + connected(port) >= 12

        wait_until(all_sent, 30, what="12 requests sent to the container")
        t0 = time.monotonic()
        engine("kill", "--signal", "TERM", c.name)
        for t in threads:
            t.join(60)
        engine("wait", c.name, check=False, timeout=60)  # returns when the container has exited
        took = time.monotonic() - t0
        state = engine.inspect(c.name)["State"]
        print(f"\nSIGTERM with 12 requests queued: answers {answers}; exit {state.get('ExitCode')} after {took:.1f} s")
        assert answers == [200] * 12
        # 0, not 137: the entry point drained and TorchServe exited on SIGTERM, nothing was killed
        assert not state.get("Running") and state.get("ExitCode") == 0
    finally:
        c.stop()


@pytest.mark.server
def test_versions_live_in_the_mounted_store_and_survive_a_restart(engine, image, test_split, tmp_path_factory,
                                                                  container_tmp, capsys):
    """register, promote (with its gate), versions and rollback through the published management port,
    with the key from the mounted run folder; no `exec`."""
    store, later = container_dir(container_tmp, "versions-store"), tmp_path_factory.mktemp("later")
    build_dir = tmp_path_factory.mktemp("container-build")
    for version, folder in (("1.0", store), ("2.0", later)):  # 2.0 is archived after the container started
        build(archive_args(name="shapes", version=version, weights=str(DEMO_WEIGHTS), labels=str(DEMO_LABELS),
                           arch="fcos_tiny", export_path=str(folder), build_dir=str(build_dir)))
    c = make_container(engine, image, container_dir(container_tmp, "versions-home"), store)
    c.start()
    conn = ["--management-url", c.management_url, "--model-store", str(store), "--home", str(c.home)]

    def run(*argv: str) -> tuple[int, str]:
        rc = cli.main(list(argv))
        cap = capsys.readouterr()
        return rc, cap.out + cap.err

    try:
        shutil.move(later / "shapes-2.0.mar", store / "shapes-2.0.mar")
        assert run("register", "--model", "shapes", "--version", "2.0", *conn)[0] == 0
        rc, out = run("promote", "--model", "shapes", "--version", "2.0", "--url", c.inference_url,
                      "--dataset", str(test_split), "--limit", "20", *conn)
        assert rc == 0, out
        assert Management(c.management_url, home=c.home).default_version("shapes") == "2.0"
        c.stop()
        c.start()  # a new container on the same store: the registry brings 2.0 back as the default
        rc, out = run("versions", "--model", "shapes", *conn)
        assert rc == 0 and "2.0" in out and "1.0" in out, out
        mgmt = Management(c.management_url, home=c.home)
        assert mgmt.default_version("shapes") == "2.0"
        assert {v["modelVersion"] for v in c.models_status()["shapes"]} == {"1.0", "2.0"}
        assert run("rollback", "--model", "shapes", *conn)[0] == 0
        assert mgmt.default_version("shapes") == "1.0"
        registry = json.loads((store / "registry.json").read_text())["models"]["shapes"]
        assert registry["default"] == "1.0" and set(registry["versions"]) == {"1.0", "2.0"}
    finally:
        c.stop()


@pytest.mark.server
def test_no_archives_is_a_clear_error(engine, image, container_tmp):
    empty = container_dir(container_tmp, "empty-store")
    proc = engine("run", "--rm", *engine.run_flags(), "-v", f"{empty}:/home/model-server/model-store", image,
                  check=False, timeout=120)
    assert proc.returncode == 2
    assert "no model archives (.mar)" in proc.stderr + proc.stdout and "-v $(pwd)/model-store" in proc.stderr


@pytest.mark.server
def test_sbom_lists_the_image_python_packages(engine, image, tmp_path):
    out = tmp_path / "sbom.cdx.json"
    n = container.sbom(engine, image, out)
    doc = json.loads(out.read_text())
    assert doc["bomFormat"] == "CycloneDX" and n > 100
    versions = {c["name"].lower(): c.get("version") for c in doc["components"]}
    assert versions["torch"] == "2.14.1" and versions["torchserve"] == "0.12.0"
    assert all(c.get("purl", "").startswith("pkg:pypi/") for c in doc["components"] if c["name"] != "serve-demo")
    # the image's environment only: the host venv's test tools (mounted to run the tool) are not in it
    assert "selenium" not in versions and "tritonclient" not in versions and "serve-demo" in versions


@pytest.mark.unit
def test_host_pip_settings_are_mounted_under_host_pip(tmp_path):
    index = tmp_path / "pypi" / "simple"
    index.mkdir(parents=True)
    cert = tmp_path / "ca.crt"
    cert.write_text("x")
    args, volumes = container.pip_build_args({"PIP_EXTRA_INDEX_URL": f"file://{index} https://example.org/simple",
                                              "PIP_CERT": str(cert), "PIP_DEFAULT_TIMEOUT": "60"})
    assert f"PIP_EXTRA_INDEX_URL=file://{container.HOST_PIP}{index} https://example.org/simple" in args
    assert f"PIP_CERT={container.HOST_PIP}{cert}" in args and "PIP_DEFAULT_TIMEOUT=60" in args
    # an index's parent is mounted: its pages link to ../../files/
    assert f"{index.parent}:{container.HOST_PIP}{index.parent}:ro" in volumes
    assert f"{cert}:{container.HOST_PIP}{cert}:ro" in volumes


@pytest.mark.unit
def test_run_command_publishes_on_loopback_and_mounts_store_and_home(tmp_path):
    engine = container.Engine("podman", "/usr/bin/podman")
    spec = container.RunSpec(image="img", name="n", store=tmp_path / "s", home=tmp_path / "h", gpus="none",
                             read_only=True, memory="4g")
    cmd = container.run_command(engine, spec)
    text = " ".join(cmd)
    assert "-p 127.0.0.1:8080:8080" in text and "-p 127.0.0.1:8081:8081" in text
    assert f"{tmp_path / 's'}:/home/model-server/model-store:ro" in text
    assert f"{tmp_path / 'h'}:/home/model-server/run" in text
    assert "--read-only" in cmd and "--memory 4g" in text and cmd[-1] == "img"
    assert "--gpus" not in cmd and "nvidia.com/gpu=all" not in text
    gpu = container.run_command(container.Engine("docker", "/usr/bin/docker"),
                                container.RunSpec(image="img", home=None, gpus="all"))
    assert "--gpus all" in " ".join(gpu)


@pytest.mark.server
def test_the_kserve_manifest_command_serves_the_same_archive(engine, image, container_store):
    """docker/k8s/inferenceservice-kserve.yaml's command in this image: KServe's ModelServer, no JVM."""
    import yaml

    (isvc,) = [d for d in yaml.safe_load_all((ROOT / "docker/k8s/inferenceservice-kserve.yaml").read_text()) if d]
    (spec,) = isvc["spec"]["predictor"]["containers"]
    args = [a.replace("/mnt/models", container.IMAGE_STORE) for a in spec["args"]]
    port, name = free_ports(1)[0], f"serve-demo-kserve-{free_ports(1)[0]}"
    engine("run", "-d", *engine.run_flags(), "--name", name, "-p", f"127.0.0.1:{port}:8080",
           "-v", f"{container_store}:{container.IMAGE_STORE}:ro", "--entrypoint", spec["command"][0], image,
           *spec["command"][1:], *args)
    try:
        url = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        while time.monotonic() < started + 120:
            try:
                if requests.get(f"{url}/v2/models/shapes/ready", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert engine.inspect(name)["State"].get("Running"), container.logs(engine, name)
            time.sleep(0.5)
        r = requests.post(f"{url}/predictions/shapes", data=encode(synth_image(3)),
                          headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert r.status_code == 200, r.text
        labelled_boxes(r.json())
        print(f"\nKServe ModelServer in the image: ready after {time.monotonic() - started:.1f} s")
    finally:
        container.stop(engine, name)
