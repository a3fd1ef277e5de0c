#!/usr/bin/env python3
"""GPU check for a person with CUDA: the handler's GPU path gives the CPU path's detections.

Run on a machine with an NVIDIA GPU, after `make setup` and `make demo` (so that
model-store/shapes-1.0.mar exists):

    .venv/bin/python scripts/verify_gpu.py [--mar model-store/shapes-1.0.mar] [--images 20]

It loads the archive in-process twice (CPU and CUDA; CUDA also with fp16 autocast, the
`handler.fp16: true` option), runs the same synthetic images through serve_demo.serving (the code
the TorchServe worker runs) and compares. Expected output on a working GPU machine:

    cuda: NVIDIA ... (torch 2.14.1)
    fp32 cuda vs cpu: 20 images, max box diff 0.00xx px, max score diff 0.000x, labels equal: True
    fp16 cuda vs cpu: 20 images, matched 9x.x % of NN detections above 0.5
    latency per image: cpu xx ms, cuda fp32 x ms, cuda fp16 x ms
    PASS

It prints FAIL (exit 1) if fp32 boxes differ by more than 0.1 px or fp16 matches fewer than 95 %
of the CPU detections above 0.5.
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

from serve_demo.evaluate import ArchiveModel  # noqa: E402
from serve_demo.serving import run_detector  # noqa: E402
from serve_demo.synth import SynthConfig, render_image  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mar", default="model-store/shapes-1.0.mar")
    p.add_argument("--images", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("FAIL: CUDA is not available on this machine")
        return 1
    print(f"cuda: {torch.cuda.get_device_name(0)} (torch {torch.__version__})")
    rng = np.random.default_rng(123)
    images = [pil_to_tensor(render_image(rng, SynthConfig())[0]) for _ in range(args.images)]
    am = ArchiveModel(Path(args.mar))
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    gpu_model = ArchiveModel(Path(args.mar)).model.to(cuda)

    def timed(model, device, fp16):
        outs, t0 = [], time.perf_counter()
        for im in images:
            outs += run_detector(model, [im], device, fp16)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return outs, (time.perf_counter() - t0) / len(images) * 1000

    run_detector(gpu_model, images[:2], cuda)  # warm-up
    ref, t_cpu = timed(am.model, cpu, False)
    fp32, t32 = timed(gpu_model, cuda, False)
    fp16, t16 = timed(gpu_model, cuda, True)
    box_diff = max((a["boxes"] - b["boxes"]).abs().max().item() if len(a["boxes"]) else 0.0
                   for a, b in zip(ref, fp32))
    score_diff = max((a["scores"] - b["scores"]).abs().max().item() if len(a["scores"]) else 0.0
                     for a, b in zip(ref, fp32))
    labels_equal = all(torch.equal(a["labels"], b["labels"]) for a, b in zip(ref, fp32))
    print(f"fp32 cuda vs cpu: {len(images)} images, max box diff {box_diff:.4f} px, "
          f"max score diff {score_diff:.4f}, labels equal: {labels_equal}")
    from torchvision.ops import box_iou

    matched = total = 0
    for a, b in zip(ref, fp16):
        keep_a, keep_b = a["scores"] > 0.5, b["scores"] > 0.5
        total += int(keep_a.sum())
        if keep_a.any() and keep_b.any():
            iou = box_iou(a["boxes"][keep_a], b["boxes"][keep_b])
            same = a["labels"][keep_a][:, None] == b["labels"][keep_b][None, :]
            matched += int(((iou > 0.9) & same).any(1).sum())
    rate = 100.0 * matched / max(1, total)
    print(f"fp16 cuda vs cpu: {len(images)} images, matched {rate:.1f} % of {total} detections above 0.5")
    print(f"latency per image: cpu {t_cpu:.1f} ms, cuda fp32 {t32:.1f} ms, cuda fp16 {t16:.1f} ms")
    ok = box_diff <= 0.1 and labels_equal and rate >= 95.0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
