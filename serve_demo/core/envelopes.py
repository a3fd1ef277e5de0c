"""The protocols clients speak, recognised per request (so batches work), on any server.

A request reaches the worker core as a row ``{"body": ..., <form fields>}`` plus its headers.
The body may be raw bytes (TorchServe hands those over for any content type it does not parse;
the KServe server always does) or JSON that a frontend already parsed. Recognised:

* KServe v1: ``{"instances": [{"data": "<base64>"} | {"b64": "<base64>"} | "<base64>", ...]}``,
  answered ``{"predictions": [<payload per image>, ...]}``;
* Open Inference Protocol (OIP) v2: ``{"id": ..., "inputs": [{"name": ..., "datatype": "BYTES",
  "shape": [N], "data": [<image>, ...]}], "parameters": {"threshold": .., "response_format": ..}}``,
  answered ``{"id", "model_name", "model_version", "outputs": [{"name": "detections",
  "datatype": "BYTES", "shape": [N], "data": ["<payload as JSON text>", ...]}]}``. Each element is
  the image file as base64 text, or its raw bytes where the transport carries bytes: the binary
  tensor extension (header ``Inference-Header-Content-Length``, what ``tritonclient`` sends by
  default) or gRPC;
* anything else: one image per request (``/predictions``), answered with the payload itself.

JSON is recognised whatever the content type: a body whose first byte is ``{`` and that is at
most :data:`MAX_ENVELOPE_BYTES` long is parsed (no image format starts with ``{``). Each payload
is the stock or detailed format (``schema``), chosen as usual (header, ``parameters`` in v2, or
the model's default). A bad image fails its whole request (4xx, with KServe's ``error`` key added
to the usual error JSON); other requests of the batch are unaffected. TorchServe's own
``kservev2`` envelope answers only the first request of a batch, which is why this is done here.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import defaults, schema
from .config import HandlerConfig
from .imaging import RequestError
from .pipeline import Request, header, parse_request

if TYPE_CHECKING:
    import torch

MAX_INSTANCES = defaults.MAX_INSTANCES
MAX_ENVELOPE_BYTES = 64 << 20  # a JSON envelope larger than this is not parsed (requests are capped lower)
MAX_JSON_DEPTH = 32  # nesting of a JSON body (v2's data may nest its images, a few levels); deeper gets 400
BINARY_HEADER = "Inference-Header-Content-Length"
OUTPUT_NAME = "detections"


@dataclass
class Parsed:
    """One HTTP request: its protocol and its image(s)."""

    protocol: str  # "plain", "v1" or "v2"
    requests: list[Request] = field(default_factory=list)
    request_id: str | None = None


def _bad(message: str) -> RequestError:
    return RequestError(400, "invalid_envelope", message)


def _raw_body(row: dict) -> tuple[str, Any]:
    for key in ("body", "data"):
        if row.get(key) is not None:
            return key, row[key]
    return "", None


def _decode_binary(body: bytes, size: str) -> dict:
    """The OIP binary tensor extension: a JSON header, then each binary input's bytes in order."""
    if not size.strip().isdigit() or int(size) > len(body):
        raise _bad(f"{BINARY_HEADER}: {size[:20]!r} is not a length within the {len(body)}-byte body")
    n = int(size)
    try:
        envelope = json.loads(bytes(body[:n]))
    except RecursionError:
        raise too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"the first {n} bytes ({BINARY_HEADER}) are not a JSON inference header: {exc}") from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("inputs"), list):
        raise _bad(f'the inference header must be an object with "inputs" ({BINARY_HEADER} given)')
    check_depth(envelope)
    offset = n
    for tensor in envelope["inputs"]:
        params = tensor.get("parameters") if isinstance(tensor, dict) else None
        if not isinstance(params, dict) or "binary_data_size" not in params:
            continue
        k = params["binary_data_size"]
        if not isinstance(k, int) or k < 0 or offset + k > len(body):
            raise _bad(f"input {tensor.get('name')!r}: binary_data_size {k!r} runs past the body's end")
        chunk = bytes(body[offset:offset + k])
        offset += k
        if str(tensor.get("datatype", "")).upper() != "BYTES":
            raise _bad(f"input {tensor.get('name')!r} has datatype {tensor.get('datatype')!r}: send BYTES "
                       "(encoded image files)")
        tensor["data"] = split_bytes_tensor(chunk)
    return envelope


def split_bytes_tensor(chunk: bytes) -> list[bytes]:
    """A serialised BYTES tensor (each element a 4-byte little-endian length, then the bytes)."""
    out, i = [], 0
    while i < len(chunk):
        if i + 4 > len(chunk):
            raise _bad("BYTES tensor data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", chunk, i)
        if i + 4 + n > len(chunk):
            raise _bad(f"BYTES element of {n} bytes runs past the tensor's end")
        out.append(chunk[i + 4:i + 4 + n])
        i += 4 + n
    return out


def envelope_of(row: dict, headers: dict) -> dict | None:
    """The row's KServe v1 / v2 envelope, or None for a plain image request.

    Raises:
        RequestError: a body that announces an envelope (binary header, JSON content type) but
            does not hold one.
    """
    key, body = _raw_body(row)
    if isinstance(body, dict):  # JSON a frontend already parsed
        check_depth(body)
        return body if {"instances", "inputs"} & set(body) else None
    if not isinstance(body, (bytes, bytearray)):
        return None
    size = header(headers, BINARY_HEADER)
    if size is not None:
        return _decode_binary(body, size)
    ctype = (header(headers, "Content-Type") or "").split(";")[0].strip().lower()
    looks_json = body[:1] == b"{" or body.lstrip()[:1] == b"{"
    if not (looks_json or ctype.endswith("json")) or len(body) > MAX_ENVELOPE_BYTES:
        return None
    try:
        parsed = json.loads(bytes(body))
    except RecursionError:
        raise too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        if ctype.endswith("json"):
            raise RequestError(400, "invalid_json", f"the body is not valid JSON ({exc}): send a KServe "
                               'v1 {"instances": [...]} or v2 {"inputs": [...]} document, or an image') from None
        return None
    check_depth(parsed)
    if isinstance(parsed, dict) and {"instances", "inputs"} & set(parsed):
        return parsed
    if isinstance(parsed, dict):  # JSON such as {"data": "<base64>"}: the plain path reads it
        row[key] = parsed
    return None


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


def too_deep() -> RequestError:
    return RequestError(400, "json_too_deep", f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels: send "
                        'a KServe v1 {"instances": [...]} or v2 {"inputs": [...]} document as documented')


def check_depth(obj: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than ``limit`` (iterative: any depth is safe to measure).

    Raises:
        RequestError: 400 ``json_too_deep``.
    """
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                raise too_deep()
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))


def _flatten(data: Any) -> list[Any]:
    """The leaves of nested lists, in order (iterative; the depth is bounded by :func:`check_depth`)."""
    out, stack = [], [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def _images_v2(body: dict) -> list[Any]:
    inputs = body["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad('Open Inference Protocol v2: "inputs" must hold exactly one BYTES tensor of images')
    tensor = inputs[0]
    if str(tensor.get("datatype", "BYTES")).upper() != "BYTES":
        raise _bad(f"v2 input {tensor.get('name')!r} has datatype {tensor.get('datatype')!r}: send BYTES "
                   "(image files, raw or base64)")
    values = _flatten(tensor.get("data"))
    if not values or not all(isinstance(v, (str, bytes, bytearray)) for v in values):
        raise _bad("v2 input data must be a non-empty list of images (base64 strings or raw bytes)")
    return [unwrap_base64(v) if isinstance(v, (bytes, bytearray)) else v for v in values]


IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"RIFF")  # JPEG, PNG, GIF, BMP, WebP


def unwrap_base64(element: bytes | bytearray) -> bytes | bytearray:
    """A BYTES element as the image file: itself when it starts like one, else its base64 text decoded.

    The OIP lets a client put base64 text in a BYTES element of the binary extension
    (tritonclient with ``binary_data=True``) as well as the raw file; both mean the same image. Bytes
    that are neither stay as they are, and the decoder names them (415 ``not_an_image``).
    """
    if bytes(element[:4]).startswith(IMAGE_MAGIC):
        return element
    try:
        return base64.b64decode(bytes(element), validate=True) or element
    except (binascii.Error, ValueError):
        return element


def v2_options(params: Any) -> dict[str, str]:
    """Per-request options from a ``parameters`` object (v2's, and the same key in v1): threshold, formats."""
    options = {}
    if isinstance(params, dict):
        for key in ("threshold", "response_format", "mask_threshold"):
            if params.get(key) is not None:
                options[key] = str(params[key])
    return options


def parse_row(row: dict, headers: dict, cfg: HandlerConfig, device: torch.device | None = None) -> Parsed:
    """Decode one request of a batch, whatever protocol it speaks.

    Raises:
        RequestError: 4xx naming the problem (a bad envelope, a bad image, a bad option).
    """
    body = envelope_of(row, headers)
    if body is None:
        return Parsed("plain", [parse_request(row, headers, cfg, device)])
    protocol = "v1" if "instances" in body else "v2"
    images = _images_v1(body) if protocol == "v1" else _images_v2(body)
    if len(images) > MAX_INSTANCES:
        raise RequestError(413, "too_many_images", f"{len(images)} images in one request; at most "
                           f"{MAX_INSTANCES}: split the request")
    options = v2_options(body.get("parameters"))  # v1 and v2 alike
    requests = []
    for i, image in enumerate(images):
        try:
            requests.append(parse_request({"body": image, **options}, headers, cfg, device))
        except RequestError as err:
            raise RequestError(err.code, err.kind, f"image {i}: {err.message}") from None
    request_id = body.get("id") if protocol == "v2" else None
    return Parsed(protocol, requests, None if request_id is None else str(request_id))


def wrap(parsed: Parsed, payloads: list[Any], model: str, version: str) -> Any:
    """The answer in the request's own protocol (an image answer stays bytes only when plain)."""
    if parsed.protocol == "plain":
        return payloads[0]
    payloads = [p.as_json() if isinstance(p, schema.ImageAnswer) else p for p in payloads]
    if parsed.protocol == "v1":
        return {"predictions": payloads}
    answer = {"model_name": model, "model_version": version,
              "outputs": [{"name": OUTPUT_NAME, "datatype": "BYTES", "shape": [len(payloads)],
                           "data": [json.dumps(p, separators=(",", ":")) for p in payloads]}]}
    if parsed.request_id is not None:
        answer = {"id": parsed.request_id, **answer}
    return answer


def error_answer(err: RequestError, enveloped: bool) -> dict:
    """The usual error JSON, plus KServe's ``error`` key for enveloped requests."""
    payload = schema.error_payload(err.code, err.kind, err.message)
    return {**payload, "error": err.message} if enveloped else payload


def is_enveloped(row: dict, headers: dict | None = None) -> bool:
    """Whether the row is a v1/v2 envelope (a malformed one counts: its error is KServe-shaped)."""
    try:
        return envelope_of(dict(row), headers or {}) is not None
    except RequestError:
        return True
