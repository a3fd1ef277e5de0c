"""``make collect``: the captured images (``handler.capture`` on) as a COCO dataset to label.

Reads ``CAPTURE/NAME-VERSION/predictions-*.jsonl`` (see :mod:`serve_demo.core.capture`), drops
entries past the retention or whose image is gone, keeps the least confident first (``--limit``),
and writes ``OUT/train`` and ``OUT/valid`` (a seeded split) with ``_annotations.coco.json``: the
model's predictions as pre-annotations (``"score"`` and ``"pre_annotation": true`` on each), ready
to import into a labelling tool (CVAT, Label Studio: COCO import). Once corrected, the folder is a
dataset ``make train DATASET=OUT`` reads.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

from serve_demo.core.capture import prune


def read_captures(root: Path, retention_days: float) -> tuple[list[dict], dict[str, str]]:
    """Entries of every model-version folder under ``root`` (newest label map wins), oldest first."""
    entries, labels = [], {}
    cutoff = time.time() - retention_days * 86400
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        prune(folder, retention_days)
        if (folder / "labels.json").is_file():
            labels.update(json.loads((folder / "labels.json").read_text()))
        for lines in sorted(folder.glob("predictions-*.jsonl")):
            for line in lines.read_text().splitlines():
                try:
                    e = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                image = folder / e.get("file", "")
                if e.get("time", 0) >= cutoff and image.is_file():
                    entries.append({**e, "path": image})
    entries.sort(key=lambda e: e["time"])
    return entries, labels


def write_split(out: Path, split: str, entries: list[dict], categories: list[dict]) -> int:
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, e in enumerate(entries, start=1):
        name = f"{e['model']}-{e['version']}-{Path(e['file']).name}"
        shutil.copy2(e["path"], folder / name)
        images.append({"id": i, "file_name": name, "width": e["width"], "height": e["height"],
                       "captured": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(e["time"])),
                       "model": e["model"], "version": e["version"], "uncertainty": e["uncertainty"]})
        for d in e["detections"]:
            x, y, w, h = d["bbox"]
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": d["category_id"],
                                "bbox": [x, y, w, h], "area": round(w * h, 2), "iscrowd": 0,
                                "score": d["score"], "pre_annotation": True})
    coco = {"info": {"description": "serve_demo capture: model predictions to correct, then train on",
                     "date_created": time.strftime("%Y-%m-%dT%H:%M:%S")},
            "images": images, "annotations": annotations, "categories": categories}
    (folder / "_annotations.coco.json").write_text(json.dumps(coco, indent=1) + "\n")
    return len(images)


def collect(capture: Path, out: Path, limit: int | None = None, valid_share: float = 0.2, seed: int = 0,
            retention_days: float = 7.0) -> dict[str, int]:
    """Gather the captures into ``out``; returns image counts per split.

    Raises:
        FileNotFoundError: nothing captured (capture is off, or nothing was uncertain yet).
    """
    entries, labels = read_captures(capture, retention_days)
    if not entries:
        raise FileNotFoundError(f"no captured images under {capture}: turn capture on in the archive "
                                "(make archive CAPTURE=0.1) and serve some traffic")
    entries.sort(key=lambda e: -e["uncertainty"])  # least confident first
    entries = entries[:limit] if limit else entries
    categories = [{"id": int(k), "name": v, "supercategory": "none"} for k, v in sorted(labels.items(),
                                                                                     key=lambda kv: int(kv[0]))
                  if int(k) > 0]
    random.Random(seed).shuffle(entries)
    n_valid = max(1, round(len(entries) * valid_share)) if len(entries) > 1 else 0
    counts = {"train": write_split(out, "train", entries[n_valid:], categories),
              "valid": write_split(out, "valid", entries[:n_valid], categories)}
    return counts


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--capture", default="build/server/capture",
                   help="the capture folder (default build/server/capture; the image: the run folder's capture/)")
    p.add_argument("--out", default="data/collected", help="dataset folder to write (train/ and valid/)")
    p.add_argument("--limit", type=int, default=None, help="keep the N least confident images")
    p.add_argument("--valid-share", type=float, default=0.2, help="share of the images in valid/")
    p.add_argument("--retention-days", type=float, default=7.0, help="drop (and delete) older captures")
    p.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"collect: {out} is not empty; pass another --out (COLLECT_OUT=...) or remove it", file=sys.stderr)
        return 2
    try:
        counts = collect(Path(args.capture), out, args.limit, args.valid_share, args.seed, args.retention_days)
    except FileNotFoundError as exc:
        print(f"collect: {exc}", file=sys.stderr)
        return 2
    print(f"{out}: {counts['train']} train + {counts['valid']} valid images with the model's predictions as "
          "pre-annotations; correct them in a labelling tool (COCO import), then "
          f"`make train DATASET={out}`")
    return 0
