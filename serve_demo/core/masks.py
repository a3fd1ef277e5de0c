"""Instance masks as COCO run-length encoding (RLE), without pycocotools and without pixel lists.

COCO RLE runs over the mask in column-major (Fortran) order, starting with a run of zeros;
``counts`` is the compressed string form of the run lengths (6 bits per character, deltas
against the run two back from the third run on), exactly what ``pycocotools.mask.encode`` writes
and what COCO result files, CVAT, Label Studio and FiftyOne read.

The work is vectorised: run boundaries come from one ``numpy`` pass over the flattened mask; the
Python loop only visits runs (about the perimeter of the object), never pixels.
This module is imported inside TorchServe workers: it depends on numpy and torch only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

RLE = dict  # {"size": [h, w], "counts": str}


def run_lengths(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """Run lengths of a 2-D binary mask in column-major order, starting with zeros.

    Only the mask's bounding rectangle is scanned: each column of it, padded with a zero above
    and below, gives the rows where runs of ones start and end; their column-major positions in
    the full image are the run boundaries.
    """
    m = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H x W), got shape {tuple(m.shape)}")
    m = m.astype(bool, copy=False)
    h, w = m.shape
    cols = np.flatnonzero(m.any(axis=0))
    if cols.size == 0:
        return np.array([h * w], dtype=np.int64)
    rows = np.flatnonzero(m.any(axis=1))
    x0, x1, y0, y1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
    sub = np.zeros((x1 - x0, y1 - y0 + 2), dtype=np.int8)  # one column per row, zero-padded
    sub[:, 1:-1] = m[y0:y1, x0:x1].T
    col, row = np.nonzero(np.diff(sub, axis=1))  # column-major order: column, then row
    bounds = (col + x0).astype(np.int64) * h + y0 + row
    # a run ending at the bottom of a column and one starting at the top of the next are one run
    same = np.flatnonzero(bounds[1:-1] == bounds[2:]) + 1 if bounds.size > 2 else np.zeros(0, dtype=np.int64)
    if same.size:
        bounds = np.delete(bounds, np.concatenate((same, same + 1)))
    runs = np.diff(np.concatenate(([0], bounds, [h * w])))
    return runs[:-1] if runs[-1] == 0 else runs  # no empty run of zeros at the end


def compress_counts(runs: np.ndarray | list[int]) -> str:
    """pycocotools' compressed ``counts`` string for run lengths (``rleToString``), vectorised.

    Each run (from the third on, minus the run two before it) is written as 5-bit groups, least
    significant first, 0x20 marking "more follows", each group offset by 48 into printable ASCII.
    """
    x = np.asarray(runs, dtype=np.int64).copy()
    if x.size > 3:
        x[3:] -= np.asarray(runs, dtype=np.int64)[1:-2]
    groups = 13  # enough 5-bit groups for any 64-bit value
    shifts = 5 * np.arange(groups, dtype=np.int64)
    chunk = (x[:, None] >> shifts) & 0x1F
    rest = x[:, None] >> (shifts + 5)
    more = np.where(chunk & 0x10, rest != -1, rest != 0)
    # groups written per value: up to and including the first one without "more"
    n = np.argmin(more, axis=1) + 1
    keep = np.arange(groups) < n[:, None]
    chars = chunk + 48 + np.where(np.arange(groups) < (n - 1)[:, None], 0x20, 0)
    return chars[keep].astype(np.uint8).tobytes().decode("ascii")


def decompress_counts(counts: str) -> list[int]:
    """Run lengths from a compressed ``counts`` string (``rleFrString``)."""
    runs: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise ValueError("RLE counts string ends in the middle of a number")
            c = ord(counts[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def encode(mask: np.ndarray | torch.Tensor) -> RLE:
    """A 2-D binary mask as compressed COCO RLE ``{"size": [h, w], "counts": str}``."""
    h, w = (int(v) for v in mask.shape[-2:])
    return {"size": [h, w], "counts": compress_counts(run_lengths(mask))}


def decode(rle: RLE) -> np.ndarray:
    """A compressed or uncompressed COCO RLE back to an ``H x W`` uint8 mask."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    runs = decompress_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if sum(runs) != h * w:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels, the {w}x{h} mask has {h * w}")
    values = np.zeros(len(runs), dtype=np.uint8)
    values[1::2] = 1
    return np.repeat(values, runs).reshape(w, h).T.copy()


def area(rle: RLE) -> int:
    """Foreground pixels of an RLE (no decoding)."""
    counts = rle["counts"]
    runs = decompress_counts(counts) if isinstance(counts, str) else list(counts)
    return int(sum(runs[1::2]))


def binarize(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mask probabilities ``[N, 1, H, W]`` or ``[N, H, W]`` to a bool ``[N, H, W]`` tensor."""
    if probs.ndim == 4:
        probs = probs[:, 0]
    return probs >= threshold


def encode_all(probs: torch.Tensor, threshold: float) -> list[RLE]:
    """Every instance of a model's mask output, binarised at ``threshold``, as RLE."""
    binary = binarize(probs, threshold).cpu().numpy()
    return [encode(m) for m in binary]


def keypoint_triplets(points: torch.Tensor, scores: torch.Tensor | None) -> list[list[list[float]]]:
    """Keypoints ``[N, K, 3]`` (x, y, visibility) + scores ``[N, K]`` as ``[[[x, y, score], ...]]``."""
    xy = points[..., :2].float()
    s = scores.float() if scores is not None else points[..., 2].float()
    rows: Any = torch.cat((xy, s.unsqueeze(-1)), dim=-1)
    return [[[round(float(v), 3) for v in kp] for kp in inst] for inst in rows.tolist()]
