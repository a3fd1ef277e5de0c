"""The shipped configuration, as started by the tests and `make serve`, against the threat model
in docs/security.md: who can reach what, and who may call what."""

from __future__ import annotations

import socket

import pytest
import requests

from tests.conftest import encode, read_properties_of, synth_image

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


def test_apis_not_reachable_off_loopback(server):
    ip = non_loopback_ipv4()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    for port in (server.management_port, server.metrics_port, server.inference_port,
                 server.grpc_inference_port, server.grpc_management_port):
        with socket.socket() as s:
            s.settimeout(3)
            assert s.connect_ex((ip, port)) != 0, f"port {port} answers on {ip}"
        with socket.socket() as s:  # the same port does answer on loopback (the test is not vacuous)
            s.settimeout(3)
            if port not in (server.grpc_inference_port, server.grpc_management_port):
                assert s.connect_ex(("127.0.0.1", port)) == 0


def test_management_needs_the_management_key(server):
    url = f"{server.management_url}/models"
    keys = {"none": {}, "inference key": server.auth("inference"), "wrong": {"Authorization": "Bearer nope"}}
    for name, headers in keys.items():
        r = requests.get(url, headers=headers, timeout=10)
        assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException", (name, r.text)
    assert requests.get(url, headers=server.auth(), timeout=10).status_code == 200
    r = requests.post(url, params={"url": "shapes-1.0.mar", "model_name": "x"}, timeout=10)
    assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"


def test_inference_needs_the_inference_key(server):
    """TorchServe 0.12 has one switch for both APIs (docs/security.md)."""
    url, data = f"{server.inference_url}/predictions/shapes", encode(synth_image(70, (160, 120)))
    assert requests.post(url, data=data, timeout=30).status_code == 400
    assert requests.post(url, data=data, headers=server.auth(), timeout=30).status_code == 400
    assert requests.post(url, data=data, headers=server.auth("inference"), timeout=30).status_code == 200


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/evil.mar", "https://example.com/m.mar",
                                 "file:///etc/passwd", "../shapes-1.0.mar", "/etc/hostname"])
def test_registration_only_from_the_model_store(server, url):
    r = requests.post(f"{server.management_url}/models", params={"url": url, "model_name": "evil"},
                      headers=server.auth(), timeout=30)
    assert r.status_code in (400, 404), (url, r.status_code, r.text)
    models = requests.get(f"{server.management_url}/models", headers=server.auth(), timeout=10).json()["models"]
    assert "evil" not in {m["modelName"] for m in models}


def test_key_file_is_private(server):
    mode = (server.home / "key_file.json").stat().st_mode & 0o777
    assert mode == 0o600, oct(mode)
