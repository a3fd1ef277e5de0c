"""What an archive is built from: :class:`ArchiveSpec` (the library API of ``serve_demo archive``) and
:class:`ArchiveError`, shared by the builder and the runtime chooser (:mod:`.accelerate`).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

from serve_demo.core import defaults, models

PACKAGE = Path(__file__).resolve().parent.parent  # serve_demo/
CORE = "core"  # the worker core: the archive carries this folder, so it runs on any TorchServe
HANDLER = "handlers/detector_handler.py"  # relative to the project folder (make runs there)

VALID_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ArchiveError(RuntimeError):
    """The inputs do not make a servable archive; the message names what to fix."""


@dataclass
class ArchiveSpec:
    """What to archive and how it serves: the library API of ``serve_demo archive``.

    The command line (:func:`add_arguments`) is built from these fields' defaults, so both agree.
    """

    name: str
    weights: str  # state_dict file (.pt/.pth), a training checkpoint or a PyTorch Lightning .ckpt
    labels: str  # label map JSON {"0": "__background__", ...}
    version: str = defaults.VERSION
    arch: str | None = None  # architecture name; None: DEMO_ARCH unless model_file is given
    model_file: str | None = None  # a .py defining one detector class with a no-argument constructor
    handler: str = HANDLER
    threshold: float = defaults.THRESHOLD
    response_format: str = defaults.RESPONSE_FORMAT
    batch_size: int = 1
    max_batch_delay: int = 20  # ms
    workers: int = 0  # workers for this model; 0: the serving machine's layout (core.layout.cpu_layout)
    threads: int = 0  # torch/runtime threads per worker; 0: the serving machine's layout
    mask_threshold: float = defaults.MASK_THRESHOLD
    keypoint_names: str | None = None  # path of a JSON list of names
    model_kwargs: dict = field(default_factory=dict)
    weights_prefix: str | None = None  # key prefix to strip from the checkpoint (None: found by matching)
    keep_duplicate_labels: bool = False
    fp16: bool = False
    gpu_decode: bool = False
    channels_last: bool = False
    pin_memory: bool = False
    capture_rate: float = 0.0  # > 0: keep this share of the uncertain images for labelling (handler.capture)
    runtime: str = defaults.RUNTIME  # eager | onnxruntime | openvino | auto (the fastest passing parity here)
    # fp32; bf16 / int8 (openvino only) skip pixel parity and must pass the promotion gate; auto: the fastest of the
    # fp32 runtime and OpenVINO bf16 / int8 whose mAP on gate_images labelled parity_split images is within
    # gate_tolerance of fp32's (archive/precision.py)
    precision: str = defaults.PRECISION
    gate_tolerance: float = defaults.GATE_TOLERANCE
    gate_images: int = 100
    graph: str | None = None  # parts | whole (None: parts)
    parity_data: str | None = None  # COCO dataset root whose parity_split images gate an accelerated runtime
    parity_split: str = "valid"
    parity_images: int = 8  # the gate's images (the fastest candidate only; each candidate is timed on 2 first)
    export_path: str = defaults.MODEL_STORE
    build_dir: str = "build/archive"
    no_check: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ArchiveSpec:
        """The spec of a parsed command line (``--model-kwargs`` JSON decoded)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls)}
        values["model_kwargs"] = parse_model_kwargs(args.model_kwargs)
        return cls(**values)


def parse_model_kwargs(raw: str | None) -> dict:
    """``--model-kwargs`` JSON as a dict."""
    try:
        return models.parse_model_kwargs(raw)
    except ValueError as exc:
        raise ArchiveError(str(exc)) from None


@contextlib.contextmanager
def importable(stage: Path, model_file: Path | None) -> Iterator[None]:
    """``stage`` (the archive's folder) and the model file's folder importable, as in a worker."""
    paths = [str(stage)] + ([str(model_file.parent)] if model_file else [])
    sys.path[:0] = paths
    try:
        yield
    finally:
        for p in paths:
            sys.path.remove(p)
        if model_file:
            sys.modules.pop(model_file.stem, None)
