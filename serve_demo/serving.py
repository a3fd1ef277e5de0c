"""Everything the TorchServe handler does, as plain functions (the handler stays thin).

Tunables live in the archive's ``model-config.yaml`` under ``handler:``; see
:class:`HandlerConfig`. Per request, the headers ``X-Threshold``, ``X-Mask-Threshold`` and
``X-Response-Format`` (any letter case) or the multipart fields ``threshold``,
``mask_threshold`` / ``response_format`` override them.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import inspect
import json
import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import masks, schema
from .imaging import DEFAULT_MAX_PIXELS, RequestError, decode_image_on
from .models import build_model, load_state_dict_file, load_weights, task_of

log = logging.getLogger(__name__)

IMAGE_KEYS = ("data", "body", "file", "image")
LABEL_FILE = "index_to_name.json"
CPU = torch.device("cpu")
COCO_KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
                  "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
                  "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")


@dataclass(frozen=True)
class HandlerConfig:
    """The ``handler:`` section of ``model-config.yaml``, validated."""

    arch: str | None = None  # None: the archive's model file defines the detector class
    threshold: float = 0.5
    response_format: str = "stock"
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    threads: int = 0  # torch threads per worker; 0 keeps torch's default
    fp16: bool = False  # autocast on CUDA only
    gpu_decode: bool = False  # CUDA only: nvjpeg for plain JPEGs (torchvision.io.decode_jpeg(device=...))
    channels_last: bool = False  # convolution weights in NHWC (CUDA tensor cores; oneDNN on CPU)
    pin_memory: bool = False  # CUDA only: page-locked host copies before the upload
    model_kwargs: dict = field(default_factory=dict)
    mask_threshold: float = 0.5  # mask models: probability at which a pixel belongs to the mask
    keypoint_names: list | None = None  # keypoint models; None: COCO's 17 names, else kp_0, kp_1, ...

    @classmethod
    def from_yaml(cls, section: dict | None) -> HandlerConfig:
        """Build from the parsed ``handler:`` section, naming any bad key or value."""
        section = dict(section or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"model-config.yaml handler: unknown keys {unknown}; known: {sorted(known)}")
        cfg = cls(**section)
        parse_threshold(cfg.threshold, "model-config.yaml handler.threshold")
        parse_threshold(cfg.mask_threshold, "model-config.yaml handler.mask_threshold")
        if cfg.keypoint_names is not None and not (
                isinstance(cfg.keypoint_names, list) and all(isinstance(n, str) for n in cfg.keypoint_names)):
            raise ValueError("model-config.yaml handler.keypoint_names must be a list of names")
        if cfg.response_format not in schema.FORMATS:
            raise ValueError(f"model-config.yaml handler.response_format must be one of {schema.FORMATS}")
        if int(cfg.max_image_pixels) < 1 or int(cfg.threads) < 0:
            raise ValueError("model-config.yaml handler: max_image_pixels must be >= 1 and threads >= 0")
        return cfg


def parse_threshold(value: Any, source: str = "X-Threshold") -> float:
    """A score threshold in [0, 1].

    Raises:
        RequestError: 400 naming ``source`` when the value is not a finite number in [0, 1].
    """
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    try:
        t = float(str(value).strip())
    except ValueError:
        t = math.nan
    if not math.isfinite(t) or not 0.0 <= t <= 1.0:
        raise RequestError(400, "invalid_threshold",
                           f"{source} must be a number between 0 and 1, got {str(value)[:40]!r}")
    return t


def read_label_map(path: str | Path) -> dict[int, str]:
    """``index_to_name.json`` as ``{int id: name}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label map {path} is missing: archive it with --extra-files")
    raw = json.loads(path.read_text())
    try:
        return {int(k): (v[-1] if isinstance(v, list) else str(v)) for k, v in raw.items()}
    except (ValueError, AttributeError):
        raise ValueError(f"{path}: keys must be class ids (\"0\", \"1\", ...) mapped to names") from None


def detector_class_from_file(model_file: str | Path) -> type[nn.Module]:
    """The single ``nn.Module`` class defined in a user's model file."""
    model_file = Path(model_file)
    module = importlib.import_module(model_file.stem)
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
               if issubclass(c, nn.Module) and c.__module__ == module.__name__]
    if len(classes) != 1:
        raise ValueError(f"{model_file.name} must define exactly one nn.Module class, found "
                         f"{[c.__name__ for c in classes] or 'none'}")
    return classes[0]


def num_classes_of(model: nn.Module) -> int | None:
    """The class count (background included) of torchvision-style detectors, else None."""
    probes = (("roi_heads", "box_predictor", "cls_score"), ("head", "classification_head"))
    for path in probes:
        obj = model
        for attr in path:
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.Linear):
            return obj.out_features
        if obj is not None and hasattr(obj, "num_classes"):
            return int(obj.num_classes)
    return None


def load_detector(model_dir: str | Path, weights: str | None, model_file: str | None,
                  cfg: HandlerConfig, num_labels: int, device: torch.device) -> nn.Module:
    """Build the detector named by ``cfg.arch`` (or the model file's class), load weights.

    Raises:
        ValueError / FileNotFoundError: with the path and the mismatch named.
    """
    model_dir = Path(model_dir)
    if cfg.arch:
        kwargs = dict(cfg.model_kwargs)
        if task_of(cfg.arch) == "keypoints" and cfg.keypoint_names:
            kwargs.setdefault("num_keypoints", len(cfg.keypoint_names))
        model = build_model(cfg.arch, num_classes=num_labels, **kwargs)
        source = f"architecture {cfg.arch}"
    elif model_file:
        cls = detector_class_from_file(model_dir / model_file)
        model = cls()
        source = f"{model_file}:{cls.__name__}"
        n = num_classes_of(model)
        if n is not None and n != num_labels:
            raise ValueError(f"{source} predicts {n} classes (background included) but the label "
                             f"map names {num_labels}: fix {LABEL_FILE} or the model")
    else:
        raise ValueError("no detector: set handler.arch in model-config.yaml or archive a model file")
    if weights:
        path = model_dir / weights
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} is missing from the archive")
        load_weights(model, load_state_dict_file(str(path)), source=f"{weights} for {source}")
    model = model.to(device).eval()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


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
    mask_threshold: float = 0.5


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
    if fmt not in schema.FORMATS:
        raise RequestError(400, "invalid_response_format",
                           f"X-Response-Format must be one of {', '.join(schema.FORMATS)}, got {fmt[:40]!r}")
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


def configure_threads(threads: int) -> None:
    """Set torch's intra-op threads once per worker (workers x threads should fit the cores)."""
    if threads > 0:
        torch.set_num_threads(threads)
    env = os.environ.get("OMP_NUM_THREADS")
    log.info("torch threads: %d (OMP_NUM_THREADS=%s)", torch.get_num_threads(), env)
