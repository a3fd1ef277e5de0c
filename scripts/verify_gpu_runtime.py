#!/usr/bin/env python3
"""GPU check of the accelerated runtime, for a person with CUDA: an ONNX Runtime archive on the GPU
answers like the eager model on the CPU.

Run on a machine with an NVIDIA GPU after `make setup` and `pip install onnxruntime-gpu` (it replaces
the CPU wheel; same version as pyproject.toml pins), then:

    make archive RUNTIME=onnxruntime VERSION=ort       # model-store/shapes-ort.mar, parity-gated on CPU
    .venv/bin/python scripts/verify_gpu_runtime.py [--mar model-store/shapes-ort.mar] [--images 20]

It loads the archive three times in-process (eager on the CPU, ONNX Runtime on the CPU, ONNX Runtime
on CUDA: the TensorRT provider where onnxruntime-gpu has it, else CUDA), runs the same synthetic
images through serve_demo.core.pipeline (the worker's code) and applies the archive's parity gate
(serve_demo.archive.parity: boxes 0.5 px, scores 1e-3, same labels). Expected output on a working
GPU machine:

    cuda: NVIDIA ... (torch 2.14.1, onnxruntime 1.32.0, providers [TensorrtExecutionProvider, CUDA...])
    onnxruntime cpu vs eager cpu: 20 images, ... 0 unmatched, 0 label mismatches; ... PASS
    onnxruntime cuda vs eager cpu: 20 images, ... 0 unmatched, 0 label mismatches; ... PASS
    latency per image: eager cpu xx ms, onnxruntime cpu xx ms, onnxruntime cuda x ms
    PASS

TensorRT builds its engine on the first image of each new input shape (seconds, once); the script
warms up on every image first. FAIL (exit 1) when a gate fails or the CUDA session falls back to
the CPU provider. An OpenVINO archive on a CUDA worker runs on the CPU (the worker says so in its
log); fp16 of the exported parts is not offered: the handler's `fp16` option applies to eager parts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torchvision.transforms.functional import pil_to_tensor  # noqa: E402

from serve_demo.archive.parity import ParityReport, compare  # noqa: E402
from serve_demo.core.loader import open_archive  # noqa: E402
from serve_demo.core.pipeline import run_detector  # noqa: E402
from serve_demo.core.runtime import CompiledPart, OrtSession  # noqa: E402
from serve_demo.core.worker import Worker  # noqa: E402
from serve_demo.data.synth import SynthConfig, render_image  # noqa: E402


def gate(name: str, ref: list[dict], got: list[dict]) -> bool:
    report = ParityReport()
    for n, (a, b) in enumerate(zip(ref, got)):
        compare({k: v.cpu() for k, v in a.items()}, {k: v.cpu() for k, v in b.items()}, report, f"image {n}")
        report.images += 1
    print(f"{name}: {report.summary().split('; median')[0]} {'PASS' if report.passed else 'FAIL'}")
    return report.passed


def timed(model: torch.nn.Module, images: list[torch.Tensor], device: torch.device) -> tuple[list[dict], float]:
    for im in images:  # warm-up: TensorRT engines per input shape, cuDNN autotuning
        run_detector(model, [im], device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = [run_detector(model, [im], device)[0] for im in images]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) * 1000 / len(images)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mar", default="model-store/shapes-ort.mar")
    p.add_argument("--images", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine (the CPU path is covered by make test)")
        return 2
    import onnxruntime as ort

    providers = ort.get_available_providers()
    cuda = torch.device("cuda:0")
    print(f"cuda: {torch.cuda.get_device_name(0)} (torch {torch.__version__}, onnxruntime {ort.__version__}, "
          f"providers {providers})")
    if "CUDAExecutionProvider" not in providers:
        print("FAIL: this onnxruntime has no CUDA provider: pip install onnxruntime-gpu")
        return 1
    rng = np.random.default_rng(0)
    images = [pil_to_tensor(render_image(rng, SynthConfig())[0]) for _ in range(args.images)]

    eager = Worker.from_archive(args.mar, "cpu", threads=4)
    if eager.runtime.name != "onnxruntime":
        print(f"FAIL: {args.mar} runs {eager.runtime.label}: build it with make archive RUNTIME=onnxruntime")
        return 1
    ort_cpu = eager.model
    files = open_archive(args.mar)  # the eager reference: the same archive with its runtime section removed
    files.config.setdefault("handler", {}).pop("runtime", None)
    ref_model = Worker(files, "cpu", threads=4).model
    ref, t_ref = timed(ref_model, images, torch.device("cpu"))
    got_cpu, t_cpu = timed(ort_cpu, images, torch.device("cpu"))
    gpu = Worker.from_archive(args.mar, cuda)
    parts = [m for m in gpu.model.modules() if isinstance(m, CompiledPart)]
    used = {tuple(m.session.session.get_providers()) for m in parts if isinstance(m.session, OrtSession)}
    print(f"onnxruntime sessions on CUDA use {sorted(used)}")
    got_gpu, t_gpu = timed(gpu.model, images, cuda)
    ok = gate("onnxruntime cpu vs eager cpu", ref, got_cpu) & gate("onnxruntime cuda vs eager cpu", ref, got_gpu)
    if not parts or any(prov[0] == "CPUExecutionProvider" for prov in used):
        print("FAIL: the CUDA worker's sessions run on the CPU provider")
        ok = False
    print(f"latency per image: eager cpu {t_ref:.1f} ms, onnxruntime cpu {t_cpu:.1f} ms, "
          f"onnxruntime cuda {t_gpu:.1f} ms")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
