"""``make bench DEVICE=cuda``: the same models on an NVIDIA GPU, every fast variant through the mAP gate.

Per model (``--models``, as on the CPU), from archives built here as ``make archive`` builds them
(the ONNX Runtime one exported and parity-gated on the CPU):

* **variants in-process** on ``cuda:0``, each in a fresh process: eager fp32, eager fp16 (the
  handler's ``fp16`` autocast), and the ONNX Runtime archive with its CUDA provider, its TensorRT
  provider, and TensorRT with fp16 kernels (``SERVE_DEMO_ORT_GPU``: ``cuda``, ``tensorrt``,
  ``tensorrt-fp16``). Each gets images/s (decode + model + JSON, back to back, batch 1) and
  latency, after a warm-up over every image (TensorRT builds an engine per padded input shape);
* **the accuracy gate**: a trained model's variants are scored (COCO mAP on the labelled
  ``--parity-split`` images after the first 16, as ``PRECISION=auto`` does on the CPU) against eager fp32
  on the GPU; a variant more than ``GATE_TOLERANCE`` below it is refused. Random-weight models have no
  mAP: their variants are compared by the parity gate instead (:mod:`serve_demo.archive.parity`);
* **served**: TorchServe (the shipped config, one worker per GPU) running the fastest variant that
  passed, at concurrency 1/2/4/8, against the in-process figure.

Writes ``--out/<model>/bench-gpu.md`` and ``bench-gpu.json``. On a machine without CUDA it says so
and exits 2. Expected output on one H100 (``make bench DEVICE=cuda BENCH_MODELS=demo,trained``; the
figures are what to compare, the shape is what this prints):

    # GPU benchmark: fasterrcnn_mobilenet_v3_large_320_fpn (trained weights)
    NVIDIA H100 80GB HBM3, torch 2.14.1, onnxruntime 1.2x (providers: TensorrtExecutionProvider, ...)
    | variant | images/s | p50 / p95 ms | mAP (valid, 100 images) | gate |
    | eager fp32 | ... | ... | 0.6xxx | reference |
    | eager fp16 | ... | ... | 0.6xxx | pass (-0.000x) |
    | onnxruntime CUDA | ... | ... | 0.6xxx | pass (-0.0000) |
    | onnxruntime TensorRT | ... | ... | 0.6xxx | pass |
    | onnxruntime TensorRT fp16 | ... | ... | 0.6xxx | pass or refused, with the drop |
    served (TorchServe, the fastest passing variant): c=1 p50 ... ms; c=1/2/4/8 .../.../.../... images/s
    ratio served best / eager fp32 in-process: ...

A variant that cannot run (no onnxruntime-gpu, no TensorRT libraries) is listed with the reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import queue
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from serve_demo.core import defaults
from serve_demo.core.runtime import ORT_GPU_ENV

from .runner import (
    MODELS,
    BenchModel,
    Timing,
    best,
    load_images,
    measure_server,
    multipart_sender,
    ours_archive,
    start_torchserve,
    stats,
    workspace,
)

log = logging.getLogger(__name__)

GATE_SKIP = 16  # as PRECISION=auto: the first validation images are int8 calibration's on the CPU
GATE_IMAGES = 100


@dataclass(frozen=True)
class Variant:
    """One way to run a model on the GPU: which archive, and the ONNX Runtime provider choice."""

    label: str
    archive: str  # eager | fp16 | onnxruntime
    ort_gpu: str = ""  # cuda | tensorrt | tensorrt-fp16 (onnxruntime archives only)


VARIANTS = (
    Variant("eager fp32", "eager"),
    Variant("eager fp16", "fp16"),
    Variant("onnxruntime CUDA", "onnxruntime", "cuda"),
    Variant("onnxruntime TensorRT", "onnxruntime", "tensorrt"),
    Variant("onnxruntime TensorRT fp16", "onnxruntime", "tensorrt-fp16"),
)


@dataclass
class VariantResult:
    label: str
    throughput_rps: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    maps: dict[str, float] = field(default_factory=dict)
    parity: str = ""  # random weights: the parity gate's summary against eager fp32 on the GPU
    gate: str = ""
    passed: bool = False
    error: str = ""


def _variant_worker(mar: str, ort_gpu: str, images: list[bytes], gate: tuple[str, str, dict] | None,
                    results, device: str = "cuda:0") -> None:
    """In a fresh process: load on ``device``, warm up on every image, time them, score the gate set."""

    from serve_demo.archive import precision
    from serve_demo.core.pipeline import run_detector
    from serve_demo.core.schema import dumps
    from serve_demo.core.worker import Worker

    logging.disable(logging.WARNING)
    if ort_gpu:
        os.environ[ORT_GPU_ENV] = ort_gpu
    try:
        worker = Worker.from_archive(mar, device=device)
        for data in images:  # TensorRT: one engine per padded shape, built on first sight
            worker.predict(data, defaults.THRESHOLD, "stock")
        latencies = []
        for data in images:
            t0 = time.perf_counter()
            dumps(worker.predict(data, defaults.THRESHOLD, "stock"))
            latencies.append(time.perf_counter() - t0)
        out: dict[str, Any] = {"throughput_rps": round(len(latencies) / sum(latencies), 2), **stats(latencies)}
        if gate is not None:
            root, split, labels = gate
            data = precision.gate_set(root, split, {int(k): v for k, v in labels.items()}, GATE_SKIP, GATE_IMAGES)
            if data is not None:
                outputs = [run_detector(worker.model, [im], worker.device, worker.cfg.fp16)[0] for im in data.images]
                out["outputs"] = [{k: v.cpu() for k, v in o.items() if k in ("boxes", "scores", "labels")}
                                  for o in outputs]
                out["maps"] = precision.maps_of(outputs, data)
        results.put(out)
    except Exception as exc:  # noqa: BLE001 - reported as the variant's reason, the others go on
        results.put({"error": f"{type(exc).__name__}: {str(exc)[:300]}"})


def run_variant(mar: Path, variant: Variant, images: list[bytes], gate: tuple[str, str, dict] | None) -> dict:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_variant_worker, args=(str(mar), variant.ort_gpu, images, gate, results))
    proc.start()
    try:
        while True:
            try:
                return results.get(timeout=5)
            except queue.Empty:
                if proc.exitcode is not None:  # died without answering (a crash in a provider, say)
                    return {"error": f"the measurement process exited with {proc.exitcode}"}
    finally:
        proc.join(60)


def bench_model_gpu(model: BenchModel, args: argparse.Namespace) -> dict[str, Any]:
    """Every GPU measurement of one model; written to ``--out/<key>/bench-gpu.{md,json}``."""
    import torch

    from serve_demo.archive import parity
    from serve_demo.core.loader import read_label_map

    ws = workspace(model, args, "-gpu")
    out, work, store, build, labels, weights = ws.out, ws.work, ws.store, ws.build, ws.labels, ws.weights
    images = load_images(Path(args.dataset), args.split, args.images or model.images * 2)
    mars = {"eager": ours_archive(weights, labels, model.arch, store, build, "eager", "eager",
                                  Path(args.dataset), args.parity_split)[0],
            "fp16": ours_archive(weights, labels, model.arch, store, build, "fp16", "eager",
                                 Path(args.dataset), args.parity_split, fp16=True)[0],
            "onnxruntime": ours_archive(weights, labels, model.arch, store, build, "onnxruntime", "onnxruntime",
                                        Path(args.dataset), args.parity_split)[0]}
    names = {str(k): v for k, v in read_label_map(labels).items()}
    gate = (str(args.dataset), args.parity_split, names)
    results: list[VariantResult] = []
    raw: dict[str, dict] = {}
    for variant in VARIANTS:
        log.info("%s: %s", model.title, variant.label)
        got = run_variant(mars[variant.archive], variant, images, gate)
        raw[variant.label] = got
        r = VariantResult(variant.label, **{k: got[k] for k in ("throughput_rps", "p50_ms", "p95_ms") if k in got},
                          maps=got.get("maps", {}), error=got.get("error", ""))
        results.append(r)
    reference = results[0]
    ref_out = raw[reference.label].get("outputs")
    for r in results:
        if r.error:
            r.gate = f"did not run: {r.error}"
            continue
        if r is reference:
            r.gate, r.passed = "reference", True
        elif model.trained and reference.maps:
            drop = max(reference.maps[t] - r.maps.get(t, 0.0) for t in reference.maps)
            r.passed = drop <= defaults.GATE_TOLERANCE
            r.gate = f"{'pass' if r.passed else 'refused'} ({-drop:+.4f} mAP; tolerance {defaults.GATE_TOLERANCE})"
        elif ref_out and raw[r.label].get("outputs"):
            report = parity.compare_answers(parity.Answers(ref_out), parity.Answers(raw[r.label]["outputs"]))
            r.passed, r.parity = report.passed, report.summary()
            r.gate = "parity pass" if report.passed else f"parity refused: {report.summary()}"
    if not any(r.passed for r in results):
        raise SystemExit(f"{model.title}: no variant ran on the GPU ({reference.label}: {reference.error}); "
                         "check the driver with nvidia-smi and torch.cuda.is_available()")
    fastest = max((r for r in results if r.passed), key=lambda r: r.throughput_rps)
    variant = next(v for v in VARIANTS if v.label == fastest.label)
    ts = start_torchserve(work / "home", store, f"{variant.archive}-1.0.mar",
                          environment={ORT_GPU_ENV: variant.ort_gpu} if variant.ort_gpu else None)
    try:
        send = multipart_sender(f"{ts.inference_url}/predictions/{variant.archive}", ts.auth("inference"))
        served = measure_server(send, images, len(images), len(images) * 2,
                                Timing(args.warmup_seconds, args.phase_seconds))
    finally:
        ts.stop()
    for v in served.values():
        v.pop("latencies", None)
    providers = _providers()
    result = {"model": model.title, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "onnxruntime_providers": providers, "images": len(images), "variants": [asdict(r) for r in results],
              "served": {"variant": fastest.label, **served},
              "ratio_served_best_over_eager_fp32": round(best(served) / reference.throughput_rps, 2)
              if reference.throughput_rps else None, "date": time.strftime("%Y-%m-%d %H:%M")}
    (out / "bench-gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# GPU benchmark: {model.title}", "",
             f"{result['device']}, torch {result['torch']}, onnxruntime providers: {', '.join(providers)}; "
             f"{len(images)} images ({args.dataset} {args.split}); {result['date']}", "",
             f"| variant | images/s | p50 / p95 ms | mAP ({args.parity_split}) | gate |", "|---|---|---|---|---|"]
    for r in results:
        maps = ", ".join(f"{k} {v:.4f}" for k, v in r.maps.items()) or "-"
        lines.append(f"| {r.label} | {r.throughput_rps} | {r.p50_ms} / {r.p95_ms} | {maps} | {r.gate} |")
    lines += ["", f"served (TorchServe, {fastest.label}): c=1 p50 {served['c1']['p50_ms']} ms; c=1/2/4/8 "
              + "/".join(str(served[f"c{c}"]["throughput_rps"]) for c in (1, 2, 4, 8)) + " images/s",
              f"ratio served best / eager fp32 in-process: {result['ratio_served_best_over_eager_fp32']}", ""]
    (out / "bench-gpu.md").write_text("\n".join(lines))
    return result


def _providers() -> list[str]:
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except ImportError:
        return ["onnxruntime not installed"]


def main(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("--device cuda: no CUDA device here. Run make bench DEVICE=cuda on a machine with an NVIDIA GPU "
              "(pip install onnxruntime-gpu for the ONNX Runtime variants); serve_demo/bench/gpu.py says what it "
              "measures and what to expect", flush=True)
        return 2
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        print(f"unknown --models {unknown}: choose from {sorted(MODELS)}")
        return 2
    for k in keys:
        bench_model_gpu(MODELS[k], args)
        print((Path(args.out) / k / "bench-gpu.md").read_text())
    return 0
