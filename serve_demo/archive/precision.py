"""``PRECISION=auto``: the fp32 runtime, OpenVINO bf16 and int8 (dense parts, whole graph) scored for speed and mAP.

Parity (:mod:`.parity`) proves an fp32 runtime answers like eager; lower precisions never do, so
they are judged by what a user loses: mAP on the labelled validation images. The fastest candidate
whose mAP (bbox, and segm for mask models) is within ``gate_tolerance`` of the fp32 choice's is
archived, and ``precision.json`` in the archive keeps every candidate's figures. The gate's images
come after the int8 calibration images in the split, so no candidate is scored on what it was
calibrated on. Without labelled images, the archive stays fp32 and says so.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from serve_demo.core import defaults
from serve_demo.core.config import RuntimeConfig
from serve_demo.core.pipeline import run_detector
from serve_demo.data.cocometrics import coco_metrics, iou_types, to_coco_detections

log = logging.getLogger(__name__)

RECORD = "precision.json"  # at the archive's root
MIN_GATE_IMAGES = 20  # fewer labelled images than this make an mAP difference of 0.005 meaningless


@dataclass
class GateSet:
    """The labelled images the precision gate scores on: decoded as the server decodes them."""

    gt: dict  # the split's COCO annotations restricted to these images
    ids: list[int]
    images: list[torch.Tensor]  # uint8 CHW
    label_to_cat: dict[int, int]
    split: str
    skipped: int  # the split's first images, left to int8 calibration

    @property
    def iou_types(self) -> list[str]:
        return [t for t in iou_types(self.gt) if t in ("bbox", "segm")]


@dataclass
class Scored:
    """One candidate's figures on the gate set."""

    runtime: str  # RuntimeConfig.label
    precision: str
    median_ms: float
    maps: dict[str, float] = field(default_factory=dict)  # iou type -> mAP@[.5:.95]
    drop: float = 0.0  # largest fp32 mAP - this mAP over the iou types
    passed: bool = True
    note: str = ""
    graph: str = "parts"


def gate_set(root: str | Path, split: str, labels: dict[int, str], skip: int, limit: int) -> GateSet | None:
    """Up to ``limit`` annotated images of ``split`` after its first ``skip``; None when it has no annotations
    (or no category names the model's labels)."""
    from serve_demo.core.imaging import decode_image
    from serve_demo.data.coco import load_coco, split_dir

    coco = load_coco(root, split)
    by_name = {name: idx for idx, name in labels.items() if idx != 0}
    label_to_cat = {by_name[c["name"]]: c["id"] for c in coco.get("categories", []) if c["name"] in by_name}
    annotated = {a["image_id"] for a in coco.get("annotations", []) if a.get("category_id") in label_to_cat.values()}
    if not annotated or not label_to_cat:
        return None
    ordered = sorted(coco["images"], key=lambda i: i["id"])
    rest = ordered[skip:] if len(ordered) - skip >= MIN_GATE_IMAGES else ordered
    chosen = rest[:limit]
    ids = [im["id"] for im in chosen]
    keep = set(ids)
    gt = {**coco, "images": chosen, "annotations": [a for a in coco["annotations"] if a["image_id"] in keep]}
    folder = split_dir(root, split)
    images = [decode_image((folder / im["file_name"]).read_bytes()) for im in chosen]
    return GateSet(gt, ids, images, label_to_cat, split, skip if rest is not ordered else 0)


def score(model: nn.Module, data: GateSet, mask_threshold: float, tick: Callable[[], None] | None = None,
          warmup: int = 1) -> tuple[dict[str, float], float]:
    """``model``'s mAP per iou type on ``data`` (the served path, one image at a time) and its median ms."""
    cpu = torch.device("cpu")
    for im in data.images[:warmup]:
        run_detector(model, [im], cpu)
    outputs: list[dict[str, torch.Tensor]] = []
    ms: list[float] = []
    for im in data.images:
        t0 = time.perf_counter()
        outputs.append(run_detector(model, [im], cpu)[0])
        ms.append((time.perf_counter() - t0) * 1000)
        if tick:
            tick()
    return maps_of(outputs, data, mask_threshold), sorted(ms)[len(ms) // 2]


def maps_of(outputs: list[dict[str, torch.Tensor]], data: GateSet,
            mask_threshold: float = defaults.MASK_THRESHOLD) -> dict[str, float]:
    """mAP@[.5:.95] per iou type (bbox; segm when the split and the answers have masks) of one answer per image."""
    from serve_demo.core.masks import encode_all

    segm = "segm" in data.iou_types and all("masks" in o for o in outputs)
    rows: list[dict] = []
    for image_id, out in zip(data.ids, outputs):
        segs = encode_all(out["masks"].cpu(), mask_threshold) if segm else None
        rows += to_coco_detections(image_id, out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist(),
                                   data.label_to_cat, segmentations=segs)
    return {t: round(coco_metrics(data.gt, rows, t)["mAP"], 4) for t in (("bbox", "segm") if segm else ("bbox",))}


def judge(reference: Scored, candidate: Scored, tolerance: float) -> None:
    """Set ``candidate``'s drop and verdict against the fp32 ``reference``."""
    candidate.drop = round(max(reference.maps[t] - candidate.maps.get(t, 0.0) for t in reference.maps), 4)
    candidate.passed = candidate.drop <= tolerance
    if not candidate.passed:
        worst = max(reference.maps, key=lambda t: reference.maps[t] - candidate.maps.get(t, 0.0))
        candidate.note = (f"{worst} mAP {candidate.maps.get(worst, 0.0):.4f} is {candidate.drop:.4f} below fp32's "
                          f"{reference.maps[worst]:.4f} (tolerance {tolerance})")


def fastest_within(reference: Scored, candidates: list[Scored]) -> Scored:
    """The fastest of ``reference`` and the passing ``candidates``."""
    return min([reference, *(c for c in candidates if c.passed)], key=lambda s: s.median_ms)


@dataclass
class PrecisionRecord:
    """``precision.json``: how ``PRECISION=auto`` chose, with every candidate's figures."""

    chosen: str  # runtime label
    precision: str
    tolerance: float
    dataset: str = ""
    split: str = ""
    images: int = 0
    fp32: Scored | None = None
    candidates: list[Scored] = field(default_factory=list)
    reason: str = ""

    def write(self, folder: Path) -> None:
        (folder / RECORD).write_text(json.dumps(asdict(self), indent=1) + "\n")

    def summary(self) -> str:
        if self.fp32 is None:
            return f"{self.chosen} ({self.reason})"
        figures = "; ".join(f"{s.runtime} {_maps(s)} {s.median_ms:.0f} ms" + ("" if s.passed else " (refused)")
                            for s in [self.fp32, *self.candidates])
        return f"{self.chosen} on {self.images} {self.split} images: {figures}"


def _maps(s: Scored) -> str:
    return ", ".join(f"{t} mAP {v:.4f}" for t, v in s.maps.items()) or "not scored"


def low_precision_candidates(installed: Callable[[str], bool]) -> list[RuntimeConfig]:
    """OpenVINO bf16 (the dense parts, and the whole graph: no torch between the layers), int8 of the dense
    parts when NNCF is installed, and int8 of the whole graph (ONNX Runtime's quantizer; its float layers in
    bf16). None without OpenVINO."""
    if not installed("openvino"):
        return []
    out = [RuntimeConfig("openvino", precision="bf16"), RuntimeConfig("openvino", precision="bf16", graph="whole")]
    if installed("nncf"):
        out.append(RuntimeConfig("openvino", precision="int8"))
    if installed("onnxruntime"):
        out.append(RuntimeConfig("openvino", precision="int8", graph="whole"))
    return out
