"""Where one request's time goes in the worker: decode, model, JSON (in-process, same threads).

    .venv/bin/python scripts/profile_request.py [--mar model-store/shapes-1.0.mar] [--images 40]

Also times the alternatives `make bench`'s notes discuss: torchvision.io.decode_image instead of
Pillow, and a TorchScript (torch.jit.script) model instead of eager, checking that TorchScript
gives the same detections. Prints medians in ms. (docs/performance.md has the figures.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve_demo.bench.runner import load_images  # noqa: E402
from serve_demo.core.imaging import decode_image  # noqa: E402
from serve_demo.core.pipeline import Request, format_output, run_detector  # noqa: E402
from serve_demo.core.schema import dumps  # noqa: E402
from serve_demo.core.worker import Worker  # noqa: E402


def med(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1000, 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mar", default="model-store/shapes-1.0.mar")
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    images = load_images(Path("data/shapes"), "test", args.images)
    am = Worker.from_archive(args.mar)
    model = am.model
    t_dec, t_tv, t_model, t_json, t_script = [], [], [], [], []
    decoded = []
    for data in images:  # warm-up
        run_detector(model, [decode_image(data)], am.device)
    for data in images:
        t0 = time.perf_counter()
        img = decode_image(data)
        t1 = time.perf_counter()
        out = run_detector(model, [img], am.device)[0]
        t2 = time.perf_counter()
        dumps(format_output(out, Request(img, 0.5, "stock"), am.names, am.name, am.version))
        t3 = time.perf_counter()
        import torchvision.io as tvio

        tvio.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=tvio.ImageReadMode.RGB)
        t4 = time.perf_counter()
        t_dec.append(t1 - t0), t_model.append(t2 - t1), t_json.append(t3 - t2), t_tv.append(t4 - t3)
        decoded.append((img, out))
    print(f"decode (Pillow, EXIF, checks) {med(t_dec)} ms | torchvision.io.decode_image {med(t_tv)} ms | "
          f"model {med(t_model)} ms | format + JSON {med(t_json)} ms")
    try:
        scripted = torch.jit.script(model)
        with torch.inference_mode():
            for img, _ in decoded[:4]:
                scripted([img.float() / 255])
        differ = 0
        for img, out in decoded:
            t0 = time.perf_counter()
            with torch.inference_mode():
                res = scripted([img.float() / 255])
            t_script.append(time.perf_counter() - t0)
            dets = res[1][0] if isinstance(res, tuple) else res[0]
            keep = dets["scores"] >= 0.5  # what a client sees at the serving threshold
            ref = out["scores"] >= 0.5
            same = bool(keep.sum() == ref.sum()) and bool(
                torch.allclose(dets["boxes"][keep], out["boxes"][ref], atol=1e-2))
            differ += not (same and torch.equal(dets["labels"][keep], out["labels"][ref]))
        print(f"TorchScript model {med(t_script)} ms vs eager {med(t_model)} ms; detections at threshold 0.5 differ "
              f"on {differ} of {len(decoded)} images")
    except Exception as exc:  # noqa: BLE001 - report, do not fail the profile
        print(f"TorchScript: not scriptable here ({type(exc).__name__}: {str(exc)[:200]})")
    if args.compile:
        time_compiled(model, decoded)
    return 0


def time_compiled(model, decoded) -> None:
    """torch.compile (inductor, dynamic shapes) of the model: compile time, forward time, same answers."""
    t0 = time.perf_counter()
    compiled = torch.compile(model, dynamic=True)
    with torch.inference_mode():
        for img, _ in decoded[:4]:
            compiled([img.float() / 255])
    warm = time.perf_counter() - t0
    times, differ = [], 0
    with torch.inference_mode():
        for img, out in decoded:
            t = time.perf_counter()
            res = compiled([img.float() / 255])[0]
            times.append(time.perf_counter() - t)
            keep, ref = res["scores"] >= 0.5, out["scores"] >= 0.5
            same = bool(keep.sum() == ref.sum()) and bool(
                torch.allclose(res["boxes"][keep], out["boxes"][ref], atol=1e-2))
            differ += not (same and torch.equal(res["labels"][keep], out["labels"][ref]))
    print(f"torch.compile: first 4 images (compiling) {warm:.0f} s; model {med(times)} ms; detections at "
          f"threshold 0.5 differ on {differ} of {len(decoded)} images")


if __name__ == "__main__":
    sys.exit(main())
