"""Hostile input stays inside its own request (issue 27, the request side): any image shape, any JSON.

Pure checks of the envelope parser (hypothesis generates nestings and shapes beyond the probe's),
and the probe's cases against every server (TorchServe, the KServe server, the image): the hostile
request gets its 4xx with a JSON body naming the problem, its batch neighbours get 200, no worker
is lost, and a normal request right after answers 200.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from serve_demo.core import defaults
from serve_demo.core.config import HandlerConfig
from serve_demo.core.envelopes import MAX_JSON_DEPTH, parse_row
from serve_demo.core.imaging import RequestError
from serve_demo.core.pipeline import parse_request
from serve_demo.serve.process import free_ports, wait_until
from tests.conftest import encode, post, synth_image, workers

CFG = HandlerConfig()
GOOD = encode(synth_image(3, (160, 120)))
B64 = base64.b64encode(GOOD).decode()


def nested(depth: int, leaf: object = B64) -> object:
    out = leaf
    for _ in range(depth):
        out = [out]
    return out


# --- pure: the envelope parser --------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3),
                           max_leaves=30)


@pytest.mark.unit
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=json_values, key=st.sampled_from(["inputs", "instances", "data", "threshold", "parameters"]))
def test_any_json_body_is_parsed_or_refused_with_a_4xx(doc, key):
    """Whatever JSON arrives, the parser answers a Parsed request or a RequestError (never another error)."""
    body = json.dumps({key: doc}).encode()
    try:
        parse_row({"body": body}, {"Content-Type": "application/json"}, CFG)
    except RequestError as err:
        assert 400 <= err.code < 500 and err.message


@pytest.mark.unit
@settings(max_examples=40, deadline=None)
@given(depth=st.integers(min_value=MAX_JSON_DEPTH, max_value=200_000), where=st.sampled_from(["v2", "v1", "plain"]))
def test_deep_nesting_anywhere_is_400_json_too_deep(depth, where):
    inner = "[" * depth + "]" * depth
    body = {"v2": '{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": %s}]}',
            "v1": '{"instances": %s}', "plain": '{"data": %s}'}[where] % inner
    with pytest.raises(RequestError) as err:
        parse_row({"body": body.encode()}, {}, CFG)
    assert (err.value.code, err.value.kind) == (400, "json_too_deep")


@pytest.mark.unit
def test_shallow_v2_nesting_still_serves():
    body = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1, 1], "data": nested(2)}]}
    parsed = parse_row({"body": json.dumps(body).encode()}, {}, CFG)
    assert parsed.protocol == "v2" and len(parsed.requests) == 1


@pytest.mark.unit
@pytest.mark.parametrize("row,headers,threshold", [
    ({"body": {"data": B64, "threshold": 0.8}}, {}, 0.8),  # a plain JSON body's field
    ({"body": GOOD, "threshold": "0.7"}, {}, 0.7),  # a form / parameters field
    ({"body": GOOD}, {"X-Threshold": "0.6"}, 0.6),  # the header
    ({"body": GOOD, "threshold": "0.60"}, {"x-threshold": "0.6"}, 0.6),  # twice, agreeing
])
def test_the_threshold_is_read_wherever_it_is_given(row, headers, threshold):
    assert parse_request(row, headers, CFG).threshold == threshold


@pytest.mark.unit
def test_an_option_given_twice_with_different_values_is_400():
    with pytest.raises(RequestError, match="X-Threshold says '0.5' but the JSON body's threshold says '0.9'") as err:
        parse_request({"body": {"data": B64, "threshold": 0.9}}, {"X-Threshold": "0.5"}, CFG)
    assert err.value.kind == "conflicting_option"


@pytest.mark.unit
def test_v1_parameters_carry_the_threshold():
    body = json.dumps({"instances": [{"data": B64}], "parameters": {"threshold": 0.75}}).encode()
    assert parse_row({"body": body}, {}, CFG).requests[0].threshold == 0.75


# --- every server: the probe's cases --------------------------------------------------------------

def extreme(size: tuple[int, int]) -> bytes:
    return encode(Image.new("RGB", size, (200, 180, 40)), "PNG")


HOSTILE = [  # (name, body, headers, status, error type)
    ("10000x10 image", lambda: extreme((10000, 10)), {}, 422, "image_not_processable"),
    ("10x10000 image", lambda: extreme((10, 10000)), {}, 422, "image_not_processable"),
    ("json nested 100000 deep", lambda: b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400,
     "json_too_deep"),
    ("v2 data nested 600 deep", lambda: json.dumps({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1],
                                                              "data": nested(600)}]}).encode(), {}, 400,
     "json_too_deep"),
    ("threshold twice, disagreeing", lambda: json.dumps({"data": B64, "threshold": 0.9}).encode(),
     {"X-Threshold": "0.1"}, 400, "conflicting_option"),
]
# The same JSON labelled application/json: TorchServe's worker then parses it itself before the handler
HOSTILE += [(f"{name} as application/json", make, {**headers, "Content-Type": "application/json"}, code, kind)
            for name, make, headers, code, kind in HOSTILE if kind != "image_not_processable"]


@pytest.mark.server
@pytest.mark.parametrize("name,make,headers,code,kind", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_request_fails_alone_in_a_batch_of_four(target, name, make, headers, code, kind):
    """shapes_b4 batches up to 4 requests: the hostile one gets its 4xx, its three neighbours 200."""
    before = [w["pid"] for w in workers(target, "shapes_b4")]
    good = [encode(synth_image(70 + i, (200 + 20 * i, 150))) for i in range(3)]
    sends = [(good[0], {}), (make(), headers), (good[1], {}), (good[2], {})]
    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda s: post(target, "shapes_b4", s[0], {"X-Response-Format": "detailed", **s[1]}),
                           sends))
    assert rs[1].status_code == code, rs[1].text[:300]
    assert rs[1].json()["type"] == kind and len(rs[1].json()["message"]) > 20, rs[1].json()
    assert [r.status_code for r in (rs[0], rs[2], rs[3])] == [200, 200, 200], [r.text[:200] for r in rs]
    assert [r.json()["image_size"] for r in (rs[0], rs[2], rs[3])] == [[200, 150], [220, 150], [240, 150]]
    assert [w["pid"] for w in workers(target, "shapes_b4")] == before
    after = post(target, "shapes", GOOD, {"X-Response-Format": "detailed"})
    assert after.status_code == 200 and after.json()["image_size"] == [160, 120]


@pytest.mark.server
def test_a_threshold_in_a_plain_json_body_is_honoured(target):
    low = post(target, "shapes", json.dumps({"data": B64, "threshold": 0.0}).encode(),
               {"Content-Type": "application/octet-stream"})
    high = post(target, "shapes", json.dumps({"data": B64, "threshold": 0.99}).encode(),
                {"Content-Type": "application/octet-stream"})
    assert low.status_code == high.status_code == 200, (low.text[:200], high.text[:200])
    assert any(d["score"] < 0.99 for d in low.json()) and all(d["score"] >= 0.99 for d in high.json())
    assert len(high.json()) < len(low.json())


# --- the management guard (serve/guard.py): our promises about the management API ---------------

@pytest.fixture(params=["torchserve", "kserve", "container"])
def managed(request):
    """The servers with a management API: the local TorchServe, the KServe server and the image."""
    return request.getfixturevalue({"torchserve": "server", "kserve": "kserve",
                                    "container": "served_container"}[request.param])


UP = "%2e%2e/" * 6
MANAGEMENT_CASES = [  # (name, method, path and query, what the message names)
    ("file URL out of the store by %2e%2e", "POST", "/models?url=file://{store}/%2e%2e/%2e%2e/elsewhere/x.mar",
     "not an archive in the model store"),
    ("plain name out of the store by %2e%2e", "POST", "/models?url=%2e%2e/%2e%2e/elsewhere/x.mar",
     "not an archive in the model store"),
    ("double-encoded dots", "POST", "/models?url=%252e%252e/%252e%252e/elsewhere/x.mar", "not an archive"),
    ("/etc/passwd by %2e%2e", "POST", f"/models?url={UP}etc/passwd", "not an archive in the model store"),
    ("/etc by %2e%2e", "POST", f"/models?url={UP}etc", "not an archive in the model store"),
    ("an http URL", "POST", "/models?url=http://127.0.0.1:1/x.mar", "no http:// URLs"),
    ("registry.json", "POST", "/models?url=registry.json", "not a .mar file"),
    (".gitkeep", "POST", "/models?url=.gitkeep", "not a .mar file"),
    ("model name with ../", "POST", "/models?url=shapes-1.0.mar&model_name=..%2F..%2Fevilname", "is not a name"),
    ("min_worker -5", "PUT", "/models/shapes?min_worker=-5", "whole number from 0 to"),
    ("1000 workers", "PUT", "/models/shapes?min_worker=1000&max_worker=1000", "whole number from 0 to"),
    ("min above max", "PUT", "/models/shapes?min_worker=2&max_worker=1", "is above max_worker"),
    ("encoded name in the path", "PUT", "/models/%2e%2e%2fshapes?min_worker=1", "is not a name"),
]


@pytest.mark.server
@pytest.mark.parametrize("name,method,target,names", MANAGEMENT_CASES, ids=[c[0] for c in MANAGEMENT_CASES])
def test_management_guard_refuses_what_torchserve_would_take(managed, tmp_path, name, method, target, names):
    ts = managed
    store = getattr(ts, "model_store", None)
    if store is not None and "elsewhere" in target:  # the archive outside the store exists: only the guard stops it
        elsewhere = Path(store).parent / "elsewhere"
        elsewhere.mkdir(exist_ok=True)
        shutil.copy(Path(store) / "shapes-1.0.mar", elsewhere / "x.mar")
    listing = sorted(p.name for p in Path(store).iterdir()) if store is not None else None
    h = ts.auth()
    models = requests.get(f"{ts.management_url}/models", headers=h, timeout=10).json()
    before = [w["pid"] for w in workers(ts, "shapes")]
    url = ts.management_url + target.format(store=store or "/home/model-server/model-store")
    r = requests.request(method, url, headers=h, timeout=60)
    assert r.status_code == 400, f"{name}: {r.status_code} {r.text[:300]}"
    assert names in r.json()["message"], r.json()
    assert requests.get(f"{ts.management_url}/models", headers=h, timeout=10).json() == models
    assert [w["pid"] for w in workers(ts, "shapes")] == before
    if listing is not None:
        assert sorted(p.name for p in Path(store).iterdir()) == listing  # nothing copied in
    assert post(ts, "shapes", GOOD).status_code == 200


@pytest.mark.server
def test_management_guard_forwards_what_is_allowed(server):
    """Scaling within the machine and describing a model pass through, answered by TorchServe."""
    h = server.auth()
    r = requests.put(f"{server.management_url}/models/shapes?min_worker=1&max_worker=1&synchronous=true",
                     headers=h, timeout=120)
    assert r.status_code == 200, r.text
    desc = requests.get(f"{server.management_url}/models/shapes", headers=h, timeout=10)
    assert desc.status_code == 200 and desc.json()[0]["modelName"] == "shapes"
    assert requests.get(f"{server.management_url}/models", timeout=10).status_code in (400, 401)  # still keyed


@pytest.mark.unit
@pytest.mark.parametrize("method,target,expected", [
    ("POST", "/models?url=shapes-1.0.mar&initial_workers=1", "/models?url=shapes-1.0.mar&initial_workers=1"),
    ("POST", "/models?url=file://{store}/shapes-1.0.mar", "/models?url=shapes-1.0.mar"),
    ("POST", "/models?url=file://{store}/sub/%2e%2e/shapes-1.0.mar", "/models?url=shapes-1.0.mar"),
    ("PUT", "/models/shapes/1.0/set-default", "/models/shapes/1.0/set-default"),
    ("GET", "/models?limit=10", "/models?limit=10"),
    ("PUT", "/models/shapes?min_worker=0&max_worker=2", "/models/shapes?min_worker=0&max_worker=2"),
])
def test_guard_forwards_the_canonical_form(tmp_path, method, target, expected):
    from serve_demo.serve.guard import canonical

    (tmp_path / "shapes-1.0.mar").write_bytes(b"zip")
    (tmp_path / "sub").mkdir()
    assert canonical(method, target.format(store=tmp_path), tmp_path, limit=2) == expected


@pytest.mark.unit
def test_guard_refuses_a_symlink_out_of_the_store(tmp_path):
    from serve_demo.serve.guard import Refused, canonical

    store, outside = tmp_path / "store", tmp_path / "outside.mar"
    store.mkdir()
    outside.write_bytes(b"zip")
    (store / "link.mar").symlink_to(outside)
    with pytest.raises(Refused, match="not an archive in the model store"):
        canonical("POST", "/models?url=link.mar", store, limit=2)
    for target in [c[2] for c in MANAGEMENT_CASES]:
        with pytest.raises(Refused):
            canonical("POST" if "url=" in target else "PUT", target.format(store=store), store, limit=2)


# --- slow clients: cut where we own the listener, measured where TorchServe does -----------------

class Dribbler(threading.Thread):
    """One slow client: sends ``head``, then ``drip`` each second, and records the answer and when it was closed."""

    def __init__(self, url: str, head: bytes, drip: bytes | None, hold: float = 60) -> None:
        super().__init__(daemon=True)
        parts = urlsplit(url)
        self.address, self.head, self.drip, self.hold = (parts.hostname, parts.port), head, drip, hold
        self.answer, self.closed_after = b"", None

    def run(self) -> None:
        with socket.create_connection(self.address, timeout=10) as s:
            t0 = time.monotonic()
            s.sendall(self.head)
            s.settimeout(1)
            while time.monotonic() - t0 < self.hold:
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    try:
                        if self.drip:
                            s.sendall(self.drip)
                        continue
                    except OSError:
                        chunk = b""
                except OSError:
                    chunk = b""
                if not chunk:
                    self.closed_after = time.monotonic() - t0
                    return
                self.answer += chunk


def slow_headers(path: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()


def slow_body(path: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n".encode() + b"x" * 100


LISTENERS = {  # what a slow client holds open, and a normal request on the same listener
    "kserve": lambda ts, ks, ui: (ks.inference_url, "/predictions/shapes",
                                  lambda: post(ks, "shapes", GOOD).status_code),
    "guard": lambda ts, ks, ui: (ts.management_url, "/models",
                                 lambda: requests.get(f"{ts.management_url}/models", headers=ts.auth(),
                                                      timeout=10).status_code),
    "ui": lambda ts, ks, ui: (ui, "/api/predict", lambda: requests.get(f"{ui}/api/models", timeout=10).status_code),
}


@pytest.mark.server
@pytest.mark.parametrize("listener", list(LISTENERS))
def test_slow_clients_are_cut_where_we_own_the_listener(server, kserve, ui, listener):
    """Headers dribbled a byte a second get 408 after the header deadline; a stalled body is closed."""
    url, path, normal = LISTENERS[listener](server, kserve, ui)
    loris = [Dribbler(url, slow_headers(path), b"X-a: b\r\n") for _ in range(5)]
    stalled = Dribbler(url, slow_body(path), None)
    for d in [*loris, stalled]:
        d.start()
    time.sleep(2)
    assert normal() == 200  # served while the slow ones are held
    for d in [*loris, stalled]:
        d.join(defaults.HEADER_TIMEOUT_S + 20)
    for d in loris:
        assert d.closed_after is not None, f"{listener}: a slow-header client still open after {d.hold} s"
        assert defaults.HEADER_TIMEOUT_S - 1 <= d.closed_after <= defaults.HEADER_TIMEOUT_S + 8, d.closed_after
        status, _, body = d.answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 408"), d.answer[:200]
        assert json.loads(body)["type"] == "request_timeout"
    assert stalled.closed_after is not None and stalled.closed_after <= defaults.BODY_IDLE_TIMEOUT_S + 8, \
        (stalled.closed_after, stalled.answer[:200])
    assert normal() == 200


@pytest.mark.server
def test_torchserve_inference_listener_keeps_slow_header_clients(server):
    """Measured, and pinned so that docs/security.md stays true: netty has no header timeout.

    Twenty connections that dribble a header line a second are all still open after 15 s (past our
    own listeners' deadline); normal requests are served meanwhile. The mitigation is a proxy or
    ingress with a header timeout in front of the inference port.
    """
    loris = [Dribbler(server.inference_url, slow_headers("/predictions/shapes"), b"X-a: b\r\n", hold=15)
             for _ in range(20)]
    for d in loris:
        d.start()
    time.sleep(2)
    assert post(server, "shapes", GOOD).status_code == 200
    for d in loris:
        d.join(30)
    assert [d.closed_after for d in loris] == [None] * 20, [d.answer[:100] for d in loris]
    assert post(server, "shapes", GOOD).status_code == 200


async def echo_length(scope, receive, send) -> None:
    """A tiny ASGI app: answers the length of the body it read."""
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size, more = size + len(message.get("body", b"")), message.get("more_body", False)
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def deadline_server():
    """uvicorn with our protocol and one-second limits, in this process, on a free loopback port."""
    import uvicorn

    from serve_demo.serve.deadlines import protocol

    (port,) = free_ports(1)
    web = uvicorn.Server(uvicorn.Config(echo_length, host="127.0.0.1", port=port, log_level="warning",
                                        http=protocol(header_timeout=1, body_idle_timeout=1)))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    wait_until(lambda: web.started, 30, what="uvicorn")
    yield f"http://127.0.0.1:{port}"
    web.should_exit = True
    thread.join(10)


@pytest.mark.integration
def test_a_slow_but_steady_upload_is_not_cut(deadline_server):
    """Ten chunks half a second apart (5 s in all, five times the idle limit) are read and answered."""
    parts = urlsplit(deadline_server)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(10):
            time.sleep(0.5)
            s.sendall(b"y" * 100)
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n1000"), answer


@pytest.mark.integration
def test_a_kept_alive_connection_gets_a_new_header_deadline(deadline_server):
    """After one answered request the connection may idle (keep-alive); its next request's headers are timed."""
    parts = urlsplit(deadline_server)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        assert s.recv(65536).endswith(b"\r\n\r\n3")
        time.sleep(2)  # idle past the header limit: uvicorn's keep-alive (5 s) applies, not ours
        t0 = time.monotonic()
        s.sendall(b"POST / HTTP/1.1\r\n")
        answer = s.recv(65536)
        waited = time.monotonic() - t0
        assert answer.startswith(b"HTTP/1.1 408") and s.recv(100) == b""
    assert 0.8 <= waited <= 5, waited


@pytest.mark.integration
def test_a_connection_that_sends_nothing_is_closed(deadline_server):
    parts = urlsplit(deadline_server)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        assert s.recv(65536).startswith(b"HTTP/1.1 408")
