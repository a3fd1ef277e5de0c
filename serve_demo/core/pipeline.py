"""Decode one request, run the detector on a list of images, format one answer: plain functions.

Tunables live in the archive's ``model-config.yaml`` under ``handler:``; see
:class:`serve_demo.core.config.HandlerConfig`. Per request, the headers ``X-Threshold``, ``X-Mask-Threshold`` and
``X-Response-Format`` (any letter case) or the multipart fields ``threshold``,
``mask_threshold`` / ``response_format`` override them.
"""

from __future__ import annotations

import base64
import binascii
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
    response_format: str
    mask_threshold: float = defaults.MASK_THRESHOLD


def _option(row: dict, headers: dict, header_name: str, field_name: str) -> tuple[Any, str]:
    """A per-request option from its header, else its multipart/JSON field; and where it came from."""
    raw = header(headers, header_name)
    if raw is None and row.get(field_name) is not None:
        return row[field_name], f"the {field_name} field"
    return raw, header_name


def parse_request(row: dict, headers: dict, cfg: HandlerConfig,
                  device: torch.device | None = None) -> Request:
    """Decode one row of a batch and its options (on ``device`` with ``cfg.gpu_decode`` and CUDA).

    Raises:
        RequestError: any client mistake, with the HTTP code to answer.
    """
    threshold, mask_threshold = cfg.threshold, cfg.mask_threshold
    raw, source = _option(row, headers, "X-Threshold", "threshold")
    if raw is not None:
        threshold = parse_threshold(raw, source)
    raw, source = _option(row, headers, "X-Mask-Threshold", "mask_threshold")
    if raw is not None:
        mask_threshold = parse_threshold(raw, source)
    fmt, _ = _option(row, headers, "X-Response-Format", "response_format")
    if isinstance(fmt, (bytes, bytearray)):
        fmt = bytes(fmt).decode("utf-8", "replace")
    fmt = str(fmt or cfg.response_format).strip().lower()
    if fmt not in defaults.FORMATS:
        raise RequestError(400, "invalid_response_format",
                           f"X-Response-Format must be one of {', '.join(defaults.FORMATS)}, got {fmt[:40]!r}")
    image = decode_image_on(_image_bytes(row), device or CPU, cfg.max_image_pixels, cfg.gpu_decode)
    return Request(image, threshold, fmt, mask_threshold)


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


def format_output(output: dict[str, torch.Tensor], req: Request, names: dict[int, str],
                  model_name: str, version: str, keypoint_names: list | None = None) -> Any:
    """One model output as the payload the request asked for.

    The detailed format carries masks (RLE, encoded only for the detections kept) and keypoints
    when the model predicts them; the stock format is boxes only, as TorchServe's.
    """
    scores = output["scores"].tolist()
    keep = [i for i, s in enumerate(scores) if s >= req.threshold]
    dets = schema.make_detections(output["boxes"][keep].tolist(), [scores[i] for i in keep],
                                  output["labels"][keep].tolist(), names, req.threshold)
    if req.response_format != "detailed":
        return schema.stock_payload(dets)
    h, w = req.image.shape[-2:]
    kp_names = None
    if "masks" in output:
        rles = masks.encode_all(output["masks"][keep], req.mask_threshold)
        dets = [replace(d, mask=m) for d, m in zip(dets, rles)]
    if "keypoints" in output:
        kps = output["keypoints"][keep].clone()
        kps[..., 0].clamp_(0, w)
        kps[..., 1].clamp_(0, h)
        kp_scores = output.get("keypoints_scores")
        triplets = masks.keypoint_triplets(kps, kp_scores[keep] if kp_scores is not None else None)
        dets = [replace(d, keypoints=k) for d, k in zip(dets, triplets)]
        kp_names = keypoint_names_for(int(output["keypoints"].shape[1]), keypoint_names)
    return schema.detailed_payload(dets, (w, h), model_name, version, kp_names)


