"""Tracks against the truth: MOTA, IDF1 and identity switches (``motmetrics``), and line counts.

``serve_demo track-score NAME.jsonl CLIP.truth.json`` scores what ``serve_demo stream`` wrote for a clip
whose truth is known (``serve_demo clip`` writes one). Only the frames the stream processed are scored
(a live source drops frames); a detection without a ``track_id`` is a track of its own. Matching is by
box IoU of at least ``IOU``, as in the MOTChallenge.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

IOU = 0.5


def iou_distances(truth: list, found: list, iou: float) -> np.ndarray:
    """``1 - IoU`` between every truth and found box (x1, y1, x2, y2); NaN (no match) below ``iou``.

    What ``motmetrics.distances.iou_matrix`` computes; its 1.4.0 calls ``np.asfarray``, gone in NumPy 2.
    """
    import numpy as np

    a = np.asarray(truth, dtype=float).reshape(-1, 4)[:, None, :]
    b = np.asarray(found, dtype=float).reshape(-1, 4)[None, :, :]
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    union = area_a + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) - inter
    dist = 1 - inter / np.maximum(union, 1e-9)
    dist[dist > 1 - iou] = np.nan
    return dist


def score(rows: list[dict], truth: dict, iou: float = IOU) -> dict:
    """``{"frames", "mota", "idf1", "switches", "precision", "recall", "tracks", "objects", "line_counts",
    "line_truth"}`` for the stream's JSON lines ``rows`` against a clip's ``truth``."""
    import motmetrics as mm

    frames = {f["frame"]: f["objects"] for f in truth["frames"]}
    acc = mm.MOTAccumulator(auto_id=False)
    untracked = 10**9
    scored = 0
    for row in rows:
        if row["frame"] not in frames:
            continue
        gt = frames[row["frame"]]
        hyp_ids = []
        for d in row["detections"]:
            if d.get("track_id") is None:
                untracked += 1
            hyp_ids.append(d["track_id"] if d.get("track_id") is not None else untracked)
        dist = iou_distances([o["box"] for o in gt], [d["box"] for d in row["detections"]], iou)
        acc.update([o["id"] for o in gt], hyp_ids, dist, frameid=row["frame"])
        scored += 1
    if not scored:
        raise ValueError("no processed frame is in the truth: is this the clip the truth was written for?")
    mh = mm.metrics.create()
    s = mh.compute(acc, metrics=["mota", "idf1", "num_switches", "precision", "recall", "num_unique_objects",
                                 "mostly_tracked"], name="stream")
    last = rows[-1].get("counts", {}).get("lines", {})
    counts = {name: {"in": c["in"], "out": c["out"]} for name, c in last.items()}
    tracks = {d["track_id"] for r in rows for d in r["detections"] if d.get("track_id") is not None}
    return {"frames": scored, "mota": round(float(s["mota"].iloc[0]), 4), "idf1": round(float(s["idf1"].iloc[0]), 4),
            "switches": int(s["num_switches"].iloc[0]), "precision": round(float(s["precision"].iloc[0]), 4),
            "recall": round(float(s["recall"].iloc[0]), 4), "objects": int(s["num_unique_objects"].iloc[0]),
            "mostly_tracked": int(s["mostly_tracked"].iloc[0]), "tracks": len(tracks), "line_counts": counts,
            "line_truth": truth.get("line_counts")}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("jsonl", type=Path, help="what serve_demo stream wrote for the clip (DIR/NAME.jsonl)")
    p.add_argument("truth", type=Path, help="the clip's truth (CLIP.truth.json, written by serve_demo clip)")
    p.add_argument("--iou", type=float, default=IOU, help=f"IoU for a match (default {IOU})")


def main(args: argparse.Namespace) -> int:
    try:
        result = score(read_rows(args.jsonl), json.loads(args.truth.read_text()), args.iou)
    except (OSError, ValueError, KeyError) as exc:
        print(f"track-score: {exc}", file=sys.stderr)
        return 2
    lines = "  ".join(f"{n}: in {c['in']} out {c['out']}" for n, c in result["line_counts"].items())
    print(f"{args.jsonl}: {result['frames']} frames, MOTA {result['mota']:.3f}, IDF1 {result['idf1']:.3f}, "
          f"{result['switches']} ID switches, precision {result['precision']:.3f}, recall {result['recall']:.3f}, "
          f"{result['tracks']} tracks for {result['objects']} objects"
          + (f"; line {lines} (truth: in {result['line_truth']['in']} out {result['line_truth']['out']})"
             if result["line_counts"] and result["line_truth"] else ""))
    print(json.dumps(result))
    return 0
