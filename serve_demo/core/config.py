"""The worker's tunables: the ``handler:`` section of an archive's ``model-config.yaml``.

Parsed once per archive (:attr:`serve_demo.core.loader.ArchiveFiles.handler`), validated, with the
defaults of :mod:`serve_demo.core.defaults`; its ``runtime`` and ``capture`` sub-sections are parsed
with it (:attr:`HandlerConfig.runtime_config`, :attr:`HandlerConfig.capture_config`). Everything that
serves reads these objects, never the YAML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from . import defaults
from .capture import CaptureConfig
from .imaging import RequestError

RUNTIMES = ("eager", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")  # bf16/int8: OpenVINO only, not bit-close: gated by mAP, not parity
GRAPHS = ("parts", "whole")  # the dense parts exported (torch keeps the rest), or the whole model([image]) call

LABEL_FILE = "index_to_name.json"  # the label map's name inside an archive


@dataclass(frozen=True)
class RuntimeConfig:
    """``handler.runtime`` of ``model-config.yaml``: which runtime runs the exported parts."""

    name: str = "eager"
    precision: str = "fp32"
    graph: str = "parts"  # parts: the dense parts in the runtime; whole: transform and post-processing too

    @classmethod
    def from_yaml(cls, section: dict | str | None) -> RuntimeConfig:
        """From ``{"name": ..., "precision": ...}`` (or just the name), naming a bad value."""
        if section is None:
            return cls()
        if isinstance(section, str):
            section = {"name": section}
        if not isinstance(section, dict) or set(section) - {"name", "precision", "graph"}:
            raise ValueError("model-config.yaml handler.runtime must be {name: eager|onnxruntime|openvino, "
                             "precision: fp32|bf16|int8, graph: parts|whole}")
        cfg = cls(**section)
        if cfg.name not in RUNTIMES:
            raise ValueError(f"model-config.yaml handler.runtime.name must be one of {RUNTIMES}, got {cfg.name!r}")
        if cfg.precision not in PRECISIONS:
            raise ValueError(f"model-config.yaml handler.runtime.precision must be one of {PRECISIONS}, "
                             f"got {cfg.precision!r}")
        if cfg.precision != "fp32" and cfg.name != "openvino":
            raise ValueError(f"precision {cfg.precision} needs the openvino runtime (got {cfg.name})")
        if cfg.graph not in GRAPHS:
            raise ValueError(f"model-config.yaml handler.runtime.graph must be one of {GRAPHS}, got {cfg.graph!r}")
        return cfg

    @property
    def accelerated(self) -> bool:
        return self.name != "eager"

    @property
    def label(self) -> str:
        """``openvino``, ``openvino-int8``, ``onnxruntime-whole``, ..."""
        whole = "-whole" if self.graph == "whole" else ""
        return f"{self.name}{whole}" if self.precision == "fp32" else f"{self.name}{whole}-{self.precision}"


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
    runtime: dict | str | None = None  # dense parts in onnxruntime/openvino (RuntimeConfig); None: eager

    runtime_config: RuntimeConfig = field(init=False, compare=False, repr=False)  # ``runtime``, parsed
    capture_config: CaptureConfig = field(init=False, compare=False, repr=False)  # ``capture``, parsed

    def __post_init__(self) -> None:
        """Validate and normalise, naming the bad key; parse ``runtime`` and ``capture``."""
        parse_threshold(self.threshold, "model-config.yaml handler.threshold")
        parse_threshold(self.mask_threshold, "model-config.yaml handler.mask_threshold")
        if self.keypoint_names is not None and not (
                isinstance(self.keypoint_names, list) and all(isinstance(n, str) for n in self.keypoint_names)):
            raise ValueError("model-config.yaml handler.keypoint_names must be a list of names")
        if self.response_format not in defaults.FORMATS:
            raise ValueError(f"model-config.yaml handler.response_format must be one of {defaults.FORMATS}")
        if int(self.max_image_pixels) < 1 or int(self.threads) < 0 or int(self.max_response_bytes) < 1:
            raise ValueError("model-config.yaml handler: max_image_pixels and max_response_bytes must be >= 1 "
                             "and threads >= 0")
        normal = {"threshold": float(self.threshold), "mask_threshold": float(self.mask_threshold),
                  "threads": int(self.threads), "max_image_pixels": int(self.max_image_pixels),
                  "max_response_bytes": int(self.max_response_bytes),
                  "runtime_config": RuntimeConfig.from_yaml(self.runtime),
                  "capture_config": CaptureConfig.from_yaml(self.capture)}
        for name, value in normal.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_yaml(cls, section: dict | None) -> HandlerConfig:
        """Build from the parsed ``handler:`` section, naming any bad key or value.

        Raises:
            ValueError: an unknown key or a bad value (``RequestError`` is one, for a threshold).
        """
        section = dict(section or {})
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"model-config.yaml handler: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**section)


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


