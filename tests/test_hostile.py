"""Hostile input stays inside its own request (issue 27, the request side): any image shape, any JSON.

Pure checks of the envelope parser (hypothesis generates nestings and shapes beyond the probe's),
and the probe's cases against every server (TorchServe, the KServe server, the image): the hostile
request gets its 4xx with a JSON body naming the problem, its batch neighbours get 200, no worker
is lost, and a normal request right after answers 200.
"""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
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
