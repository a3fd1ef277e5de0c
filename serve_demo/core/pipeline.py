"""Decode one request, run the detector on a list of images, format one answer: plain functions.

Tunables live in the archive's ``model-config.yaml`` under ``handler:``; see
:class:`serve_demo.core.config.HandlerConfig`. Per request, the headers ``X-Threshold``, ``X-Mask-Threshold`` and
``X-Response-Format`` (any letter case) or the multipart fields ``threshold``,
``mask_threshold`` / ``response_format`` override them.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from . import defaults, masks, schema
from .config import HandlerConfig, parse_threshold
from .imaging import RequestError, decode_image_on

log = logging.getLogger(__name__)

IMAGE_KEYS = ("data", "body", "file", "image")
REQUEST_FORMATS = (*defaults.FORMATS, defaults.IMAGE_FORMAT)
IMAGE_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}
CPU = torch.device("cpu")
COCO_KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
                  "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
                  "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")


def header(headers: dict, name: str) -> str | None:
    """A request header by name, any letter case."""
    lname = name.lower()
    for k, v in (headers or {}).items():
        if k.lower() == lname:
            return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)
    return None


def _image_bytes(row: dict) -> bytes | bytearray:
    for key in IMAGE_KEYS:
        if key in row and row[key] is not None:
            value = row[key]
            break
    else:
        fields = ", ".join(sorted(map(str, row))) or "none"
        raise RequestError(400, "missing_image",
                           f"no image in the request (fields: {fields}): send it as the body "
                           "(`curl -T image.jpg`) or a multipart field named `data`")
    if isinstance(value, dict):  # JSON body such as {"data": "<base64>"}
        inner = value.get("data") or value.get("b64")
        if not isinstance(inner, str):
            raise RequestError(400, "missing_image", "JSON body must be {\"data\": \"<base64 image>\"}")
        value = inner
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "invalid_base64",
                               "the image field is text but not valid base64: send raw bytes or base64") from None
    return value


@dataclass
class Request:
    """One decoded request of a batch."""

    image: torch.Tensor  # uint8 3xHxW
    threshold: float
    response_format: str  # "stock", "detailed" or "image"
    mask_threshold: float = defaults.MASK_THRESHOLD
    image_type: str = "jpeg"  # image answers: "jpeg" or "png"


def _text(value: Any) -> str:
    return bytes(value).decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def _option(row: dict, headers: dict, header_name: str, field_name: str,
            normal: Any = lambda v: _text(v).strip().lower()) -> tuple[Any, str]:
    """A per-request option and where it came from: its header, a form / ``parameters`` field, or a
    field of a plain JSON body. Any one place will do; two places that disagree are refused.

    Raises:
        RequestError: 400 ``conflicting_option`` naming both places and values.
    """
    given = []
    raw = header(headers, header_name)
    if raw is not None:
        given.append((raw, header_name))
    if row.get(field_name) is not None:
        given.append((row[field_name], f"the {field_name} field"))
    for key in ("body", "data"):  # a plain JSON body, parsed (core.envelopes.envelope_of)
        body = row.get(key)
        if isinstance(body, dict) and body.get(field_name) is not None:
            given.append((body[field_name], f"the JSON body's {field_name}"))
    if not given:
        return None, header_name
    first, source = given[0]
    for value, where in given[1:]:
        if normal(value) != normal(first):
            raise RequestError(400, "conflicting_option",
                               f"{source} says {_text(first)[:40]!r} but {where} says {_text(value)[:40]!r}: "
                               "give the option once")
    return first, source


def _threshold_value(value: Any) -> float | str:
    try:
        return float(_text(value).strip())
    except ValueError:
        return _text(value)


def parse_request(row: dict, headers: dict, cfg: HandlerConfig,
                  device: torch.device | None = None) -> Request:
    """Decode one row of a batch and its options (on ``device`` with ``cfg.gpu_decode`` and CUDA).

    Options (threshold, mask threshold, response format) come from a header, a form or
    ``parameters`` field, or a plain JSON body's field, whichever is given; given twice, the values
    must agree.

    Raises:
        RequestError: any client mistake, with the HTTP code to answer.
    """
    threshold, mask_threshold = cfg.threshold, cfg.mask_threshold
    raw, source = _option(row, headers, "X-Threshold", "threshold", _threshold_value)
    if raw is not None:
        threshold = parse_threshold(raw, source)
    raw, source = _option(row, headers, "X-Mask-Threshold", "mask_threshold", _threshold_value)
    if raw is not None:
        mask_threshold = parse_threshold(raw, source)
    fmt, _ = _option(row, headers, "X-Response-Format", "response_format")
    if isinstance(fmt, (bytes, bytearray)):
        fmt = bytes(fmt).decode("utf-8", "replace")
    accept = accepted_image_type(header(headers, "Accept"))
    fmt = str(fmt or (defaults.IMAGE_FORMAT if accept else cfg.response_format)).strip().lower()
    if fmt not in REQUEST_FORMATS:
        raise RequestError(400, "invalid_response_format",
                           f"X-Response-Format must be one of {', '.join(REQUEST_FORMATS)}, got {fmt[:40]!r}")
    image = decode_image_on(_image_bytes(row), device or CPU, cfg.max_image_pixels, cfg.gpu_decode)
    return Request(image, threshold, fmt, mask_threshold, accept or "jpeg")


def accepted_image_type(accept: str | None) -> str | None:
    """``"png"`` or ``"jpeg"`` when the ``Accept`` header names that image type before any JSON type."""
    for part in (accept or "").lower().split(","):
        media = part.split(";")[0].strip()
        if media in ("image/png", "image/jpeg"):
            return media[len("image/"):]
        if media in ("application/json", "*/*", "application/*"):
            return None
    return None


def upload(image: torch.Tensor, device: torch.device, pin_memory: bool = False) -> torch.Tensor:
    """``image`` on ``device``; from page-locked memory when ``pin_memory`` and the copy is to CUDA."""
    if pin_memory and device.type == "cuda" and image.device.type == "cpu":
        image = image.pin_memory()
    return image.to(device, non_blocking=True)


def run_detector(model: nn.Module, images: list[torch.Tensor], device: torch.device,
                 fp16: bool = False, pin_memory: bool = False) -> list[dict[str, torch.Tensor]]:
    """Run the detector on uint8 images of any sizes (a list, never stacked); outputs on CPU.

    Masks (``N x 1 x H x W`` probabilities, up to 100 full-image planes) stay on the device:
    :func:`format_output` thresholds the kept ones there and copies only those, as booleans.
    """
    batch = [upload(im, device, pin_memory).float().div_(255) for im in images]
    with torch.inference_mode():
        if fp16 and device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                outputs = model(batch)
        else:
            outputs = model(batch)
    return [{k: v if k == "masks" else v.float().cpu() if torch.is_floating_point(v) else v.cpu()
             for k, v in o.items()} for o in outputs]


def keypoint_names_for(count: int, configured: list | None) -> list[str]:
    """Names of ``count`` keypoints: the configured ones, COCO's for 17, else ``kp_0``, ``kp_1``, ..."""
    if configured is not None:
        if len(configured) != count:
            raise ValueError(f"handler.keypoint_names lists {len(configured)} names but the model "
                             f"predicts {count} keypoints")
        return list(configured)
    return list(COCO_KEYPOINTS) if count == len(COCO_KEYPOINTS) else [f"kp_{i}" for i in range(count)]


def select(output: dict[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    """The detections scoring at least ``threshold``: the one place the score threshold is applied.

    Every per-detection tensor (boxes, scores, labels, masks, keypoints, ...) keeps the same rows;
    masks stay on their device.
    """
    keep = output["scores"] >= threshold
    n = int(keep.shape[0])
    return {k: v[keep.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
            for k, v in output.items()}


def format_output(output: dict[str, torch.Tensor], req: Request, names: dict[int, str],
                  model_name: str, version: str, keypoint_names: list | None = None,
                  max_image_bytes: int = defaults.MAX_RESPONSE_SIZE) -> Any:
    """One raw model output as the payload the request asked for (:func:`select`, then :func:`format_kept`)."""
    return format_kept(select(output, req.threshold), req, names, model_name, version, keypoint_names,
                       max_image_bytes)


def format_kept(kept: dict[str, torch.Tensor], req: Request, names: dict[int, str],
                model_name: str, version: str, keypoint_names: list | None = None,
                max_image_bytes: int = defaults.MAX_RESPONSE_SIZE) -> Any:
    """The detections ``kept`` (:func:`select`) as the payload the request asked for.

    The detailed format carries masks (RLE) and keypoints when the model predicts them; the stock
    format is boxes only, as TorchServe's; the image format is a
    :class:`~serve_demo.core.schema.ImageAnswer` drawn from the detailed one.

    Raises:
        RequestError: 413 when the drawn image is larger than ``max_image_bytes``.
    """
    dets = schema.make_detections(kept["boxes"].tolist(), kept["scores"].tolist(), kept["labels"].tolist(), names)
    if req.response_format not in ("detailed", defaults.IMAGE_FORMAT):
        return schema.stock_payload(dets)
    h, w = req.image.shape[-2:]
    kp_names = None
    if "masks" in kept:
        rles = masks.encode_all(kept["masks"], req.mask_threshold)
        dets = [replace(d, mask=m) for d, m in zip(dets, rles)]
    if "keypoints" in kept:
        kps = kept["keypoints"].clone()
        kps[..., 0].clamp_(0, w)
        kps[..., 1].clamp_(0, h)
        triplets = masks.keypoint_triplets(kps, kept.get("keypoints_scores"))
        dets = [replace(d, keypoints=k) for d, k in zip(dets, triplets)]
        kp_names = keypoint_names_for(int(kept["keypoints"].shape[1]), keypoint_names)
    if req.response_format == defaults.IMAGE_FORMAT:
        return render_image(req, dets, max_image_bytes)
    return schema.detailed_payload(dets, (w, h), model_name, version, kp_names)


def render_image(req: Request, dets: list[schema.Detection],
                 max_bytes: int = defaults.MAX_RESPONSE_SIZE) -> schema.ImageAnswer:
    """The request's image with ``dets`` (masks and keypoints included) drawn, encoded as it asked.

    Raises:
        RequestError: 413 ``image_answer_too_large`` past ``max_bytes`` (TorchServe's max_response_size).
    """
    from PIL import Image

    from .draw import draw_detections

    pixels = req.image.permute(1, 2, 0).cpu().numpy()
    drawn = draw_detections(Image.fromarray(pixels), dets)
    buf = io.BytesIO()
    if req.image_type == "png":
        drawn.save(buf, format="PNG", compress_level=1)
    else:
        drawn.save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    if len(data) > max_bytes:
        raise RequestError(413, "image_answer_too_large",
                           f"the drawn {req.image_type.upper()} is {len(data)} bytes, over the {max_bytes}-byte "
                           "response limit: ask for JPEG, send a smaller image, or ask for JSON")
    return schema.ImageAnswer(data, IMAGE_TYPES[req.image_type])
