"""Convert instance-mask datasets to the COCO layout the rest of the project reads.

PennFudanPed (https://www.cis.upenn.edu/~jshi/ped_html/, the torchvision tutorial's dataset)::

    PennFudanPed/PNGImages/FudanPed00001.png
    PennFudanPed/PedMasks/FudanPed00001_mask.png   # 0 = background, 1..N = pedestrian instances

becomes ``OUT/{train,valid,test}/_annotations.coco.json`` plus the images, with one ``person``
category and, per instance, ``segmentation`` (compressed COCO RLE), ``bbox`` and ``area`` taken
from its mask. The split is a seeded shuffle of the sorted file names: the same seed gives the
same files.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from serve_demo.core.masks import encode

from .coco import ANNOTATIONS

log = logging.getLogger(__name__)

IMAGES, MASKS, MASK_SUFFIX = "PNGImages", "PedMasks", "_mask.png"


class ConvertError(ValueError):
    """The source folder is not in the expected layout; the message says what is missing."""


def instances(mask: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``[(instance id, H x W bool mask)]`` for every non-zero value of an instance-id mask."""
    return [(int(v), mask == v) for v in np.unique(mask) if v != 0]


def annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray) -> dict | None:
    """One COCO annotation from a binary mask (None for an empty mask)."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    x1, y1 = int(xs.min()), int(ys.min())
    w, h = int(xs.max()) + 1 - x1, int(ys.max()) + 1 - y1
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": encode(mask),
            "bbox": [x1, y1, w, h], "area": int(mask.sum()), "iscrowd": 0}


def pennfudan_pairs(src: Path) -> list[tuple[Path, Path]]:
    """``[(image, mask)]`` of a PennFudanPed folder, sorted by name.

    Raises:
        ConvertError: a missing folder or an image without its mask.
    """
    images, masks = src / IMAGES, src / MASKS
    for folder in (images, masks):
        if not folder.is_dir():
            raise ConvertError(f"{folder} not found: point at the PennFudanPed folder that holds "
                               f"{IMAGES}/ and {MASKS}/")
    pairs = []
    for img in sorted(images.glob("*.png")):
        mask = masks / f"{img.stem}{MASK_SUFFIX}"
        if not mask.is_file():
            raise ConvertError(f"{img.name} has no mask {mask}")
        pairs.append((img, mask))
    if not pairs:
        raise ConvertError(f"no .png images in {images}")
    return pairs


def split_names(n: int, valid: float, test: float, seed: int) -> list[str]:
    """A split name per item: a seeded shuffle, the first ``test`` share to test, then valid."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test, n_valid = round(n * test), round(n * valid)
    names = ["train"] * n
    for rank, i in enumerate(order):
        names[i] = "test" if rank < n_test else "valid" if rank < n_test + n_valid else "train"
    return names


def convert_pennfudan(src: str | Path, out: str | Path, valid: float = 0.1, test: float = 0.2,
                      seed: int = 0, progress: bool = True) -> dict[str, int]:
    """Write ``out`` in the COCO layout; return the image count per split."""
    from tqdm import tqdm

    src, out = Path(src), Path(out)
    pairs = pennfudan_pairs(src)
    splits = split_names(len(pairs), valid, test, seed)
    categories = [{"id": 1, "name": "person", "supercategory": "person"}]
    docs = {s: {"info": {"description": f"PennFudanPed from {src}, split seed {seed}", "version": "1"},
                "images": [], "annotations": [], "categories": categories}
            for s in ("train", "valid", "test")}
    for (img_path, mask_path), split in tqdm(list(zip(pairs, splits)), desc="convert", unit="img",
                                             disable=not progress, file=sys.stderr):
        doc = docs[split]
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(img_path) as im:
            w, h = im.size
        mask = np.asarray(Image.open(mask_path))
        if mask.shape[:2] != (h, w):
            raise ConvertError(f"{mask_path.name} is {mask.shape[1]}x{mask.shape[0]}, its image {w}x{h}")
        if mask.ndim == 3:  # an RGB-saved mask: the instance id is in every channel
            mask = mask[..., 0]
        image_id = len(doc["images"]) + 1
        shutil.copy2(img_path, folder / img_path.name)
        doc["images"].append({"id": image_id, "file_name": img_path.name, "width": w, "height": h})
        for _, inst in instances(mask):
            ann = annotation(len(doc["annotations"]) + 1, image_id, 1, inst)
            if ann:
                doc["annotations"].append(ann)
    for split, doc in docs.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        (out / split / ANNOTATIONS).write_text(json.dumps(doc))
        log.info("wrote %s: %d images, %d people", out / split, len(doc["images"]), len(doc["annotations"]))
    return {s: len(d["images"]) for s, d in docs.items()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="the PennFudanPed folder (holds PNGImages/ and PedMasks/)")
    p.add_argument("--out", default="data/pennfudan", help="COCO-format output folder")
    p.add_argument("--valid", type=float, default=0.1, help="share of images for validation")
    p.add_argument("--test", type=float, default=0.2, help="share of images for test")
    p.add_argument("--seed", type=int, default=0, help="split seed")


def main(args: argparse.Namespace) -> int:
    try:
        counts = convert_pennfudan(args.src, args.out, args.valid, args.test, args.seed)
    except ConvertError as exc:
        print(f"convert-pennfudan: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: " + ", ".join(f"{n} {s}" for s, n in counts.items())
          + f" images; train a mask model with: make train DATASET={args.out} NAME=pennfudan "
          "ARCH=maskrcnn_resnet50_fpn")
    return 0
