"""Versions: the registry's pure logic, then the whole life cycle against a real TorchServe.

The life-cycle test serves two versions of one model trained differently: ``det 1.0`` is the
1-epoch checkpoint (``weights/shapes_1ep.pt``), ``det 2.0`` the 9-epoch demo model.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests

from serve_demo import cli
from serve_demo.archive.builder import build
from serve_demo.evaluate.gate import gate_drops, gate_table
from serve_demo.serve.kserve_local import KServeServer
from serve_demo.serve.management import Management
from serve_demo.serve.versions import (
    Registry,
    VersionError,
    register_new_models,
    start_from_registry,
    version_key,
)
from tests.conftest import (
    ASSETS,
    DEMO_LABELS,
    DEMO_WEIGHTS,
    ROOT,
    archive_args,
    encode,
    make_server,
    synth_image,
)

EARLY_WEIGHTS = ROOT / "weights" / "shapes_1ep.pt"


def fake_mar(path: Path, name: str, version: str) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": name, "modelVersion": version}}))
    return path


@pytest.mark.unit
def test_version_order_is_natural():
    assert sorted(["1.10", "1.9", "2.0", "1.0-rc1", "1.0"], key=version_key) == ["1.0", "1.0-rc1", "1.9", "1.10", "2.0"]


@pytest.mark.unit
def test_registry_default_history_and_rollback(tmp_path):
    reg = Registry.load(tmp_path)
    reg.add("det", "1.0", "det-1.0.mar")
    reg.add("det", "2.0", "det-2.0.mar")
    assert reg.models["det"]["default"] == "1.0"  # the first registered, like TorchServe
    assert reg.set_default("det", "2.0", {"mAP_to": 0.8}) == "1.0"
    reg.save()
    reg = Registry.load(tmp_path)
    assert reg.models["det"]["default"] == "2.0" and reg.models["det"]["history"] == ["1.0"]
    assert reg.models["det"]["log"][-1]["mAP_to"] == 0.8
    assert reg.rollback("det") == ("2.0", "1.0")
    with pytest.raises(VersionError, match="no previous default"):
        reg.rollback("det")
    with pytest.raises(VersionError, match="not registered"):
        reg.set_default("det", "3.0")


@pytest.mark.unit
def test_registry_sync_with_store(tmp_path):
    fake_mar(tmp_path / "det-1.0.mar", "det", "1.0")
    fake_mar(tmp_path / "det-1.10.mar", "det", "1.10")
    fake_mar(tmp_path / "other-1.0.mar", "other", "1.0")
    (tmp_path / "broken.mar").write_bytes(b"not a zip")
    reg = Registry.load(tmp_path)
    warnings = reg.sync(tmp_path)
    assert any("broken.mar is not a model archive" in w for w in warnings)
    # a model without a record serves its highest version; the others wait for `make register`
    assert reg.models["det"]["versions"] == {"1.10": "det-1.10.mar"}
    assert reg.load_plan() == (["det-1.10.mar", "other-1.0.mar"], [])
    reg.add("det", "1.0", "det-1.0.mar")
    reg.set_default("det", "1.0")
    assert reg.load_plan() == (["det-1.0.mar", "other-1.0.mar"], ["det-1.10.mar"])
    (tmp_path / "det-1.0.mar").unlink()
    assert any("det-1.0.mar is gone" in w for w in reg.sync(tmp_path))
    assert reg.models["det"]["default"] == "1.10"


def _result(version: str, mAP: float, failures: int = 0) -> dict:
    coco = dict.fromkeys(("mAP_50", "mAP_75", "mAP_small", "mAP_medium", "mAP_large", "AR_100"), 0.5)
    f2 = {"threshold": 0.5, "f2": 0.5, "best_f2": 0.6, "best_threshold": 0.4}
    return {"version": version, "images": 10, "failures": {i: "x" for i in range(failures)},
            "metrics": {"coco": {"mAP": mAP, **coco}, "f2": f2}}


@pytest.mark.unit
@pytest.mark.parametrize("candidate,failures,accepted", [
    (0.700, 0, True), (0.696, 0, True), (0.694, 0, False), (0.800, 1, False),
])
def test_gate_tolerance(candidate, failures, accepted):
    ok, table = gate_table(_result("1.0", 0.700), _result("2.0", candidate, failures), tolerance=0.005)
    assert ok is accepted
    assert "default 1.0" in table and "candidate 2.0" in table and f"{candidate - 0.7:+.4f}" in table


@pytest.mark.unit
def test_gate_checks_masks_too_when_both_reports_have_them():
    base, cand = _result("1.0", 0.700), _result("2.0", 0.710)
    base["metrics"]["coco_segm"] = {"mAP": 0.60, "mAP_50": 0.9, "mAP_75": 0.6}
    cand["metrics"]["coco_segm"] = {"mAP": 0.50, "mAP_50": 0.8, "mAP_75": 0.5}
    ok, table = gate_table(base, cand, tolerance=0.005)
    assert not ok and "segm mAP" in table and "-0.1000" in table
    assert gate_drops(base, cand, 0.005) == {"segm": pytest.approx(0.1)}
    cand["metrics"]["coco_segm"]["mAP"] = 0.598
    assert gate_table(base, cand, tolerance=0.005)[0]


# --------------------------------------------------------------------------- real TorchServe


def detailed_version(ts, path: str) -> str:
    r = requests.post(f"{ts.inference_url}/predictions/{path}", data=encode(synth_image(5)), timeout=60,
                      headers={"Content-Type": "image/jpeg", "X-Response-Format": "detailed", **ts.auth("inference")})
    assert r.status_code == 200, r.text
    return r.json()["version"]


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["torchserve", "kserve"])
def test_version_life_cycle(tmp_path, test_split, monkeypatch, capsys, kind):
    """Archive, serve, register a second version, gate, promote, force, roll back, restart: on TorchServe
    and on the KServe server, through the same commands."""
    assert EARLY_WEIGHTS.is_file(), "weights/shapes_1ep.pt is committed (1-epoch run of the demo recipe)"
    monkeypatch.chdir(tmp_path)  # reports/ goes here
    store, build_dir = tmp_path / "store", tmp_path / "build"
    common = dict(name="det", labels=str(DEMO_LABELS), arch="fcos_tiny", export_path=str(store),
                  build_dir=str(build_dir))
    build(archive_args(version="1.0", weights=str(EARLY_WEIGHTS), **common))
    ts = (make_server(tmp_path / "home", store) if kind == "torchserve"
          else KServeServer.on_free_ports(tmp_path / "home", store, []))
    mgmt = Management(ts.management_url, home=ts.home)
    conn = ["--management-url", ts.management_url, "--model-store", str(store), "--home", str(ts.home)]
    gate = ["--url", ts.inference_url, "--dataset", str(test_split), "--limit", "30", *conn]

    def run(*argv: str) -> tuple[int, str]:
        rc = cli.main(list(argv))
        return rc, capsys.readouterr().out

    start_from_registry(ts)
    try:
        assert mgmt.default_version("det") == "1.0"
        build(archive_args(version="2.0", weights=str(DEMO_WEIGHTS), **common))
        rc, out = run("register", "--model", "det", "--version", "2.0", *conn)
        assert rc == 0, out
        assert "registered det 2.0" in out
        assert detailed_version(ts, "det/1.0") == "1.0"
        assert detailed_version(ts, "det/2.0") == "2.0"
        assert detailed_version(ts, "det") == "1.0"
        rc, out = run("register", "--model", "det", "--version", "2.0", *conn)
        assert rc == 0 and "det 2.0 is already registered" in out

        rc, out = run("promote", "--model", "det", "--version", "2.0", *gate)
        assert rc == 0, out
        assert "PROMOTED" in out and "default 1.0" in out and "candidate 2.0" in out
        assert detailed_version(ts, "det") == "2.0"

        rc, out = run("promote", "--model", "det", "--version", "1.0", *gate)
        assert rc == 3, out
        assert "REFUSED" in out and "mAP " in out
        assert detailed_version(ts, "det") == "2.0"
        rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("mAP ")}
        print(f"gate: default 2.0 mAP {rows['mAP'][1]}, candidate 1.0 mAP {rows['mAP'][2]}")

        rc, out = run("promote", "--model", "det", "--version", "1.0", "--force", *gate)
        assert rc == 0 and "promoting anyway" in out
        assert detailed_version(ts, "det") == "1.0"
        rc, out = run("rollback", "--model", "det", *conn)
        assert rc == 0 and "answers with 2.0 again" in out
        assert detailed_version(ts, "det") == "2.0"

        rc, out = run("compare", "--model", "det", "--a", "1.0", "--b", "2.0", *gate)
        assert rc == 0, out
        assert (tmp_path / "reports" / "compare-det-1.0-vs-2.0" / "compare.png").stat().st_size > 10_000

        rc, out = run("versions", "--model", "det", *conn)
        assert "det: default 2.0; previous defaults (rollback order): 1.0" in out

        ts.stop()
        start_from_registry(ts)  # what `make serve` does: same versions, same default
        assert mgmt.default_version("det") == "2.0"
        assert {str(v["modelVersion"]) for v in mgmt.versions("det")} == {"1.0", "2.0"}
        assert detailed_version(ts, "det") == "2.0"
        rc, out = run("rollback", "--model", "det", *conn)
        assert rc == 0
        assert detailed_version(ts, "det") == "1.0"
        log = json.loads((store / "registry.json").read_text())["models"]["det"]["log"]
        assert [(e["action"], e["to"], e.get("forced")) for e in log] == [
            ("promote", "2.0", False), ("promote", "1.0", True), ("rollback", "2.0", None), ("rollback", "1.0", None)]
    finally:
        ts.stop()


@pytest.fixture(params=["torchserve", "kserve"])
def versioned(request):
    """The local servers with a management API for versions."""
    return request.getfixturevalue({"torchserve": "server", "kserve": "kserve"}[request.param])


@pytest.mark.server
def test_register_refuses_what_is_not_in_the_store(versioned, capsys):
    """Only archives already in the model store: no file, or any URL, is refused."""
    server = versioned
    conn = ["--management-url", server.management_url, "--model-store", str(server.model_store),
            "--home", str(server.home)]
    assert cli.main(["register", "--model", "shapes", "--version", "9.9", *conn]) == 2
    assert "no archive of shapes 9.9" in capsys.readouterr().err
    for url in ("http://127.0.0.1:9/evil.mar", "file:///etc/passwd", "../shapes-1.0.mar"):
        r = requests.post(f"{server.management_url}/models", params={"url": url}, headers=server.auth(), timeout=30)
        assert r.status_code in (400, 404), (url, r.status_code, r.text)
    assert cli.main(["promote", "--model", "shapes", "--version", "9.9", *conn[:2], *conn[4:]]) == 2
    assert "register it first" in capsys.readouterr().err


@pytest.mark.integration
def test_serve_on_a_running_server_registers_models_archived_since(tmp_path, fixed_weights):
    """`make demo NAME=other` while TorchServe runs: the new model's archive gets registered."""
    store = tmp_path / "store"

    def archive(name: str) -> None:
        build(archive_args(name=name, weights=str(fixed_weights), labels=str(ASSETS / "fixed_labels.json"),
                           model_file=str(ASSETS / "fixed_detector.py"), export_path=str(store),
                           build_dir=str(tmp_path / "build")))

    archive("first")
    ts = make_server(tmp_path / "home", store)
    try:
        status = start_from_registry(ts, timeout=180)
        assert set(status) == {"first"}
        archive("second")
        assert register_new_models(ts, ts.wait_ready(60)) == ["second-1.0.mar"]
        assert register_new_models(ts, ts.wait_ready(60)) == []  # nothing new: nothing done
        r = requests.post(f"{ts.inference_url}/predictions/second", data=encode(synth_image(1)),
                          headers=ts.auth("inference"), timeout=60)
        assert r.status_code == 200, r.text
        assert "second" in Registry.load(store).models
    finally:
        ts.stop()


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, fixed_weights):
    """The KServe server on two versions of one model (``fixed`` 1.0 and 2.0, the default 1.0)."""
    root = tmp_path_factory.mktemp("kserve-versions")
    store = root / "store"
    for version in ("1.0", "2.0"):
        build(archive_args(name="fixed", version=version, weights=str(fixed_weights),
                           labels=str(ASSETS / "fixed_labels.json"), model_file=str(ASSETS / "fixed_detector.py"),
                           export_path=str(store), build_dir=str(root / "build")))
    ks = KServeServer.on_free_ports(root / "home", store, ["fixed-1.0.mar", "fixed-2.0.mar"])
    with ks.running(180):
        yield ks


@pytest.mark.server
def test_kserve_routes_answer_each_version(two_versions):
    """TorchServe's ``/predictions/NAME/VERSION``, OIP's versioned REST routes and gRPC ``model_version``."""
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp
    from tritonclient.utils import InferenceServerException

    ks, key = two_versions, two_versions.auth("inference")
    assert detailed_version(ks, "fixed") == "1.0"
    assert detailed_version(ks, "fixed/2.0") == "2.0"
    meta = requests.get(f"{ks.url}/v2/models/fixed/versions/2.0", headers=key, timeout=10).json()
    assert meta["versions"] == ["1.0", "2.0"] and meta["inputs"][0]["datatype"] == "BYTES"
    assert requests.get(f"{ks.url}/v2/models/fixed", headers=key, timeout=10).json()["versions"] == ["1.0", "2.0"]
    assert requests.get(f"{ks.url}/v2/models/fixed/versions/2.0/ready", headers=key, timeout=10).json()["ready"]
    missing = requests.get(f"{ks.url}/v2/models/fixed/versions/9.9/ready", headers=key, timeout=10)
    assert missing.status_code == 404 and "fixed 1.0, fixed 2.0" in missing.json()["message"]
    image = encode(synth_image(4))
    for module, url, headers in ((thttp, f"127.0.0.1:{ks.http_port}", key),
                                 (tgrpc, ks.grpc_target, dict(ks.grpc_metadata("inference")))):
        client = module.InferenceServerClient(url)
        images = module.InferInput("images", [1], "BYTES")
        images.set_data_from_numpy(np.array([image], dtype=np.object_))
        params = {"response_format": "detailed"}
        for version in ("1.0", "2.0"):
            result = client.infer("fixed", [images], model_version=version, headers=headers, parameters=params)
            assert json.loads(result.as_numpy("detections")[0])["version"] == version, module.__name__
        assert client.is_model_ready("fixed", model_version="2.0", headers=headers)
        with pytest.raises(InferenceServerException, match="9.9"):
            client.infer("fixed", [images], model_version="9.9", headers=headers)


@pytest.mark.server
def test_kserve_management_follows_torchserve_rules(two_versions):
    """Default first, never deleted while others are loaded; 409 for a loaded version; no scaling."""
    ks = two_versions
    mgmt, h = Management(ks.management_url, home=ks.home), ks.auth("management")
    url = ks.management_url
    assert [v["modelVersion"] for v in mgmt.versions("fixed")] == ["1.0", "2.0"]
    assert mgmt.describe("fixed")["workers"][0]["pid"] == ks.pid()
    r = requests.delete(f"{url}/models/fixed/1.0", headers=h, timeout=30)
    assert r.status_code == 400 and "is the default version" in r.json()["message"]
    r = requests.put(f"{url}/models/fixed?min_worker=2", headers=h, timeout=30)
    assert r.status_code == 400 and "scale with replicas" in r.json()["message"]
    assert requests.get(f"{url}/models", headers=ks.auth("inference"), timeout=10).status_code == 401
    mgmt.set_default("fixed", "2.0")
    assert detailed_version(ks, "fixed") == "2.0"
    assert requests.get(f"{ks.url}/v2/models/fixed/ready", headers=ks.auth("inference"), timeout=10).status_code == 200
    assert mgmt.unregister("fixed", "1.0")
    assert [v["modelVersion"] for v in mgmt.versions("fixed")] == ["2.0"]
    r = requests.post(f"{ks.inference_url}/predictions/fixed/1.0", data=encode(synth_image(1)),
                      headers=ks.auth("inference"), timeout=60)
    assert r.status_code == 404
    assert "registered" in mgmt.register("fixed-1.0.mar")
    r = requests.post(f"{url}/models", params={"url": "fixed-1.0.mar"}, headers=h, timeout=60)
    assert r.status_code == 409 and "already" in r.json()["message"]
    assert detailed_version(ks, "fixed/1.0") == "1.0" and detailed_version(ks, "fixed") == "2.0"
    mgmt.set_default("fixed", "1.0")
