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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from serve_demo.core.config import HandlerConfig
from serve_demo.core.envelopes import MAX_JSON_DEPTH, parse_row
from serve_demo.core.imaging import RequestError
from serve_demo.core.pipeline import parse_request
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

@pytest.fixture(params=["torchserve", "container"])
def managed(request):
    """The servers with a management API: the local TorchServe and the image."""
    return request.getfixturevalue({"torchserve": "server", "container": "served_container"}[request.param])


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
