#!/usr/bin/env python3
"""How fast the handler turns Mask R-CNN output into RLE, against pycocotools' C encoder.

    .venv/bin/python scripts/bench_masks.py [--masks 20] [--size 640x480] [--repeat 20]

Per answer of N masks (object-sized blobs on a W x H image, probabilities as the model gives
them), medians in ms: thresholding the ``N x 1 x H x W`` probabilities, our numpy encoder
(``serve_demo.core.masks``, what the worker runs), pycocotools' ``mask.encode`` on the same binary
masks (C, needs a Fortran-ordered copy), and a pixel-by-pixel pure-Python encoder for scale.
Every encoder's strings are checked equal to pycocotools'. Prints ratios, not only times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve_demo.core import masks  # noqa: E402


def blobs(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """``n x 1 x h x w`` mask probabilities: soft ellipses of 20-200 px."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((n, 1, h, w), dtype=np.float32)
    for i in range(n):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(10, 100, 2)
        d = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
        out[i, 0] = np.clip(1.5 - d, 0, 1)
    return torch.from_numpy(out)


def python_rle(mask: np.ndarray) -> list[int]:
    """The naive way: walk every pixel in column-major order."""
    runs, current, count = [], 0, 0
    for v in mask.T.reshape(-1).tolist():
        if v != current:
            runs.append(count)
            current, count = v, 0
        count += 1
    runs.append(count)
    return runs


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--masks", type=int, default=20, help="masks per answer")
    p.add_argument("--size", default="640x480", help="image W x H")
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    from pycocotools import mask as coco_mask

    w, h = (int(v) for v in args.size.lower().split("x"))
    probs = blobs(args.masks, h, w)
    binary = masks.binarize(probs, 0.5).numpy()
    ours = masks.encode_all(probs, 0.5)
    ref = coco_mask.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
    assert [r["counts"] for r in ours] == [r["counts"].decode() for r in ref], "encoders disagree"
    assert masks.compress_counts(python_rle(binary[0])) == ours[0]["counts"]

    t_thr = median_ms(lambda: masks.binarize(probs, 0.5).numpy(), args.repeat)
    t_ours = median_ms(lambda: [masks.encode(m) for m in binary], args.repeat)
    t_coco = median_ms(lambda: coco_mask.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8))),
                       args.repeat)
    t_py = median_ms(lambda: [python_rle(m) for m in binary[:2]], max(3, args.repeat // 5)) * args.masks / 2
    print(f"{args.masks} masks of {w}x{h}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"median of {args.repeat}")
    print(f"threshold (N x 1 x H x W >= 0.5)  {t_thr:8.2f} ms")
    print(f"serve_demo.core.masks (numpy)          {t_ours:8.2f} ms  ({t_ours / args.masks:.3f} ms per mask)")
    print(f"pycocotools.mask.encode (C)       {t_coco:8.2f} ms  (ours / pycocotools {t_ours / t_coco:.2f})")
    print(f"pure Python, pixel by pixel       {t_py:8.2f} ms  (pure Python / ours {t_py / t_ours:.0f})")
    print("all encoders' strings identical: True")
    return 0


if __name__ == "__main__":
    sys.exit(main())
