"""Accelerated runtimes: a detector's dense parts run in ONNX Runtime or OpenVINO.

torchvision's detectors are a resize/normalise transform, dense networks (backbone + FPN, heads)
and pre/post-processing (anchors, box decoding, NMS, RoIAlign, mask pasting). Only the dense
networks are exported: each part named in :data:`PART_CANDIDATES` is exported on its own to ONNX
(dynamic batch and, where the model's transform lets them vary, height and width) and replaced in
the model by a :class:`CompiledPart` taking and returning exactly what the torch module did. The
rest stays torchvision's own code, so every answer format, threshold, mask and keypoint feature is
unchanged. A part that does not export (or exports wrong) stays eager, and the archive's
``runtime/runtime.json`` says which one and why.

This module is carried inside every archive (it is part of ``serve_demo/core``); the runtimes
themselves are imported only when an archive asks for them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from .config import PRECISIONS, RUNTIMES, RuntimeConfig  # noqa: F401 - the runtime names, re-exported

log = logging.getLogger(__name__)

RUNTIME_DIR = "runtime"  # inside an archive
MANIFEST = "runtime.json"

# The dense parts of the detector families this project serves, tried in this order; a model has
# the ones whose attribute path exists. GeneralizedRCNN: backbone, RPN head, RoI heads' MLPs/convs.
# FCOS, RetinaNet, SSD: backbone and head.
PART_CANDIDATES = (
    "backbone", "head", "rpn.head",
    "roi_heads.box_head", "roi_heads.box_predictor",
    "roi_heads.mask_head", "roi_heads.mask_predictor",
    "roi_heads.keypoint_head", "roi_heads.keypoint_predictor",
)


class RuntimeUnavailable(RuntimeError):
    """The archive asks for a runtime this environment lacks or cannot run on its device."""


@dataclass
class PartRecord:
    """One dense part in ``runtime.json``: its file, dynamic axes and input/output structure."""

    path: str  # attribute path in the model, e.g. "roi_heads.box_head"
    file: str | None = None  # relative to runtime/; None when it stays eager
    in_spec: Any = None
    out_spec: Any = None
    dynamic: list[list[int]] = field(default_factory=list)  # per flat input, the dims that vary
    max_abs_diff: float | None = None  # export check against eager on a second input shape
    eager_reason: str | None = None  # why this part stays eager


@dataclass
class RuntimeManifest:
    """``runtime/runtime.json``: what was exported, what stays eager and why, the parity figures."""

    runtime: str
    precision: str
    parts: list[PartRecord]
    parity: dict = field(default_factory=dict)
    torch_version: str = torch.__version__
    graph: str = "parts"  # whole: one part, WHOLE_PATH, the model([image]) call
    int8_ops: list[str] = field(default_factory=list)  # a whole graph in int8: the ONNX op types quantized

    @property
    def exported(self) -> list[PartRecord]:
        return [p for p in self.parts if p.file]

    @property
    def eager(self) -> list[PartRecord]:
        return [p for p in self.parts if not p.file]

    def write(self, folder: Path) -> None:
        (folder / MANIFEST).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def read(cls, folder: Path) -> RuntimeManifest:
        path = folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the archive names an accelerated runtime but carries no "
                                    "exported parts; rebuild it with make archive RUNTIME=...")
        raw = json.loads(path.read_text())
        raw["parts"] = [PartRecord(**p) for p in raw["parts"]]
        return cls(**raw)


# --- nested tensors <-> flat lists -------------------------------------------------------------

def flatten(obj: Any) -> tuple[list[torch.Tensor], Any]:
    """The tensors of a nest of tuples/lists/dicts, in order, and a JSON spec to rebuild it."""
    if isinstance(obj, torch.Tensor):
        return [obj], "t"
    if isinstance(obj, dict):
        flat, items = [], []
        for k, v in obj.items():
            f, s = flatten(v)
            flat += f
            items.append([k, s])
        return flat, {"dict": items}
    if isinstance(obj, (list, tuple)):
        flat, items = [], []
        for v in obj:
            f, s = flatten(v)
            flat += f
            items.append(s)
        return flat, {"tuple" if isinstance(obj, tuple) else "list": items}
    raise TypeError(f"cannot export a part taking or returning {type(obj).__name__}")


def unflatten(tensors: Iterator[torch.Tensor], spec: Any) -> Any:
    """The nest :func:`flatten` described, from its tensors in order (dicts come back ordered)."""
    if spec == "t":
        return next(tensors)
    if "dict" in spec:
        return OrderedDict((k, unflatten(tensors, s)) for k, s in spec["dict"])
    if "tuple" in spec:
        return tuple(unflatten(tensors, s) for s in spec["tuple"])
    return [unflatten(tensors, s) for s in spec["list"]]


def submodule(model: nn.Module, path: str) -> nn.Module | None:
    obj: Any = model
    for attr in path.split("."):
        obj = getattr(obj, attr, None)
    return obj if isinstance(obj, nn.Module) else None


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = submodule(model, parent_path) if parent_path else model
    setattr(parent, attr, module)


def dense_parts(model: nn.Module) -> list[str]:
    """The attribute paths of :data:`PART_CANDIDATES` this model has."""
    return [p for p in PART_CANDIDATES if submodule(model, p) is not None]


# --- sessions ----------------------------------------------------------------------------------

class Session:
    """One compiled graph: flat float32 tensors in, flat tensors out."""

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError


# ONNX Runtime's GPU providers for a CUDA worker: unset = TensorRT where onnxruntime-gpu has it, then CUDA;
# cuda | tensorrt | tensorrt-fp16 (TensorRT's fp16 kernels) pick one (make bench DEVICE=cuda measures each)
ORT_GPU_ENV = "SERVE_DEMO_ORT_GPU"
ORT_GPU_CHOICES = {"cuda": ("CUDAExecutionProvider",), "tensorrt": ("TensorrtExecutionProvider",),
                   "tensorrt-fp16": ("TensorrtExecutionProvider",), "": ("TensorrtExecutionProvider",
                                                                          "CUDAExecutionProvider")}


def ort_gpu_providers(available: list[str], device_id: int, choice: str | None = None) -> list:
    """The GPU providers (with options) for ``choice`` (default: :data:`ORT_GPU_ENV`), then the CPU's.

    Raises:
        RuntimeUnavailable: an unknown choice, or none of its providers in this ONNX Runtime.
    """
    choice = (os.environ.get(ORT_GPU_ENV, "") if choice is None else choice).strip().lower()
    if choice not in ORT_GPU_CHOICES:
        raise RuntimeUnavailable(f"{ORT_GPU_ENV}={choice!r}: give one of cuda, tensorrt, tensorrt-fp16 (or unset it)")
    gpu = [p for p in ORT_GPU_CHOICES[choice] if p in available]
    if not gpu:
        raise RuntimeUnavailable("the worker runs on CUDA but this ONNX Runtime has none of "
                                 f"{', '.join(ORT_GPU_CHOICES[choice])} (has {available}): install onnxruntime-gpu "
                                 "(and TensorRT for its provider), or archive RUNTIME=eager")
    options = {"device_id": device_id}
    out: list = []
    for p in gpu:
        extra = {"trt_fp16_enable": True} if choice == "tensorrt-fp16" and p == "TensorrtExecutionProvider" else {}
        out.append((p, {**options, **extra}))
    return out + ["CPUExecutionProvider"]


class OrtSession(Session):
    """ONNX Runtime on CPU (or CUDA/TensorRT with onnxruntime-gpu on a CUDA device: :func:`ort_gpu_providers`)."""

    def __init__(self, path: Path, threads: int, device: torch.device) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeUnavailable("this archive runs its dense parts in ONNX Runtime, which is not installed: "
                                     "pip install onnxruntime (onnxruntime-gpu on CUDA machines)") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # threads that spin between calls take the core from the worker next door (layout.py: runtime
        # threads outnumber a worker's cores): measured 15.8 img/s spinning against 42.3 without, 1 x 2
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = ["CPUExecutionProvider"]
        if device.type == "cuda":
            providers = ort_gpu_providers(ort.get_available_providers(), device.index or 0)
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.names = [i.name for i in self.session.get_inputs()]

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        feed = {n: t.detach().cpu().contiguous().numpy() for n, t in zip(self.names, inputs)}
        return [torch.from_numpy(a) for a in self.session.run(None, feed)]


class OpenVinoSession(Session):
    """OpenVINO's CPU plugin, ``threads`` inference threads, the given precision (fp32 unless asked).

    ``float_precision``: what the layers left in float run in (f32, or bf16 where the CPU has it).
    """

    def __init__(self, path: Path, threads: int, float_precision: str = "f32") -> None:
        try:
            import openvino as ov
        except ImportError:
            raise RuntimeUnavailable("this archive runs its dense parts in OpenVINO, which is not installed: "
                                     "pip install openvino") from None
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": max(1, threads), "PERFORMANCE_HINT": "LATENCY",
                  # pinned threads of two worker processes land on the same cores: 2 workers served
                  # no more than 1 (29.8 against 29.5 img/s) until pinning was turned off (55.9)
                  "ENABLE_CPU_PINNING": False,
                  "NUM_STREAMS": 1,
                  # the CPU plugin runs bf16 by default where the CPU has it (AVX512-BF16, AMX): fp32
                  # unless the archive chose a lower precision, which is gated by mAP instead of pixel parity
                  "INFERENCE_PRECISION_HINT": float_precision}
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.local = threading.local()  # one infer request per calling thread

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        req = getattr(self.local, "req", None)
        if req is None:
            req = self.local.req = self.compiled.create_infer_request()
        req.infer([t.detach().cpu().contiguous().numpy() for t in inputs])
        # the request reuses its output buffers: copy before the next call
        return [torch.from_numpy(req.get_output_tensor(i).data.copy()) for i in range(len(self.compiled.outputs))]


def openvino_float_precision(runtime: RuntimeConfig) -> str:
    """What OpenVINO runs float layers in: bf16 for bf16, and for the whole graph in int8 (its quantized layers
    in int8, the rest, RoIAlign and the heads' glue, in bf16: 19.1 against 21.8 ms for bf16 alone on the
    MobileNet FPN, 5.8 against 7.6 on fcos_tiny); f32 otherwise (the dense parts in int8 keep f32 between)."""
    whole_int8 = runtime.precision == "int8" and runtime.graph == "whole"
    return "bf16" if runtime.precision == "bf16" or whole_int8 else "f32"


def open_session(path: Path, runtime: RuntimeConfig, threads: int, device: torch.device) -> Session:
    if runtime.name == "onnxruntime":
        return OrtSession(path, threads, device)
    if runtime.name == "openvino":
        return OpenVinoSession(path, threads, openvino_float_precision(runtime))
    raise ValueError(f"no session for runtime {runtime.name!r}")


class ThreadChoice:
    """Whether the model's compiled parts run their wide sessions (more threads) on the next call:
    set per batch by the worker from :class:`Occupancy`, shared by all parts of one model."""

    def __init__(self, narrow: int, wide: int) -> None:
        self.narrow, self.wide, self.use_wide = narrow, wide, False


class Occupancy:
    """Which workers of one model are inside a forward pass now: one marker file per busy worker
    process in a folder they share (the server's temp dir). A worker that finds itself alone may use
    the cores its idle neighbours leave (:class:`ThreadChoice`); a few microseconds per batch."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.mine = folder / str(os.getpid())
        for p in folder.iterdir():  # markers of workers that died inside a forward pass
            if p.name.isdigit() and p.name != self.mine.name and not psutil.pid_exists(int(p.name)):
                p.unlink(missing_ok=True)

    @contextlib.contextmanager
    def inside(self, choice: ThreadChoice) -> Iterator[None]:
        """Marks this worker busy for the block and sets ``choice`` from the others' markers."""
        self.mine.touch()
        try:
            with os.scandir(self.folder) as entries:
                choice.use_wide = not any(e.name != self.mine.name for e in entries)
            yield
        finally:
            choice.use_wide = False
            self.mine.unlink(missing_ok=True)


class CompiledPart(nn.Module):
    """Stands in for a dense part: same arguments, same (nested) result, computed by a runtime (its
    wide session when the model's :class:`ThreadChoice` says so)."""

    def __init__(self, session: Session, record: PartRecord, device: torch.device, wide: Session | None = None,
                 choice: ThreadChoice | None = None) -> None:
        super().__init__()
        self.session, self.record, self.device = session, record, device
        self.wide, self.choice = wide, choice

    def forward(self, *args: Any) -> Any:
        flat, _ = flatten(args)
        session = self.wide if self.wide is not None and self.choice is not None and self.choice.use_wide \
            else self.session
        outs = session.run(flat)
        if self.device.type != "cpu":
            outs = [o.to(self.device, non_blocking=True) for o in outs]
        return unflatten(iter(outs), self.record.out_spec)

    def extra_repr(self) -> str:
        return f"{self.record.path} -> {self.record.file}"


WHOLE_PATH = "whole_graph"


class WholeGraph(CompiledPart):
    """Stands in for the whole ``model(images)`` call: one graph run per image (the transform, anchors,
    RoIAlign, NMS and box decoding inside it); the answer's keys are the record's ``out_spec``."""

    def forward(self, images: list[torch.Tensor], targets: Any = None) -> list[dict[str, torch.Tensor]]:
        if targets is not None:
            raise ValueError("a whole-graph runtime only answers (no training targets)")
        session = self.wide if self.wide is not None and self.choice is not None and self.choice.use_wide \
            else self.session
        answers = []
        for image in images:
            outs = session.run([image])
            answer = dict(zip(self.record.out_spec, (o.to(self.device, non_blocking=True) for o in outs)))
            if "labels" in answer:
                answer["labels"] = answer["labels"].long()
            answers.append(answer)
        return answers


def thread_choice(model: nn.Module) -> ThreadChoice | None:
    """The :class:`ThreadChoice` of a model whose parts have wide sessions (None otherwise)."""
    return next((m.choice for m in model.modules() if isinstance(m, CompiledPart) and m.choice), None)


def accelerate(model: nn.Module, folder: Path, runtime: RuntimeConfig, threads: int,
               device: torch.device, wide_threads: int | None = None) -> RuntimeManifest:
    """Replace the exported parts of ``model`` by their compiled graphs from ``folder`` (in place).
    ``wide_threads`` > ``threads`` (CPU): each part also gets a session with that many threads, used
    when the worker runs alone (:class:`Occupancy`).

    Raises:
        RuntimeUnavailable / FileNotFoundError: the runtime or a part's file is missing.
    """
    manifest = RuntimeManifest.read(folder)
    if (manifest.runtime, manifest.precision, manifest.graph) != (runtime.name, runtime.precision, runtime.graph):
        raise ValueError(f"{folder / MANIFEST} holds {manifest.runtime}/{manifest.precision}/{manifest.graph} "
                         f"graphs but model-config.yaml asks for {runtime.name}/{runtime.precision}/{runtime.graph}: "
                         "rebuild the archive")
    dual = device.type == "cpu" and wide_threads is not None and wide_threads > threads
    choice = ThreadChoice(threads, wide_threads) if dual else None
    if manifest.graph == "whole":
        (rec,) = manifest.exported
        wide = open_session(folder / rec.file, runtime, wide_threads, device) if dual else None
        whole = WholeGraph(open_session(folder / rec.file, runtime, threads, device), rec, device, wide, choice)
        model.add_module(WHOLE_PATH, whole)  # found by thread_choice; model(images) now calls it
        model.forward = whole.forward
        log.info("runtime %s: the whole model (transform, heads, post-processing) runs in %s", runtime.label,
                 runtime.name)
        return manifest
    for rec in manifest.exported:
        if submodule(model, rec.path) is None:
            raise ValueError(f"{rec.path} was exported but the model has no such part: the archive's model "
                             "and its runtime files disagree; rebuild the archive")
        wide = open_session(folder / rec.file, runtime, wide_threads, device) if dual else None
        set_submodule(model, rec.path, CompiledPart(open_session(folder / rec.file, runtime, threads, device),
                                                    rec, device, wide, choice))
    if manifest.eager:
        log.warning("runtime %s: parts %s stay eager (%s)", runtime.label, [p.path for p in manifest.eager],
                    "; ".join(f"{p.path}: {p.eager_reason}" for p in manifest.eager))
    log.info("runtime %s: %s run in %s", runtime.label, [p.path for p in manifest.exported], runtime.name)
    return manifest
