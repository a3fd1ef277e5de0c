"""KServe v1 and Open Inference Protocol v2 requests: pure parsing, then each real server
(TorchServe's and KServe's /v1/models/NAME:predict and /v2/models/NAME/infer), batches included."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from serve_demo.core.config import HandlerConfig
from serve_demo.core.envelopes import Parsed, parse_row, wrap
from serve_demo.core.imaging import RequestError
from tests.conftest import encode, post, synth_image, worker_log


def b64(seed: int, size=(200, 150)) -> str:
    return base64.b64encode(encode(synth_image(seed, size))).decode()


@pytest.mark.unit
def test_parse_plain_v1_v2():
    cfg = HandlerConfig()
    img = encode(synth_image(1, (64, 48)))
    assert parse_row({"body": img}, {}, cfg).protocol == "plain"
    v1 = parse_row({"body": {"instances": [{"data": b64(2)}, b64(3), {"b64": b64(4)}]}}, {"X-Threshold": "0.3"}, cfg)
    assert v1.protocol == "v1" and len(v1.requests) == 3 and v1.requests[0].threshold == 0.3
    v2 = parse_row({"body": {"id": 7, "inputs": [{"name": "x", "datatype": "BYTES", "shape": [2, 1],
                                                  "data": [[b64(5)], [b64(6)]]}],
                             "parameters": {"threshold": 0.25, "response_format": "detailed"}}}, {}, cfg)
    assert v2.protocol == "v2" and v2.request_id == "7" and len(v2.requests) == 2
    assert v2.requests[1].threshold == 0.25 and v2.requests[1].response_format == "detailed"
    answer = wrap(v2, [{"a": 1}, {"b": 2}], "m", "1.0")
    assert answer["id"] == "7" and answer["outputs"][0]["shape"] == [2]
    assert [json.loads(d) for d in answer["outputs"][0]["data"]] == [{"a": 1}, {"b": 2}]
    assert wrap(Parsed("v1"), [[1], [2]], "m", "1.0") == {"predictions": [[1], [2]]}


@pytest.mark.unit
@pytest.mark.parametrize("body,code,kind,match", [
    ({"instances": []}, 400, "invalid_envelope", "non-empty list"),
    ({"instances": [{"data": 3}]}, 400, "invalid_envelope", "instance 0"),
    ({"instances": [{"data": "@@@"}]}, 400, "invalid_base64", "image 0"),
    ({"instances": [{"data": base64.b64encode(b"text").decode()}]}, 415, "not_an_image", "image 0"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "data": [1.0]}]}, 400, "invalid_envelope", "BYTES"),
    ({"inputs": [{"name": "x", "datatype": "BYTES", "data": []}]}, 400, "invalid_envelope", "non-empty"),
    ({"inputs": [{"name": "x", "datatype": "BYTES", "data": ["x"] * 65}]}, 413, "too_many_images", "at most 64"),
])
def test_bad_envelopes(body, code, kind, match):
    with pytest.raises(RequestError, match=match) as e:
        parse_row({"body": body}, {}, HandlerConfig())
    assert (e.value.code, e.value.kind) == (code, kind)


def send_json(ts, path: str, body: dict) -> requests.Response:
    return requests.post(f"{ts.inference_url}/{path}", json=body, headers=ts.auth("inference"), timeout=120)


@pytest.mark.server
def test_v1_predict_route(target):
    images = [b64(10), b64(11, (320, 240))]
    r = send_json(target, "v1/models/shapes:predict", {"instances": [{"data": images[0]}, {"data": images[1]}]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    plain = [post(target, "shapes", base64.b64decode(i)).json() for i in images]
    assert len(preds) == 2
    for got, want in zip(preds, plain):  # two images in one forward pass: same answers up to float noise
        assert [next(iter(d)) for d in got] == [next(iter(d)) for d in want]
        for g, w in zip(got, want):
            label = next(iter(g))
            assert g["score"] == pytest.approx(w["score"], abs=1e-3)
            assert g[label] == pytest.approx(w[label], abs=1e-2)


@pytest.mark.server
def test_v2_infer_route(target):
    images = [b64(12), b64(13, (240, 320)), b64(14, (100, 80))]
    body = {"id": "req-1", "inputs": [{"name": "images", "datatype": "BYTES", "shape": [3], "data": images}],
            "parameters": {"response_format": "detailed", "threshold": 0.3}}
    r = send_json(target, "v2/models/shapes/infer", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["id"], out["model_name"], out["model_version"]) == ("req-1", "shapes", "1.0")
    payloads = [json.loads(d) for d in out["outputs"][0]["data"]]
    assert [p["image_size"] for p in payloads] == [[200, 150], [240, 320], [100, 80]]
    assert all(d["score"] >= 0.3 for p in payloads for d in p["detections"])


@pytest.mark.server
def test_v2_batch_answers_every_request(target):
    """Four v2 requests batched together by TorchServe (batch 4): each gets its own full answer."""
    bodies = [{"id": f"r{i}", "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1 + i % 2],
                                          "data": [b64(20 + i + k) for k in range(1 + i % 2)]}]}
              for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda b: send_json(target, "v2/models/shapes_b4/infer", b), bodies))
    assert [r.status_code for r in rs] == [200] * 4
    assert [r.json()["id"] for r in rs] == ["r0", "r1", "r2", "r3"]
    assert [r.json()["outputs"][0]["shape"] for r in rs] == [[1], [2], [1], [2]]
    assert "batch of 4 requests (0 refused)" in worker_log(target)


@pytest.mark.server
def test_bad_instance_fails_its_request_only(target):
    good = {"instances": [{"data": b64(30)}]}
    bad = {"instances": [{"data": b64(31)}, {"data": "not base64!"}]}
    r = send_json(target, "v1/models/shapes:predict", bad)
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "invalid_base64" and body["error"].startswith("image 1:")
    assert send_json(target, "v1/models/shapes:predict", good).status_code == 200
