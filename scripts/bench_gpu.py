"""GPU benchmark of the options the handler could use, for a person with an NVIDIA GPU.

    make archive && .venv/bin/python scripts/bench_gpu.py [--mar model-store/shapes-1.0.mar] [--images 100]

On the archive's model and the first N test images (mixed sizes), per image, medians in ms:

* decode: Pillow on the CPU (what the handler does) vs ``torchvision.io.decode_jpeg(device="cuda")``
  (nvjpeg), the latter including the upload of the compressed bytes;
* host-to-device copy of the decoded image: pageable vs pinned memory;
* model forward: fp32, fp16 autocast (``handler.fp16``), fp32 + ``channels_last``, and fp16 +
  ``channels_last``; batch of 1 and batch of 8 (images/s);
* for each variant, how many images' detections at threshold 0.5 differ from fp32 (label
  count, or a box moving more than 2 px): a variant is only worth adopting at 0.

Expected output shape (figures depend on the GPU; an H100 runs this model in a few ms):

    device: NVIDIA <name>, torch 2.x, 100 images
    decode  PIL (CPU) 1.6 ms | nvjpeg 0.4 ms
    copy    pageable 0.10 ms | pinned 0.05 ms
    model   variant             batch1 ms   batch8 img/s   differing images
            fp32                  ...          ...            0
            fp16                  ...          ...            <small>
            fp32 channels_last    ...          ...            0
            fp16 channels_last    ...          ...            <small>

On a machine without CUDA it says so and exits 2.
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
from serve_demo.core.worker import Worker  # noqa: E402


def timed(fn, sync: bool = True) -> float:
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.2f}"


def differs(a: dict, b: dict) -> bool:
    ka, kb = a["scores"] >= 0.5, b["scores"] >= 0.5
    if int(ka.sum()) != int(kb.sum()):
        return True
    return not (torch.equal(a["labels"][ka].cpu(), b["labels"][kb].cpu())
                and torch.allclose(a["boxes"][ka].float().cpu(), b["boxes"][kb].float().cpu(), atol=2.0))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mar", default="model-store/shapes-1.0.mar")
    p.add_argument("--images", type=int, default=100)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine (see the docstring for what it measures)")
        return 2
    import torchvision.io as tvio

    dev = torch.device("cuda:0")
    datas = load_images(Path("data/shapes"), "test", args.images)
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {len(datas)} images")

    pil, nvj = [], []
    for data in datas:
        pil.append(timed(lambda d=data: decode_image(d), sync=False))
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        nvj.append(timed(lambda r=raw: tvio.decode_jpeg(r, device=dev)))
    print(f"decode  PIL (CPU) {ms(pil)} ms | nvjpeg {ms(nvj)} ms")

    images = [decode_image(d) for d in datas]
    pageable = [timed(lambda im=im: im.to(dev)) for im in images]
    pinned_imgs = [im.pin_memory() for im in images]
    pinned = [timed(lambda im=im: im.to(dev, non_blocking=True)) for im in pinned_imgs]
    print(f"copy    pageable {ms(pageable)} ms | pinned {ms(pinned)} ms")

    model = Worker.from_archive(args.mar).model.to(dev).eval()
    gpu_images = [im.to(dev).float().div_(255) for im in images]

    def run(batch: list[torch.Tensor], fp16: bool) -> list[dict]:
        with torch.inference_mode():
            if fp16:
                with torch.autocast("cuda", dtype=torch.float16):
                    return model(batch)
            return model(batch)

    print("model   variant             batch1 ms   batch8 img/s   differing images")
    reference = None
    for name, fp16, channels_last in (("fp32", False, False), ("fp16", True, False),
                                      ("fp32 channels_last", False, True), ("fp16 channels_last", True, True)):
        model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for im in gpu_images[:5]:
            run([im], fp16)
        outs, one = [], []
        for im in gpu_images:
            holder = {}
            one.append(timed(lambda im=im, h=holder, f=fp16: h.setdefault("o", run([im], f)[0])))
            outs.append(holder["o"])
        batches = [gpu_images[i:i + 8] for i in range(0, len(gpu_images) - 7, 8)]
        total = sum(timed(lambda b=b, f=fp16: run(b, f)) for b in batches)
        rate = len(batches) * 8 / total if total else 0.0
        reference = reference or outs
        diff = sum(differs(a, b) for a, b in zip(outs, reference))
        print(f"        {name:<20}{ms(one):>9}   {rate:>12.1f}   {diff:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
