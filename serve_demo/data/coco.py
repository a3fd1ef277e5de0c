"""COCO-format detection folders (the Roboflow layout: ``SPLIT/_annotations.coco.json``).

Any folder in that layout works wherever the synthetic one does. Category ids are mapped to
contiguous labels ``1..K`` (0 is the background) in id order; categories with no annotation in
the training split (Roboflow's umbrella "supercategory" entries) are dropped. The mapping is
saved as the label map ``index_to_name/<name>.json`` and travels with the model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from serve_demo.core.imaging import load_rgb

log = logging.getLogger(__name__)

ANNOTATIONS = "_annotations.coco.json"
BACKGROUND = "__background__"


def split_dir(root: str | Path, split: str) -> Path:
    """The folder of ``split`` under a dataset root, checked for its annotation file."""
    folder = Path(root) / split
    ann = folder / ANNOTATIONS
    if not ann.is_file():
        raise FileNotFoundError(
            f"{ann} not found: a dataset folder must hold train/, valid/ and test/, each with "
            f"{ANNOTATIONS} and its images (run `make data` for the synthetic one)"
        )
    return folder


def load_coco(root: str | Path, split: str) -> dict:
    """The parsed annotation file of one split."""
    return json.loads((split_dir(root, split) / ANNOTATIONS).read_text())


def label_map_from_coco(coco: dict) -> dict[str, str]:
    """``{"0": "__background__", "1": name, ...}`` over the categories that have annotations."""
    used = {a["category_id"] for a in coco.get("annotations", [])}
    cats = sorted((c for c in coco["categories"] if c["id"] in used), key=lambda c: c["id"])
    dropped = [c["name"] for c in coco["categories"] if c["id"] not in used]
    if dropped:
        log.info("categories without annotations left out of the label map: %s", ", ".join(dropped))
    if not cats:
        raise ValueError("the training split has no annotations: nothing to learn")
    names = [c["name"] for c in cats]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"category names must be unique, repeated: {sorted(dupes)}")
    return {"0": BACKGROUND, **{str(i + 1): n for i, n in enumerate(names)}}


def category_to_label(coco: dict, label_map: dict[str, str]) -> dict[int, int]:
    """COCO category id -> model label, matched by category name."""
    by_name = {name: int(idx) for idx, name in label_map.items() if int(idx) != 0}
    return {c["id"]: by_name[c["name"]] for c in coco["categories"] if c["name"] in by_name}


def segmentation_to_mask(segmentation, height: int, width: int) -> torch.Tensor:
    """A COCO ``segmentation`` (polygons, RLE or compressed RLE) as an ``H x W`` uint8 mask."""
    from serve_demo.core.masks import decode

    if isinstance(segmentation, dict):  # RLE, compressed or not
        return torch.from_numpy(decode(segmentation))
    polys = [p for p in segmentation if len(p) >= 6]
    if not polys:
        return torch.zeros((height, width), dtype=torch.uint8)
    import warnings

    from pycocotools import mask as coco_mask

    with warnings.catch_warnings():  # pycocotools' numpy 2 copy-keyword notice
        warnings.simplefilter("ignore", DeprecationWarning)
        rle = coco_mask.merge(coco_mask.frPyObjects(polys, height, width))
        return torch.from_numpy(coco_mask.decode(rle)).to(torch.uint8)


def keypoint_names(coco: dict, label_map: dict[str, str]) -> list[str]:
    """The keypoint names of the (single) keypoint category, from the COCO categories."""
    used = set(label_map.values())
    for c in coco["categories"]:
        if c["name"] in used and c.get("keypoints"):
            return list(c["keypoints"])
    raise ValueError("no category lists its \"keypoints\": not a keypoint dataset")


class CocoDetection(Dataset):
    """One split of a COCO-format folder as ``(CHW float image in [0, 1], target)`` pairs.

    ``target`` holds ``boxes`` (xyxy float32), ``labels`` (int64) and ``image_id``; with
    ``masks``, ``masks`` (``N x H x W`` uint8, from ``segmentation``); with ``keypoints``,
    ``keypoints`` (``N x K x 3`` float32: x, y, visibility).
    Boxes smaller than one pixel, crowd annotations and unknown categories are skipped.
    Horizontal flips are off for keypoints (left and right names would swap).
    """

    def __init__(self, root: str | Path, split: str, label_map: dict[str, str],
                 hflip: bool = False, masks: bool = False, keypoints: bool = False) -> None:
        self.folder = split_dir(root, split)
        self.coco = load_coco(root, split)
        self.cat_to_label = category_to_label(self.coco, label_map)
        self.hflip = hflip and not keypoints
        self.masks = masks
        self.keypoints = keypoints
        self.images = sorted(self.coco["images"], key=lambda im: im["id"])
        self.anns: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for a in self.coco.get("annotations", []):
            if a.get("iscrowd", 0) or a["category_id"] not in self.cat_to_label:
                continue
            if masks and not a.get("segmentation"):
                raise ValueError(f"annotation {a.get('id')} has no segmentation: a mask model needs "
                                 "instance masks (PennFudanPed: `serve_demo convert-pennfudan`)")
            if keypoints and not a.get("keypoints"):
                continue
            if a["bbox"][2] >= 1 and a["bbox"][3] >= 1 and a["image_id"] in self.anns:
                self.anns[a["image_id"]].append(a)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        info = self.images[idx]
        image = pil_to_tensor(load_rgb(self.folder / info["file_name"])).float().div_(255)
        anns = self.anns[info["id"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                               a["bbox"][1] + a["bbox"][3]] for a in anns],
                             dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        target = {"boxes": boxes, "labels": labels, "image_id": torch.tensor(info["id"])}
        h, w = image.shape[-2:]
        if self.masks:
            target["masks"] = torch.stack([segmentation_to_mask(a["segmentation"], h, w) for a in anns]) \
                if anns else torch.zeros((0, h, w), dtype=torch.uint8)
        if self.keypoints:
            target["keypoints"] = torch.tensor([a["keypoints"] for a in anns],
                                               dtype=torch.float32).reshape(len(anns), -1, 3)
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
            target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def collate(batch: list) -> tuple:
    """Keep variable-size images as a list (never stack)."""
    return tuple(zip(*batch))
