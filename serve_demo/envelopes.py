"""The protocols KServe clients speak, handled per request (so batches work).

TorchServe routes ``POST /v1/models/NAME:predict`` and ``POST /v2/models/NAME/infer`` to the
handler like ``/predictions/NAME``, with the JSON body already parsed. The handler recognises:

* KServe v1: ``{"instances": [{"data": "<base64>"} | {"b64": "<base64>"} | "<base64>", ...]}``,
  answered ``{"predictions": [<payload per image>, ...]}``;
* Open Inference Protocol v2: ``{"id": ..., "inputs": [{"name": ..., "datatype": "BYTES",
  "shape": [N], "data": ["<base64>", ...]}], "parameters": {"threshold": .., "response_format": ..}}``,
  answered ``{"id", "model_name", "model_version", "outputs": [{"name": "detections",
  "datatype": "BYTES", "shape": [N], "data": ["<payload as JSON text>", ...]}]}``;
* anything else: one image per request (``/predictions``), answered with the payload itself.

Each payload is the stock or detailed format (``schema``), chosen as usual (header,
``parameters.response_format`` in v2, or the model's default). A bad image fails its whole
request (4xx, with KServe's ``error`` key added to the usual error JSON); other requests of the
batch are unaffected. TorchServe's own ``kservev2`` envelope answers only the first request of
a batch, which is why this is done here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import schema
from .imaging import RequestError
from .serving import HandlerConfig, Request, parse_request

if TYPE_CHECKING:
    import torch

MAX_INSTANCES = 64


@dataclass
class Parsed:
    """One HTTP request: its protocol and its image(s)."""

    protocol: str  # "plain", "v1" or "v2"
    requests: list[Request] = field(default_factory=list)
    request_id: str | None = None


def _json_body(row: dict) -> dict | None:
    for key in ("body", "data"):
        value = row.get(key)
        if isinstance(value, dict):
            return value
    return None


def _bad(message: str) -> RequestError:
    return RequestError(400, "invalid_envelope", message)


def _images_v1(body: dict) -> list[Any]:
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise _bad('KServe v1: "instances" must be a non-empty list of {"data": "<base64 image>"}')
    out = []
    for i, inst in enumerate(instances):
        value = inst.get("data", inst.get("b64")) if isinstance(inst, dict) else inst
        if isinstance(value, dict):  # {"b64": "..."} as TensorFlow Serving writes it
            value = value.get("b64")
        if not isinstance(value, str):
            raise _bad(f'KServe v1: instance {i} must be {{"data": "<base64 image>"}} or a base64 string')
        out.append(value)
    return out


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [x for item in data for x in _flatten(item)]
    return [data]


def _images_v2(body: dict) -> list[Any]:
    inputs = body["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad('Open Inference Protocol v2: "inputs" must hold exactly one BYTES tensor of base64 images')
    tensor = inputs[0]
    if str(tensor.get("datatype", "BYTES")).upper() != "BYTES":
        raise _bad(f"v2 input {tensor.get('name')!r} has datatype {tensor.get('datatype')!r}: send BYTES "
                   "(base64-encoded image files)")
    values = _flatten(tensor.get("data"))
    if not values or not all(isinstance(v, str) for v in values):
        raise _bad("v2 input data must be a non-empty list of base64 strings")
    return values


def parse_row(row: dict, headers: dict, cfg: HandlerConfig, device: torch.device | None = None) -> Parsed:
    """Decode one request of a batch, whatever protocol it speaks.

    Raises:
        RequestError: 4xx naming the problem (a bad envelope, a bad image, a bad option).
    """
    body = _json_body(row)
    if body is None or not ({"instances", "inputs"} & set(body)):
        return Parsed("plain", [parse_request(row, headers, cfg, device)])
    protocol = "v1" if "instances" in body else "v2"
    images = _images_v1(body) if protocol == "v1" else _images_v2(body)
    if len(images) > MAX_INSTANCES:
        raise RequestError(413, "too_many_images", f"{len(images)} images in one request; at most "
                           f"{MAX_INSTANCES}: split the request")
    options = {}
    params = body.get("parameters") if protocol == "v2" else None
    if isinstance(params, dict):
        for key in ("threshold", "response_format"):
            if params.get(key) is not None:
                options[key] = str(params[key])
    requests = []
    for i, image in enumerate(images):
        try:
            requests.append(parse_request({"body": image, **options}, headers, cfg, device))
        except RequestError as err:
            raise RequestError(err.code, err.kind, f"image {i}: {err.message}") from None
    request_id = body.get("id") if protocol == "v2" else None
    return Parsed(protocol, requests, None if request_id is None else str(request_id))


def wrap(parsed: Parsed, payloads: list[Any], model: str, version: str) -> Any:
    """The answer in the request's own protocol."""
    if parsed.protocol == "plain":
        return payloads[0]
    if parsed.protocol == "v1":
        return {"predictions": payloads}
    answer = {"model_name": model, "model_version": version,
              "outputs": [{"name": "detections", "datatype": "BYTES", "shape": [len(payloads)],
                           "data": [json.dumps(p, separators=(",", ":")) for p in payloads]}]}
    if parsed.request_id is not None:
        answer = {"id": parsed.request_id, **answer}
    return answer


def error_answer(err: RequestError, enveloped: bool) -> dict:
    """The usual error JSON, plus KServe's ``error`` key for enveloped requests."""
    payload = schema.error_payload(err.code, err.kind, err.message)
    return {**payload, "error": err.message} if enveloped else payload


def is_enveloped(row: dict) -> bool:
    body = _json_body(row)
    return body is not None and bool({"instances", "inputs"} & set(body))
