"""Open Inference Protocol v2 as its most used client speaks it: ``tritonclient`` (HTTP and gRPC).

Pure parsing of what tritonclient sends (the binary tensor extension, JSON under any content
type), then tritonclient against TorchServe's v2 route and against the KServe server.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import requests
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from serve_demo.core.config import HandlerConfig
from serve_demo.core.envelopes import BINARY_HEADER, parse_row
from serve_demo.core.imaging import RequestError
from tests.conftest import encode, post, synth_image


def jpeg(seed: int, size=(200, 150)) -> bytes:
    return encode(synth_image(seed, size))


def binary_request(images: list[bytes], parameters: dict | None = None) -> tuple[bytes, dict]:
    """A v2 request in the binary tensor extension, serialised as tritonclient does."""
    raw = serialize_byte_tensor(np.array(images, dtype=np.object_)).item()
    header = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(images)],
                          "parameters": {"binary_data_size": len(raw)}}],
              "parameters": {**(parameters or {}), "binary_data_output": True}}
    head = json.dumps(header).encode()
    return head + raw, {BINARY_HEADER: str(len(head)), "Content-Type": "application/octet-stream"}


@pytest.mark.unit
def test_binary_extension_raw_bytes_elements():
    body, headers = binary_request([jpeg(1), jpeg(2, (64, 48))], {"threshold": 0.3})
    parsed = parse_row({"body": bytearray(body)}, headers, HandlerConfig())
    assert parsed.protocol == "v2" and len(parsed.requests) == 2
    assert [tuple(r.image.shape) for r in parsed.requests] == [(3, 150, 200), (3, 48, 64)]
    assert parsed.requests[0].threshold == 0.3


@pytest.mark.unit
def test_binary_extension_base64_elements_mean_the_same_image():
    """tritonclient with binary_data=True sends a BYTES element as given: base64 text is the image too."""
    images = [jpeg(1), jpeg(2, (64, 48))]
    raw = parse_row({"body": bytearray(binary_request(images)[0])}, binary_request(images)[1], HandlerConfig())
    body, headers = binary_request([base64.b64encode(images[0]), images[1]])
    mixed = parse_row({"body": bytearray(body)}, headers, HandlerConfig())
    assert all(torch.equal(a.image, b.image) for a, b in zip(raw.requests, mixed.requests))
    body, headers = binary_request([b"aGVsbG8="])  # base64 of b"hello": still not an image
    with pytest.raises(RequestError, match="image 0: .*not an image") as e:
        parse_row({"body": bytearray(body)}, headers, HandlerConfig())
    assert e.value.code == 415


@pytest.mark.unit
def test_json_envelope_sniffed_whatever_the_content_type():
    body = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                   "data": [base64.b64encode(jpeg(3)).decode()]}]}).encode()
    for ctype in ("application/octet-stream", "text/plain", ""):
        assert parse_row({"body": body}, {"Content-Type": ctype}, HandlerConfig()).protocol == "v2"


@pytest.mark.unit
@pytest.mark.parametrize("body,headers,kind,match", [
    (b'{"inputs": [', {"Content-Type": "application/json"}, "invalid_json", "not valid JSON"),
    (b"{}" + b"\0" * 8, {BINARY_HEADER: "99"}, "invalid_envelope", "not a length within"),
    (b"[1]", {BINARY_HEADER: "3"}, "invalid_envelope", '"inputs"'),
    (b'{"inputs": [{"name": "x", "datatype": "BYTES", "parameters": {"binary_data_size": 50}}]}',
     {BINARY_HEADER: "88"}, "invalid_envelope", "runs past the body's end"),
])
def test_bad_binary_or_json_named(body, headers, kind, match):
    with pytest.raises(RequestError, match=match) as e:
        parse_row({"body": body}, headers, HandlerConfig())
    assert e.value.kind == kind and e.value.code == 400


@pytest.mark.unit
def test_truncated_bytes_element_named():
    body, headers = binary_request([jpeg(4)])
    head_len = int(headers[BINARY_HEADER])
    header = json.loads(body[:head_len])
    header["inputs"][0]["parameters"]["binary_data_size"] = 6
    head = json.dumps(header).encode()
    short = head + body[head_len:head_len + 6]
    with pytest.raises(RequestError, match="runs past the tensor's end"):
        parse_row({"body": short}, {BINARY_HEADER: str(len(head))}, HandlerConfig())


def infer_input(module, images: list[bytes], binary: bool = True):
    tensor = module.InferInput("images", [len(images)], "BYTES")
    data = images if binary else [base64.b64encode(i) for i in images]
    if module is thttp:
        tensor.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
    else:
        tensor.set_data_from_numpy(np.array(data, dtype=np.object_))
    return tensor


def check_answers(result, images: list[bytes], target) -> None:
    """Each output element is the detailed payload /predictions gives for the same image. (Images of
    one size: a forward pass of mixed sizes pads them, which moves scores by up to ~0.01.)"""
    payloads = [json.loads(p) for p in result.as_numpy("detections")]
    assert len(payloads) == len(images)
    for payload, image in zip(payloads, images):
        plain = post(target, "shapes", image, {"X-Response-Format": "detailed", "X-Threshold": "0.3"}).json()
        assert payload["image_size"] == plain["image_size"]
        assert all(d["score"] >= 0.3 for d in payload["detections"])
        for want in (d for d in plain["detections"] if d["score"] >= 0.4):
            assert any(got["label"] == want["label"] and abs(got["score"] - want["score"]) < 0.005
                       and max(abs(a - b) for a, b in zip(got["box"], want["box"])) < 0.5
                       for got in payload["detections"]), (want, payload["detections"])


@pytest.mark.server
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json-base64"])
def test_tritonclient_http_on_torchserve(server, binary):
    client = thttp.InferenceServerClient(f"127.0.0.1:{server.inference_port}")
    images = [jpeg(10, (320, 240)), jpeg(11, (320, 240))]
    result = client.infer("shapes", [infer_input(thttp, images, binary)], headers=server.auth("inference"),
                          parameters={"threshold": 0.3, "response_format": "detailed"})
    check_answers(result, images, server)
    with pytest.raises(InferenceServerException, match="not an image") as e:
        client.infer("shapes", [infer_input(thttp, [b"hello"])], headers=server.auth("inference"))
    assert "415" in str(e.value)


@pytest.mark.server
def test_torchserve_frontend_does_not_route_v2_health(server):
    """Pinned limitation (README: the protocol table): TorchServe 0.12's frontend routes
    /v2/models/NAME/infer but not v2 health or metadata; /ping and the management API are the
    workaround there, or the KServe server, which answers them all."""
    client = thttp.InferenceServerClient(f"127.0.0.1:{server.inference_port}")
    assert not client.is_server_live(headers=server.auth("inference"))
    assert requests.get(f"{server.inference_url}/v2/models/shapes", headers=server.auth("inference"),
                        timeout=10).status_code == 404


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tritonclient_on_kserve(kserve, protocol):
    module, url = (thttp, f"127.0.0.1:{kserve.http_port}") if protocol == "http" else (tgrpc, kserve.grpc_target)
    client = module.InferenceServerClient(url)
    # gRPC metadata keys are lower case
    keyed = kserve.auth("inference") if protocol == "http" else dict(kserve.grpc_metadata("inference"))
    assert client.is_server_live() and client.is_server_ready()  # open: probes carry no key
    assert client.is_model_ready("shapes", headers=keyed)
    meta = client.get_model_metadata("shapes", headers=keyed)
    meta = meta if isinstance(meta, dict) else {"name": meta.name, "inputs": [{"datatype": meta.inputs[0].datatype}]}
    assert meta["name"] == "shapes" and meta["inputs"][0]["datatype"] == "BYTES"
    images = [jpeg(12, (320, 240)), jpeg(13, (320, 240)), jpeg(14, (320, 240))]  # same size: no padding noise
    result = client.infer("shapes", [infer_input(module, images)], headers=keyed,
                          parameters={"threshold": 0.3, "response_format": "detailed"})
    check_answers(result, images, kserve)
    with pytest.raises(InferenceServerException, match="not an image") as e:
        client.infer("shapes", [infer_input(module, [jpeg(15), b"hello"])], headers=keyed)
    assert ("415" if protocol == "http" else "INVALID_ARGUMENT") in str(e.value)
    assert "image 1:" in str(e.value)
    with pytest.raises(InferenceServerException, match="inference key") as e:  # no key: refused
        client.infer("shapes", [infer_input(module, images[:1])])
    assert ("401" if protocol == "http" else "UNAUTHENTICATED") in str(e.value)


@pytest.mark.server
def test_kserve_oversized_body_refused_before_reading(kserve):
    r = requests.post(f"{kserve.url}/predictions/shapes", data=b"\xff\xd8" + b"\0" * (17 << 20),
                      headers={"Content-Type": "image/jpeg", **kserve.auth("inference")}, timeout=60)
    assert r.status_code == 413 and r.json()["type"] == "request_too_large"
    assert post(kserve, "shapes", jpeg(16)).status_code == 200


@pytest.mark.server
def test_kserve_v1_image_body_and_unknown_model(kserve):
    keyed = kserve.auth("inference")
    r = requests.post(f"{kserve.url}/v1/models/shapes:predict", data=jpeg(17),
                      headers={"Content-Type": "image/jpeg", **keyed}, timeout=60)
    assert r.status_code == 200 and isinstance(r.json(), list)
    missing = requests.post(f"{kserve.url}/predictions/nope", data=jpeg(17), headers=keyed, timeout=60)
    assert missing.status_code == 404 and "shapes 1.0" in missing.json()["message"]
    for version, status in (("9.9", 404), ("1.0", 200)):
        r = requests.post(f"{kserve.url}/predictions/shapes/{version}", data=jpeg(17), headers=keyed, timeout=60)
        assert r.status_code == status, (version, r.text)
