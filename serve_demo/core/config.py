"""The worker's tunables: the ``handler:`` section of an archive's ``model-config.yaml``.

Read once per worker, validated, with the defaults of :mod:`serve_demo.core.defaults`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from . import defaults
from .imaging import RequestError

LABEL_FILE = "index_to_name.json"  # the label map's name inside an archive


@dataclass(frozen=True)
class HandlerConfig:
    """The ``handler:`` section of ``model-config.yaml``, validated."""

    arch: str | None = None  # None: the archive's model file defines the detector class
    threshold: float = defaults.THRESHOLD
    response_format: str = defaults.RESPONSE_FORMAT
    max_image_pixels: int = defaults.MAX_IMAGE_PIXELS
    max_response_bytes: int = defaults.MAX_RESPONSE_SIZE  # image answers larger than this get 413
    threads: int = 0  # torch/runtime threads per worker; 0: the machine's layout (core.layout.cpu_layout)
    fp16: bool = False  # autocast on CUDA only
    gpu_decode: bool = False  # CUDA only: nvjpeg for plain JPEGs (torchvision.io.decode_jpeg(device=...))
    channels_last: bool = False  # convolution weights in NHWC (CUDA tensor cores; oneDNN on CPU)
    pin_memory: bool = False  # CUDA only: page-locked host copies before the upload
    model_kwargs: dict = field(default_factory=dict)
    mask_threshold: float = defaults.MASK_THRESHOLD  # mask models: probability at which a pixel belongs to the mask
    keypoint_names: list | None = None  # keypoint models; None: COCO's 17 names, else kp_0, kp_1, ...
    capture: dict | None = None  # opt-in capture of uncertain images for labelling (core.capture.CaptureConfig)
    runtime: dict | str | None = None  # dense parts in onnxruntime/openvino (core.runtime.RuntimeConfig); None: eager

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
        if cfg.capture is not None:
            from .capture import CaptureConfig

            CaptureConfig.from_yaml(cfg.capture)
        from .runtime import RuntimeConfig

        RuntimeConfig.from_yaml(cfg.runtime)
        if cfg.response_format not in defaults.FORMATS:
            raise ValueError(f"model-config.yaml handler.response_format must be one of {defaults.FORMATS}")
        if int(cfg.max_image_pixels) < 1 or int(cfg.threads) < 0 or int(cfg.max_response_bytes) < 1:
            raise ValueError("model-config.yaml handler: max_image_pixels and max_response_bytes must be >= 1 "
                             "and threads >= 0")
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


