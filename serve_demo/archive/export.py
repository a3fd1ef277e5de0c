"""Archive time: export an eager detector's dense parts (or the whole graph) to ONNX (for ONNX Runtime /
OpenVINO) and check the export against its eager self; int8 calibration through NNCF (dense parts) or ONNX
Runtime's static quantizer (whole graph).

Only the archiver needs this; a worker loads the result with :func:`serve_demo.core.runtime.accelerate`,
so archives (which carry ``serve_demo/core``) do not carry the export code.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from serve_demo.core.runtime import (
    PART_CANDIDATES,
    PartRecord,
    RuntimeConfig,
    RuntimeManifest,
    RuntimeUnavailable,
    dense_parts,
    flatten,
    open_session,
    submodule,
    unflatten,
)

log = logging.getLogger(__name__)

OPSET = 17


class _Flat(nn.Module):
    """A part with flat tensor inputs and a tuple of tensors out, as ONNX export wants it."""

    def __init__(self, part: nn.Module, in_spec: Any) -> None:
        super().__init__()
        self.part, self.in_spec = part, in_spec

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = unflatten(iter(flat), self.in_spec)
        return tuple(flatten(self.part(*args))[0])


def capture_inputs(model: nn.Module, paths: list[str], images: list[torch.Tensor]) -> dict[str, list[tuple]]:
    """Each part's positional arguments, per forward pass of ``model`` over each image (float 0-1)."""
    seen: dict[str, list[tuple]] = {p: [] for p in paths}
    hooks = []
    for p in paths:
        def hook(_mod: nn.Module, args: tuple, p: str = p) -> None:
            seen[p].append(tuple(_detach(a) for a in args))
        hooks.append(submodule(model, p).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for img in images:
                model([img])
    finally:
        for h in hooks:
            h.remove()
    return seen


def _detach(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return OrderedDict((k, _detach(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach(v) for v in obj)
    return obj


def _dynamic_dims(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[list[int]]:
    """Per flat input: dim 0 (batch, or the number of boxes) and every dim whose size differs."""
    return [sorted({0} | {d for d in range(x.dim()) if x.shape[d] != y.shape[d]}) for x, y in zip(a, b)]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """Largest absolute difference, and the largest magnitude it is measured against."""
    diff = max((float((x.float() - y.float()).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)
    scale = max((float(x.float().abs().max()) for x in a if x.numel()), default=0.0)
    return diff, scale


def export_parts(model: nn.Module, images: list[torch.Tensor], folder: Path, runtime: RuntimeConfig,
                 threads: int = 1, calibration: list[torch.Tensor] | None = None) -> RuntimeManifest:
    """Export each dense part of ``model`` (eager, eval, CPU) to ``folder`` for ``runtime``.

    ``images`` (at least two, of different sizes) drive the export and its check: the graph traced on
    the first must match eager on the second (relative difference 1e-3), else the part stays eager
    with the reason recorded. ``calibration``: images for int8 post-training quantization (NNCF).
    """
    if len(images) < 2:
        raise ValueError("export needs two sample images of different sizes")
    folder.mkdir(parents=True, exist_ok=True)
    paths = dense_parts(model)
    if not paths:
        raise ValueError(f"{type(model).__name__} has none of the dense parts this exporter knows "
                         f"({', '.join(PART_CANDIDATES)}): archive it with RUNTIME=eager")
    captured = capture_inputs(model, paths, images[:2])
    calib = capture_inputs(model, paths, calibration) if runtime.precision == "int8" and calibration else {}
    records = []
    for path in paths:
        rec = PartRecord(path)
        records.append(rec)
        calls = captured[path]
        if len(calls) < 2:
            rec.eager_reason = "not called on the sample images"
            continue
        first, _ = flatten(calls[0])
        second, in_spec = flatten(calls[-1])
        if not first or any(t.numel() == 0 for t in first + second):
            rec.eager_reason = "its sample inputs were empty (no boxes reached it): give more validation images"
            continue
        part = submodule(model, path)
        with torch.no_grad():
            ref_first, out_spec = flatten(part(*calls[0]))
            ref_second, _ = flatten(part(*calls[-1]))
        rec.in_spec, rec.out_spec = in_spec, out_spec
        rec.dynamic = _dynamic_dims(first, second)
        file = f"{path.replace('.', '_')}.onnx"
        try:
            _export_onnx(_Flat(part, in_spec).eval(), first, len(ref_first), rec.dynamic, folder / file)
        except Exception as exc:  # noqa: BLE001 - any exporter failure keeps the part eager, recorded
            rec.eager_reason = f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            continue
        if runtime.precision == "int8":
            try:
                file = _quantize_int8(folder / file, calib.get(path, []), folder)
            except Exception as exc:  # noqa: BLE001
                rec.eager_reason = f"int8 quantization failed: {type(exc).__name__}: {str(exc)[:200]}"
                continue
        session = open_session(folder / file, runtime, threads, torch.device("cpu"))
        got = session.run(second)
        if len(got) != len(ref_second) or any(g.shape != r.shape for g, r in zip(got, ref_second)):
            rec.eager_reason = ("the exported graph kept a shape of the first sample (it answered "
                                f"{[tuple(g.shape) for g in got]} for {[tuple(r.shape) for r in ref_second]})")
            continue
        diff, scale = _max_diff(ref_second, got)
        rec.max_abs_diff = diff
        if runtime.precision == "fp32" and diff > 1e-3 * max(1.0, scale):
            rec.eager_reason = f"the exported graph differs from eager by {diff:.3g} (scale {scale:.3g})"
            continue
        rec.file = file
    manifest = RuntimeManifest(runtime.name, runtime.precision, records)
    for p in folder.iterdir():  # keep only the files the manifest names (an .onnx quantized to IR goes)
        if p.is_file() and not any(rec.file and p.name in (rec.file, rec.file[:-4] + ".bin") for rec in records):
            p.unlink()
    manifest.write(folder)
    if not manifest.exported:
        raise ValueError(f"no dense part of {type(model).__name__} could run in {runtime.label}: "
                         + "; ".join(f"{r.path}: {r.eager_reason}" for r in records))
    return manifest


WHOLE_FILE = "model.onnx"
WHOLE_INT8_FILE = "model-int8.onnx"
# what the whole graph's int8 may quantize (weights per channel, activations calibrated), narrowest first; the
# rest stays float. A wider set is kept only when it is at least INT8_WIDER_GAIN faster: every layer quantized
# costs accuracy. On the MobileNet FPN the fully connected layers alone were faster (19.1 against 20.4 ms at 1
# thread, 21.8 in bf16) and lost nothing (valid mAP +0.0002), its convolutions too lost 0.0047 (test: 0.0096);
# fcos_tiny has only convolutions (5.8 against 7.6 ms in bf16)
INT8_OP_SETS = (("MatMul", "Gemm"), ("Conv", "MatMul", "Gemm"))
INT8_WIDER_GAIN = 1.1
INT8_TIMING_ROUNDS = 3


def merge_levels_by_gather(levels: torch.Tensor, unmerged: list[torch.Tensor]) -> torch.Tensor:
    """MultiScaleRoIAlign's per-level results back in box order: one gather by the inverse permutation.

    The same tensor as torchvision's traced ``_onnx_merge_levels`` (a zeros tensor and one scatter per level
    through an index expanded to every output element), without the expanded index: that took 3.7 of the
    MobileNet FPN whole graph's 21 ms in OpenVINO bf16 (R50-FPN in fp32: no difference, 1313 / 1328 ms).
    """
    order = torch.cat([torch.where(levels == level)[0] for level in range(len(unmerged))])
    return torch.cat(unmerged)[torch.argsort(order)]


@contextlib.contextmanager
def gather_merged_levels() -> Iterator[None]:
    """While tracing, torchvision's multi-level RoIAlign merges its levels with :func:`merge_levels_by_gather`."""
    from torchvision.ops import poolers

    original = poolers._onnx_merge_levels
    poolers._onnx_merge_levels = merge_levels_by_gather
    try:
        yield
    finally:
        poolers._onnx_merge_levels = original


def export_whole(model: nn.Module, images: list[torch.Tensor], folder: Path, runtime: RuntimeConfig,
                 threads: int = 1, strict: bool = True,
                 calibration: list[torch.Tensor] | None = None) -> RuntimeManifest:
    """Export the whole ``model([image])`` call (transform, heads, anchors, RoIAlign, NMS, box decoding and
    resizing back) to ``folder/model.onnx`` with the classic exporter, height and width dynamic; for int8,
    its Conv / MatMul / Gemm layers quantized on ``calibration`` (float 0-1 images) to ``model-int8.onnx``.

    Traced on ``images[0]``; the graph must then answer ``images[1]`` (another size) like eager does,
    by the parity gate's matching rule, else it is refused: a size frozen by the trace shows there.
    ``strict`` False (a candidate judged by mAP instead, ``PRECISION=auto``) records the difference and keeps it.

    Raises:
        ValueError: the export or quantization failed, or the graph answers the second image differently.
    """
    from .parity import ParityReport, compare

    if len(images) < 2:
        raise ValueError("export needs two sample images of different sizes")
    if runtime.precision == "int8" and not calibration:
        raise ValueError("int8 needs calibration images")
    folder.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    with torch.no_grad():
        first, second = (model([im])[0] for im in images[:2])
    keys = list(first)
    try:
        with warnings.catch_warnings(), gather_merged_levels():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, ([images[0]],), str(folder / WHOLE_FILE), dynamo=False, opset_version=OPSET,
                              input_names=["image"], output_names=keys,
                              dynamic_axes={"image": [1, 2], **{k: [0] for k in keys}}, do_constant_folding=True)
    except Exception as exc:  # noqa: BLE001 - any exporter failure is this graph's refusal, with the reason
        raise ValueError(f"whole-graph ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                         ) from None
    file, int8_ops = WHOLE_FILE, []
    if runtime.precision == "int8":
        int8_ops = _quantize_whole_int8(folder / WHOLE_FILE, calibration or [], folder / WHOLE_INT8_FILE, runtime,
                                        threads)
        (folder / WHOLE_FILE).unlink()
        file = WHOLE_INT8_FILE
    session = open_session(folder / file, runtime, threads, torch.device("cpu"))
    got = dict(zip(keys, session.run([images[1]])))
    got["labels"] = got["labels"].long()
    report = ParityReport()
    compare({k: v.float() if k != "labels" else v for k, v in second.items()}, got, report, "the second sample")
    differs = report.unmatched or report.label_mismatches or report.max_box_diff > 0.5 or report.max_score_diff > 1e-3
    if differs and not strict:
        log.info("%s whole graph: a second size answers unlike eager (%s); judged by mAP instead", runtime.label,
                 report.summary())
    elif differs:
        raise ValueError(f"the whole graph traced on a {tuple(images[0].shape[1:])} image answers a "
                         f"{tuple(images[1].shape[1:])} one unlike eager ({report.summary()})")
    record = PartRecord("*", file, out_spec=keys, dynamic=[[1, 2]], max_abs_diff=report.max_box_diff)
    manifest = RuntimeManifest(runtime.name, runtime.precision, [record], graph="whole", int8_ops=int8_ops)
    manifest.write(folder)
    return manifest


def _export_onnx(module: nn.Module, inputs: list[torch.Tensor], n_out: int, dynamic: list[list[int]],
                 path: Path) -> None:
    names = [f"in{i}" for i in range(len(inputs))]
    axes = {n: {d: f"{n}_d{d}" for d in dims} for n, dims in zip(names, dynamic)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(inputs), str(path), dynamo=False, input_names=names,
                          output_names=[f"out{i}" for i in range(n_out)], dynamic_axes=axes, opset_version=OPSET,
                          do_constant_folding=True)


def _quantize_whole_int8(onnx_path: Path, calibration: list[torch.Tensor], out: Path, runtime: RuntimeConfig,
                         threads: int) -> list[str]:
    """Static int8 quantization of a whole graph to ``out``, with ONNX Runtime's quantizer (QDQ, which OpenVINO
    runs in int8): weights per channel, activations symmetric from min-max over ``calibration``. Each op set of
    :data:`INT8_OP_SETS` the graph has is quantized and timed on the calibration images; the narrowest is kept
    unless a wider one is :data:`INT8_WIDER_GAIN` faster.
    NNCF's graph builder cannot read the whole graph's ``If`` nodes; this quantizer leaves them alone.

    Raises:
        ValueError: the quantizer failed (its reason).
    """
    import onnx

    present = {n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node}
    sets = list(dict.fromkeys(tuple(op for op in ops if op in present) for ops in INT8_OP_SETS))
    sets = [ops for ops in sets if ops]
    if not sets:
        raise ValueError(f"the whole graph has none of {', '.join(INT8_OP_SETS[-1])} to quantize")
    timed: list[tuple[float, tuple[str, ...], Path]] = []
    for k, ops in enumerate(sets):
        path = out.with_name(f".int8-{k}.onnx")
        try:
            _quantize_static(onnx_path, calibration, path, ops)
        except Exception as exc:  # noqa: BLE001 - the quantizer's failure is this candidate's refusal
            raise ValueError(f"whole-graph int8 quantization ({', '.join(ops)}) failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]}") from None
        timed.append((_median_ms(path, runtime, threads, calibration[:4]) if len(sets) > 1 else 0.0, ops, path))
    kept = timed[0]
    for candidate in timed[1:]:  # wider: only when clearly faster
        if candidate[0] * INT8_WIDER_GAIN <= kept[0]:
            kept = candidate
    if len(timed) > 1:
        figures = "; ".join(f"{', '.join(o)} quantized {t:.1f} ms" for t, o, _ in timed)
        log.info("whole-graph int8: %s; kept %s", figures, ", ".join(kept[1]))
    kept[2].rename(out)
    for _, _, path in timed:
        path.unlink(missing_ok=True)
    return list(kept[1])


def _median_ms(path: Path, runtime: RuntimeConfig, threads: int, images: list[torch.Tensor]) -> float:
    """Median milliseconds of one whole-graph call over ``images``, :data:`INT8_TIMING_ROUNDS` times, after one
    warm-up call."""
    session = open_session(path, runtime, threads, torch.device("cpu"))
    session.run([images[0]])
    ms = []
    for _ in range(INT8_TIMING_ROUNDS):
        for image in images:
            t0 = time.perf_counter()
            session.run([image])
            ms.append((time.perf_counter() - t0) * 1000)
    return sorted(ms)[len(ms) // 2]


class _QuantizerAdvice(logging.Filter):
    """Drops ONNX Runtime's quantizer advice to pre-process the model (logged on the root logger per call): the
    whole graph is exported shape-inferred already, and the advice reads like a problem to a user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in str(record.msg)


def _quantize_static(onnx_path: Path, calibration: list[torch.Tensor], out: Path, ops: tuple[str, ...]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.images = iter(calibration)

        def get_next(self) -> dict | None:
            image = next(self.images, None)
            return None if image is None else {"image": image.contiguous().numpy()}

    advice = _QuantizerAdvice()
    root = logging.getLogger()
    root.addFilter(advice)
    try:
        quantize_static(str(onnx_path), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(ops), per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, extra_options={"ActivationSymmetric": True})
    finally:
        root.removeFilter(advice)


def _quantize_int8(onnx_path: Path, calls: list[tuple], folder: Path) -> str:
    """Post-training int8 quantization of one part with NNCF (OpenVINO IR out); its IR file name."""
    try:
        import nncf
        import openvino as ov
    except ImportError:
        raise RuntimeUnavailable("int8 needs NNCF and OpenVINO: pip install nncf openvino") from None
    if not calls:
        raise ValueError("no calibration inputs reached this part")
    data = [[t.numpy() for t in flatten(c)[0]] for c in calls]
    model = ov.Core().read_model(str(onnx_path))
    quantized = nncf.quantize(model, nncf.Dataset(data), subset_size=len(data))
    xml = onnx_path.with_suffix(".xml")
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    return xml.name
