"""The shipped configuration, as started by the tests and `make serve`, against the threat model
in docs/security.md: who can reach what, and who may call what."""

from __future__ import annotations

import socket

import pytest
import requests

from serve_demo.serve.kserve_local import KServeServer
from serve_demo.serve.torchserve import TorchServe
from tests.conftest import ROOT, encode, read_properties_of, synth_image

pytestmark = pytest.mark.server  # this file's layer (conftest.py: every test declares one)


def non_loopback_ipv4() -> str | None:
    """An address of this machine other than 127.0.0.0/8 (the route to a public address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent for a UDP connect
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_shipped_config_keys(server):
    props = read_properties_of(server)
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "true" and "http" not in props["allowed_urls"]
    assert props["install_py_dep_per_model"] == "false" and props["limit_max_image_pixels"] == "true"
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:"), key
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"


@pytest.fixture(params=["torchserve", "kserve"])
def either(request):
    """Each local server in turn, as ``make serve`` (``SERVER=kserve``) starts it."""
    return request.getfixturevalue({"torchserve": "server", "kserve": "kserve"}[request.param])


def ports(ts) -> list[int]:
    if isinstance(ts, KServeServer):
        return [ts.http_port, ts.grpc_port, ts.management_port]
    return [ts.management_port, ts.metrics_port, ts.inference_port, ts.grpc_inference_port, ts.grpc_management_port]


def is_refused(ts, r: requests.Response) -> bool:
    """A missing or wrong key's answer: TorchServe's 400 ``InvalidKeyException``, the KServe server's 401."""
    if isinstance(ts, KServeServer):
        return r.status_code == 401 and r.json()["type"] == "unauthorized"
    return r.status_code == 400 and r.json()["type"] == "InvalidKeyException"


def test_apis_not_reachable_off_loopback(either):
    ip = non_loopback_ipv4()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    for port in ports(either):
        with socket.socket() as s:
            s.settimeout(3)
            assert s.connect_ex((ip, port)) != 0, f"port {port} answers on {ip}"
        with socket.socket() as s:  # the same port does answer on loopback (the test is not vacuous)
            s.settimeout(3)
            assert s.connect_ex(("127.0.0.1", port)) == 0, port


def test_management_needs_the_management_key(either):
    server = either
    url = f"{server.management_url}/models"
    keys = {"none": {}, "inference key": server.auth("inference"), "wrong": {"Authorization": "Bearer nope"}}
    for name, headers in keys.items():
        r = requests.get(url, headers=headers, timeout=10)
        assert is_refused(server, r), (name, r.status_code, r.text)
    assert requests.get(url, headers=server.auth("management"), timeout=10).status_code == 200
    r = requests.post(url, params={"url": "shapes-1.0.mar", "model_name": "x"}, timeout=10)
    assert is_refused(server, r), r.text


def test_inference_needs_the_inference_key(either):
    """TorchServe 0.12 has one switch for both APIs (docs/security.md); the KServe server does the same."""
    server = either
    url, data = f"{server.inference_url}/predictions/shapes", encode(synth_image(70, (160, 120)))
    assert is_refused(server, requests.post(url, data=data, timeout=30))
    assert is_refused(server, requests.post(url, data=data, headers=server.auth("management"), timeout=30))
    assert requests.post(url, data=data, headers=server.auth("inference"), timeout=30).status_code == 200


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/evil.mar", "https://example.com/m.mar",
                                 "file:///etc/passwd", "../shapes-1.0.mar", "/etc/hostname"])
def test_registration_only_from_the_model_store(either, url):
    server = either
    r = requests.post(f"{server.management_url}/models", params={"url": url, "model_name": "evil"},
                      headers=server.auth("management"), timeout=30)
    assert r.status_code in (400, 404), (url, r.status_code, r.text)
    models = requests.get(f"{server.management_url}/models", headers=server.auth("management"),
                          timeout=10).json()["models"]
    assert "evil" not in {m["modelName"] for m in models}


def test_key_file_is_private(either):
    mode = (either.home / "key_file.json").stat().st_mode & 0o777
    assert mode == 0o600, oct(mode)


def listening(pid: int) -> set[tuple[str, int]]:
    """``(address, port)`` of every TCP socket ``pid`` (and its children) listens on (what ``ss -ltn`` lists)."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {(c.laddr.ip, c.laddr.port) for p in procs
            for c in getattr(p, "net_connections", p.connections)("tcp")  # psutil < 6: connections
            if c.status == psutil.CONN_LISTEN}


def test_kserve_listens_on_loopback_only(kserve):
    sockets = listening(kserve.pid())
    assert {port for _, port in sockets} >= {kserve.http_port, kserve.grpc_port}, sockets
    assert all(loopback(ip) for ip, _ in sockets), sockets  # gRPC's is a v6 socket: ::ffff:127.0.0.1


def loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


KSERVE_KEYED = [("POST", "/predictions/shapes"), ("POST", "/v1/models/shapes:predict"),
                ("POST", "/v2/models/shapes/infer"), ("GET", "/v2/models/shapes"), ("GET", "/v2/models/shapes/ready"),
                ("GET", "/v1/models"), ("GET", "/v2")]


@pytest.mark.parametrize("method,path", KSERVE_KEYED)
def test_kserve_http_needs_the_inference_key(kserve, method, path):
    url, data = f"{kserve.url}{path}", encode(synth_image(71, (160, 120)))
    refused = {"none": {}, "wrong": {"Authorization": "Bearer nope"}, "management key": kserve.auth("management"),
               "not bearer": {"Authorization": "Basic eDp5"}}
    for name, headers in refused.items():
        r = requests.request(method, url, data=data if method == "POST" else None, headers=headers, timeout=30)
        assert r.status_code == 401, (name, r.status_code, r.text)
        assert r.json()["type"] == "unauthorized" and "inference key" in r.json()["message"], (name, r.text)
        assert r.headers["WWW-Authenticate"].startswith("Bearer"), name
    r = requests.request(method, url, data=data if method == "POST" else None, headers=kserve.auth("inference"),
                         timeout=60)
    assert r.status_code != 401, (r.status_code, r.text)
    if path == "/predictions/shapes":
        assert r.status_code == 200


def test_kserve_probes_and_metrics_need_no_key(kserve):
    for path in ("/ping", "/v2/health/live", "/v2/health/ready", "/metrics", "/"):
        assert requests.get(f"{kserve.url}{path}", timeout=10).status_code == 200, path


def test_kserve_model_unload_needs_the_management_key(kserve):
    url = f"{kserve.url}/v2/repository/models/shapes/unload"
    for headers in ({}, kserve.auth("inference")):
        r = requests.post(url, headers=headers, timeout=10)
        assert r.status_code == 401 and "management key" in r.json()["message"], r.text
    ready = requests.get(f"{kserve.url}/v2/models/shapes/ready", headers=kserve.auth("inference"), timeout=10)
    assert ready.status_code == 200


def test_kserve_grpc_needs_the_key(kserve):
    import grpc
    from tritonclient.grpc import service_pb2 as pb  # the same OIP v2 service; kserve's own stubs would clash
    from tritonclient.grpc import service_pb2_grpc as pb_grpc  # with tritonclient's in one process (test_oip)

    with grpc.insecure_channel(kserve.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live  # open: probes carry no key
        ready = pb.ModelReadyRequest(name="shapes")
        for metadata in ((), (("authorization", "Bearer nope"),), tuple(kserve.grpc_metadata("management"))):
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelReady(ready, metadata=metadata, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "inference key" in e.value.details()
        assert stub.ModelReady(ready, metadata=kserve.grpc_metadata("inference"), timeout=10).ready
        with pytest.raises(grpc.RpcError) as e:
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="shapes"),
                                       metadata=kserve.grpc_metadata("inference"), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "management key" in e.value.details()
        assert stub.ModelReady(ready, metadata=kserve.grpc_metadata("inference"), timeout=10).ready


def test_kserve_key_file_is_torchserve_shaped(kserve):
    import json

    entries = json.loads(kserve.key_file.read_text())
    assert set(entries) == {"inference", "management"}
    assert entries["inference"]["key"] != entries["management"]["key"]
    assert len(entries["inference"]["key"]) >= 32


def test_kserve_published_without_keys_behind_a_gateway(tmp_path, model_store):
    """``PUBLISH=0.0.0.0`` with ``--auth off`` (the Kubernetes manifest's way): reachable off loopback, no key."""
    ip = non_loopback_ipv4()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    ks = KServeServer.on_free_ports(tmp_path, model_store, ["shapes-1.0.mar"], bind="0.0.0.0", auth_on=False)
    with ks.running(180):
        sockets = listening(ks.pid())
        published = {a for a, port in sockets if port in (ks.http_port, ks.grpc_port)}
        assert published <= {"0.0.0.0", "::"}, sockets  # gRPC's wildcard is dual-stack
        assert {a for a, port in sockets if port == ks.management_port} == {"127.0.0.1"}  # never published
        assert not ks.key_file.exists()
        r = requests.post(f"http://{ip}:{ks.http_port}/predictions/shapes", data=encode(synth_image(72)), timeout=60)
        assert r.status_code == 200 and isinstance(r.json(), list)


def test_torchserve_published_keeps_management_on_loopback(tmp_path, model_store):
    """``make serve PUBLISH=0.0.0.0``: inference (HTTP, gRPC) and metrics on every interface, management
    (the guard and TorchServe's private listener) on loopback, keys still required."""
    ip = non_loopback_ipv4()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    ts = TorchServe.on_free_ports(tmp_path / "home", model_store, base_config=ROOT / "docker" / "config.properties",
                                  bind="0.0.0.0", models="fixed-1.0.mar")
    with ts.running(180, expect=["fixed"]):
        url = f"http://{ip}:{ts.inference_port}/predictions/fixed"
        assert requests.post(url, data=encode(synth_image(73)), timeout=60).status_code == 400  # no key
        r = requests.post(url, data=encode(synth_image(73)), headers=ts.auth("inference"), timeout=60)
        assert r.status_code == 200, r.text
        assert requests.get(f"http://{ip}:{ts.metrics_port}/metrics", timeout=10).status_code == 200
        for port in (ts.management_port, ts.upstream_management_port, ts.grpc_management_port):
            with socket.socket() as s:
                s.settimeout(3)
                assert s.connect_ex((ip, port)) != 0, f"management port {port} answers on {ip}"
