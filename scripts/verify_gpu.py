#!/usr/bin/env python3
"""GPU check for a person with CUDA: the handler's GPU path gives the CPU path's detections.

Run on a machine with an NVIDIA GPU, after `make setup` and `make demo` (so that
model-store/shapes-1.0.mar exists):

    .venv/bin/python scripts/verify_gpu.py [--mar model-store/shapes-1.0.mar] [--images 20]

It loads the archive in-process twice (CPU and CUDA; CUDA also with fp16 autocast, the
`handler.fp16: true` option), runs the same synthetic images through serve_demo.core.pipeline (the code
the TorchServe worker runs) and compares. Expected output on a working GPU machine:

    cuda: NVIDIA ... (torch 2.14.1)
    fp32 cuda vs cpu: 20 images, max box diff 0.00xx px, max score diff 0.000x, labels equal: True
    fp16 cuda vs cpu: 20 images, matched 9x.x % of NN detections above 0.5
    latency per image: cpu xx ms, cuda fp32 x ms, cuda fp16 x ms
    gpu_decode: 20 JPEGs decoded by nvjpeg, mean pixel diff vs Pillow 0.xx, matched 9x.x % of NN detections
    channels_last: max box diff 0.0xxx px, labels equal: True
    pin_memory: outputs equal: True
    PASS

It prints FAIL (exit 1) if fp32 (or channels_last) boxes differ by more than 0.1 px, pinned
uploads change an output, or fp16 / nvjpeg decoding match fewer than 95 % of the CPU detections
above 0.5 (nvjpeg's IDCT rounds differently from libjpeg: pixels differ by about one level).
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

from serve_demo.core.pipeline import run_detector  # noqa: E402
from serve_demo.core.worker import Worker  # noqa: E402
from serve_demo.data.synth import SynthConfig, render_image  # noqa: E402


def match_rate(ref: list[dict], other: list[dict]) -> tuple[float, int]:
    """Share of reference detections above 0.5 found again (same label, IoU > 0.9)."""
    from torchvision.ops import box_iou

    matched = total = 0
    for a, b in zip(ref, other):
        keep_a, keep_b = a["scores"] > 0.5, b["scores"] > 0.5
        total += int(keep_a.sum())
        if keep_a.any() and keep_b.any():
            iou = box_iou(a["boxes"][keep_a], b["boxes"][keep_b])
            same = a["labels"][keep_a][:, None] == b["labels"][keep_b][None, :]
            matched += int(((iou > 0.9) & same).any(1).sum())
    return 100.0 * matched / max(1, total), total


def box_shift(a: dict, b: dict) -> float:
    """Largest box coordinate change between two outputs (inf when the detection counts differ)."""
    if a["boxes"].shape != b["boxes"].shape:
        return float("inf")
    return (a["boxes"] - b["boxes"]).abs().max().item() if len(a["boxes"]) else 0.0


def check_handler_options(mar: Path, images: list[torch.Tensor], ref: list[dict], cuda: torch.device) -> bool:
    """``handler.gpu_decode``, ``channels_last`` and ``pin_memory`` against the CPU reference."""
    import io

    from PIL import Image

    from serve_demo.core.imaging import decode_image, decode_image_on

    model = Worker.from_archive(mar).model.to(cuda)
    jpegs = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    on_gpu = [decode_image_on(j, cuda, gpu_decode=True) for j in jpegs]
    on_cpu = [decode_image(j) for j in jpegs]
    decoded_on_gpu = sum(t.device.type == "cuda" for t in on_gpu)
    pixel = sum((g.cpu().float() - c.float()).abs().mean().item() for g, c in zip(on_gpu, on_cpu)) / len(jpegs)
    cpu_ref = [run_detector(Worker.from_archive(mar).model, [c], torch.device("cpu"))[0] for c in on_cpu]
    gpu_out = [run_detector(model, [g], cuda)[0] for g in on_gpu]
    rate, total = match_rate(cpu_ref, gpu_out)
    print(f"gpu_decode: {decoded_on_gpu} of {len(jpegs)} JPEGs decoded by nvjpeg, mean pixel diff vs Pillow "
          f"{pixel:.2f}, matched {rate:.1f} % of {total} detections")
    nhwc = model.to(memory_format=torch.channels_last)
    last = [run_detector(nhwc, [im], cuda)[0] for im in images]
    diff = max(box_shift(a, b) for a, b in zip(ref, last))
    same_labels = all(torch.equal(a["labels"], b["labels"]) for a, b in zip(ref, last))
    print(f"channels_last: max box diff {diff:.4f} px, labels equal: {same_labels}")
    model = Worker.from_archive(mar).model.to(cuda)
    plain = [run_detector(model, [im], cuda)[0] for im in images]
    pinned = [run_detector(model, [im], cuda, pin_memory=True)[0] for im in images]
    equal = all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(plain, pinned))
    print(f"pin_memory: outputs equal: {equal}")
    return decoded_on_gpu == len(jpegs) and rate >= 95.0 and diff <= 0.1 and same_labels and equal


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
    am = Worker.from_archive(args.mar)
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    gpu_model = Worker.from_archive(args.mar).model.to(cuda)

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
    rate, total = match_rate(ref, fp16)
    print(f"fp16 cuda vs cpu: {len(images)} images, matched {rate:.1f} % of {total} detections above 0.5")
    print(f"latency per image: cpu {t_cpu:.1f} ms, cuda fp32 {t32:.1f} ms, cuda fp16 {t16:.1f} ms")
    ok = box_diff <= 0.1 and labels_equal and rate >= 95.0
    ok = check_handler_options(Path(args.mar), images, ref, cuda) and ok
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
