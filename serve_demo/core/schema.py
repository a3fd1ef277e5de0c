"""The one response schema shared by the handler, the client, the evaluator and the tests.

Two formats answer a prediction (one JSON document per image):

* ``stock`` (default), what TorchServe's built-in ``object_detector`` returns::

      [{"<label>": [x1, y1, x2, y2], "score": s}, ...]

* ``detailed`` (header ``X-Response-Format: detailed`` or ``response_format: detailed`` in
  ``model-config.yaml``)::

      {"detections": [{"label": str, "label_id": int, "score": float,
                       "box": [x1, y1, x2, y2]}, ...],
       "image_size": [w, h], "model": str, "version": str}

  Mask models (Mask R-CNN) add to each detection ``"mask": {"size": [h, w], "counts": str}``,
  its instance mask binarised at the mask threshold as compressed COCO RLE (decode with
  ``pycocotools.mask.decode`` or :func:`serve_demo.core.masks.decode`). Keypoint models add
  ``"keypoints": [[x, y, score], ...]`` per detection and ``"keypoint_names": [str, ...]``
  (same order) to the document.

A third answer, per request only (``X-Response-Format: image``, or ``Accept: image/jpeg`` /
``image/png``): the uploaded image, upright, with the detections drawn (:mod:`serve_demo.core.draw`),
as ``image/jpeg`` (default) or ``image/png``. Inside a KServe v1/v2 envelope, where the answer is
JSON, it is ``{"content_type": "image/jpeg", "data": "<base64>"}``.

Boxes are in the pixels of the uploaded image (after EXIF orientation), ``x1, y1`` top-left.
An error is ``{"code": int, "type": str, "message": str}`` with the same HTTP status as ``code``.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import defaults
from . import masks as rle

FORMATS = defaults.FORMATS
BOX_DECIMALS = 4
SCORE_DECIMALS = 5


@dataclass(frozen=True)
class Detection:
    """One detected object."""

    label: str
    label_id: int
    score: float
    box: tuple[float, float, float, float]
    mask: dict | None = None  # compressed COCO RLE {"size": [h, w], "counts": str}
    keypoints: list | None = None  # [[x, y, score], ...]


def make_detections(boxes: Sequence[Sequence[float]], scores: Sequence[float],
                    labels: Sequence[int], names: dict[int, str]) -> list[Detection]:
    """Detections, labels named through ``names`` (the threshold is already applied:
    :func:`serve_demo.core.pipeline.select`).

    An id missing from ``names`` is reported by its number (never an error).
    """
    out = []
    for box, score, lab in zip(boxes, scores, labels):
        lab = int(lab)
        out.append(Detection(names.get(lab, str(lab)), lab, round(float(score), SCORE_DECIMALS),
                             tuple(round(float(v), BOX_DECIMALS) for v in box)))
    return out


def stock_payload(dets: list[Detection]) -> list[dict[str, Any]]:
    """The stock ``object_detector`` format."""
    return [{d.label: list(d.box), "score": d.score} for d in dets]


def _detection_dict(d: Detection) -> dict[str, Any]:
    out: dict[str, Any] = {"label": d.label, "label_id": d.label_id, "score": d.score, "box": list(d.box)}
    if d.mask is not None:
        out["mask"] = d.mask
    if d.keypoints is not None:
        out["keypoints"] = d.keypoints
    return out


def detailed_payload(dets: list[Detection], image_size: tuple[int, int], model: str,
                     version: str, keypoint_names: Sequence[str] | None = None) -> dict[str, Any]:
    """The documented detailed format (``keypoint_names`` only for keypoint models)."""
    payload: dict[str, Any] = {
        "detections": [_detection_dict(d) for d in dets],
        "image_size": [int(image_size[0]), int(image_size[1])],
        "model": model,
        "version": version,
    }
    if keypoint_names is not None:
        payload["keypoint_names"] = list(keypoint_names)
    return payload


@dataclass(frozen=True)
class ImageAnswer:
    """A drawn image answer: encoded bytes and their media type."""

    data: bytes
    content_type: str

    def as_json(self) -> dict[str, str]:
        """The form it takes inside a JSON envelope (KServe v1/v2)."""
        return {"content_type": self.content_type, "data": base64.b64encode(self.data).decode()}


def error_payload(code: int, kind: str, message: str) -> dict[str, Any]:
    """The error body every 4xx/5xx answer of the handler carries."""
    return {"code": int(code), "type": kind, "message": message}


def dumps(payload: Any) -> bytes:
    """Compact JSON bytes (what the handler sends)."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def parse_detections(payload: Any, names_to_ids: dict[str, int] | None = None) -> list[Detection]:
    """Read either format back into :class:`Detection` objects.

    ``names_to_ids`` resolves label ids for the stock format, which carries names only.

    Raises:
        ValueError: the payload is neither format.
    """
    if isinstance(payload, dict) and "detections" in payload:
        return [Detection(d["label"], int(d["label_id"]), float(d["score"]), tuple(d["box"]),
                          d.get("mask"), d.get("keypoints"))
                for d in payload["detections"]]
    if isinstance(payload, list):
        dets = []
        for item in payload:
            keys = [k for k in item if k != "score"]
            if len(keys) != 1 or "score" not in item:
                raise ValueError(f"not a stock detection: {item!r}")
            label = keys[0]
            lab_id = (names_to_ids or {}).get(label, int(label) if label.isdigit() else -1)
            dets.append(Detection(label, lab_id, float(item["score"]), tuple(item[label])))
        return dets
    raise ValueError(f"not a detection response: {str(payload)[:200]}")


def validate_detailed(payload: Any) -> None:
    """Raise ``ValueError`` naming the first way ``payload`` breaks the detailed schema."""
    if not isinstance(payload, dict):
        raise ValueError("detailed response must be an object")
    for key, typ in (("detections", list), ("image_size", list), ("model", str), ("version", str)):
        if not isinstance(payload.get(key), typ):
            raise ValueError(f"detailed response: {key!r} must be {typ.__name__}")
    w, h = payload["image_size"]
    names = payload.get("keypoint_names")
    for d in payload["detections"]:
        if not {"label", "label_id", "score", "box"} <= set(d):
            raise ValueError(f"detection lacks keys: {d}")
        x1, y1, x2, y2 = d["box"]
        if not (0 <= d["score"] <= 1):
            raise ValueError(f"score out of [0, 1]: {d}")
        if not (-1e-3 <= x1 <= x2 <= w + 1e-3 and -1e-3 <= y1 <= y2 <= h + 1e-3):
            raise ValueError(f"box outside the {w}x{h} image: {d}")
        if "mask" in d:
            m = d["mask"]
            if not (isinstance(m, dict) and m.get("size") == [h, w] and isinstance(m.get("counts"), str)):
                raise ValueError(f"mask must be RLE {{'size': [{h}, {w}], 'counts': str}}, got {str(m)[:80]}")
            if sum(rle.decompress_counts(m["counts"])) != h * w:
                raise ValueError(f"mask runs do not cover the {w}x{h} image")
        if "keypoints" in d:
            kps = d["keypoints"]
            if not isinstance(names, list) or len(kps) != len(names):
                raise ValueError(f"{len(kps)} keypoints but keypoint_names is {names!r}")
            for x, y, s in kps:
                if not (-1e-3 <= x <= w + 1e-3 and -1e-3 <= y <= h + 1e-3):
                    raise ValueError(f"keypoint ({x}, {y}) outside the {w}x{h} image")
                if not math.isfinite(s):
                    raise ValueError(f"keypoint score {s} is not finite")
