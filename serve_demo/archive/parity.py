"""The parity gate: an accelerated model must answer like the eager one on the validation images.

Every detection the eager model makes (score at or above :data:`SCORE_FLOOR`) must be found in the
accelerated answer with the same label, its box within :data:`BOX_TOL` pixels on every coordinate
and its score within :data:`SCORE_TOL`; and the other way round. Detections within the score
tolerance of the floor, or of the lowest kept score when ``detections_per_img`` cut the list, may
appear on one side only: a 1e-5 difference can move them across the cut. Both models run through
:func:`serve_demo.core.pipeline.run_detector`, the served path, one image at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from serve_demo.core.imaging import decode_image
from serve_demo.core.pipeline import run_detector

BOX_TOL = 0.5  # pixels
SCORE_TOL = 1e-3
SCORE_FLOOR = 0.05  # torchvision's default box_score_thresh: what a client asking threshold 0.05 sees
MASK_TOL = 1e-2  # mask models: per-pixel probability, before the mask threshold
KEYPOINT_TOL = BOX_TOL  # keypoint models: pixels, per coordinate


@dataclass
class ParityReport:
    """The gate's figures over the validation images."""

    images: int = 0
    detections: int = 0  # eager detections compared
    max_box_diff: float = 0.0
    max_score_diff: float = 0.0
    unmatched: int = 0  # detections on one side only (beyond the tolerated cut)
    label_mismatches: int = 0  # matched by box, different label
    max_mask_diff: float | None = None  # mask models only
    max_keypoint_diff: float | None = None  # keypoint models only
    eager_ms: list[float] = field(default_factory=list)
    accelerated_ms: list[float] = field(default_factory=list)
    worst: str = ""

    @property
    def passed(self) -> bool:
        return (self.images > 0 and self.unmatched == 0 and self.label_mismatches == 0
                and self.max_box_diff <= BOX_TOL and self.max_score_diff <= SCORE_TOL
                and (self.max_mask_diff or 0.0) <= MASK_TOL and (self.max_keypoint_diff or 0.0) <= KEYPOINT_TOL)

    @property
    def speedup(self) -> float:
        """Median eager time / median accelerated time per image (>1: faster)."""
        a, b = sorted(self.eager_ms), sorted(self.accelerated_ms)
        return a[len(a) // 2] / b[len(b) // 2] if a and b else 0.0

    def summary(self) -> str:
        return (f"{self.images} images, {self.detections} detections: max box difference "
                f"{self.max_box_diff:.3g} px (limit {BOX_TOL}), max score difference {self.max_score_diff:.3g} "
                f"(limit {SCORE_TOL}), "
                + (f"max mask difference {self.max_mask_diff:.3g} (limit {MASK_TOL}), "
                   if self.max_mask_diff is not None else "")
                + (f"max keypoint difference {self.max_keypoint_diff:.3g} px (limit {KEYPOINT_TOL}), "
                   if self.max_keypoint_diff is not None else "")
                + f"{self.unmatched} unmatched, {self.label_mismatches} label mismatches; "
                f"median {_median(self.eager_ms):.1f} ms eager, {_median(self.accelerated_ms):.1f} ms accelerated "
                f"({self.speedup:.2f}x)" + (f"; worst: {self.worst}" if self.worst and not self.passed else ""))

    def as_dict(self) -> dict:
        return {"images": self.images, "detections": self.detections, "max_box_diff_px": round(self.max_box_diff, 6),
                "max_score_diff": round(self.max_score_diff, 7), "max_mask_diff": self.max_mask_diff,
                "max_keypoint_diff_px": self.max_keypoint_diff, "unmatched": self.unmatched,
                "label_mismatches": self.label_mismatches, "passed": self.passed,
                "eager_median_ms": round(_median(self.eager_ms), 2),
                "accelerated_median_ms": round(_median(self.accelerated_ms), 2), "speedup": round(self.speedup, 3),
                "limits": {"box_px": BOX_TOL, "score": SCORE_TOL, "mask": MASK_TOL,
                                                        "keypoint_px": KEYPOINT_TOL, "score_floor": SCORE_FLOOR}}


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2] if xs else 0.0


def validation_images(root: str | Path, split: str, limit: int) -> list[torch.Tensor]:
    """Up to ``limit`` images of a COCO split, decoded as the server decodes them (uint8 CHW).

    Raises:
        FileNotFoundError: no such split, naming the folder to fill.
    """
    from serve_demo.data.coco import load_coco, split_dir

    coco = load_coco(root, split)
    folder = split_dir(root, split)
    files = [folder / im["file_name"] for im in sorted(coco["images"], key=lambda i: i["id"])][:limit]
    if not files:
        raise FileNotFoundError(f"{folder} has no images: the parity gate needs validation images")
    return [decode_image(f.read_bytes()) for f in files]


def compare(eager: dict[str, torch.Tensor], accel: dict[str, torch.Tensor], report: ParityReport,
            image_name: str = "", floor: float = SCORE_FLOOR) -> None:
    """Match one image's two answers (see the module's rule) and add the differences to ``report``;
    ``floor``: the lowest score compared (a model whose scores are all low needs a lower one)."""
    cap = max(len(eager["scores"]), len(accel["scores"]))
    for a, b, side in ((eager, accel, "eager"), (accel, eager, "accelerated")):
        keep = a["scores"] >= floor
        boxes, scores, labels = a["boxes"][keep], a["scores"][keep], a["labels"][keep]
        index = torch.nonzero(keep).flatten()
        used = torch.zeros(len(b["scores"]), dtype=torch.bool)
        low = float(b["scores"].min()) if len(b["scores"]) else floor
        for i in torch.argsort(scores, descending=True).tolist():
            if side == "eager":
                report.detections += 1
            diff = (b["boxes"] - boxes[i]).abs().amax(dim=1) if len(b["boxes"]) else torch.empty(0)
            diff[used] = float("inf")
            # the same box may be kept once per class (per-class NMS): prefer a close box with this label
            same = torch.where(b["labels"] == labels[i], diff, torch.full_like(diff, float("inf")))
            j = int(same.argmin()) if len(diff) and float(same.min()) <= BOX_TOL * 4 else (
                int(diff.argmin()) if len(diff) else -1)
            s = float(scores[i])
            if j < 0 or float(diff[j]) > BOX_TOL * 4:
                at_cut = s - floor <= SCORE_TOL or (len(b["scores"]) == cap and s - low <= SCORE_TOL)
                if not at_cut:
                    report.unmatched += 1
                    report.worst = f"{image_name}: a {side} detection (score {s:.4f}) has no counterpart"
                continue
            used[j] = True
            if int(b["labels"][j]) != int(labels[i]):
                report.label_mismatches += 1
                report.worst = f"{image_name}: same box, labels {int(labels[i])} and {int(b['labels'][j])}"
            box_diff, score_diff = float(diff[j]), abs(float(b["scores"][j]) - s)
            if box_diff > report.max_box_diff or score_diff > report.max_score_diff:
                report.worst = f"{image_name}: box {box_diff:.3g} px, score {score_diff:.3g} apart"
            report.max_box_diff = max(report.max_box_diff, box_diff)
            report.max_score_diff = max(report.max_score_diff, score_diff)
            k = int(index[i])
            for key, attr in (("masks", "max_mask_diff"), ("keypoints", "max_keypoint_diff")):
                if key in a and key in b:
                    x, y = a[key][k].float(), b[key][j].float()
                    if key == "keypoints":  # x, y per keypoint (the third column is visibility)
                        x, y = x[..., :2], y[..., :2]
                    d = float((x - y).abs().max()) if x.numel() else 0.0
                    setattr(report, attr, max(getattr(report, attr) or 0.0, d))


@dataclass
class Answers:
    """One model's answers to images, and the time each took (ms): computed once, compared many times."""

    outputs: list[dict[str, torch.Tensor]] = field(default_factory=list)
    ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return _median(self.ms)


def answer(model: nn.Module, images: list[torch.Tensor], warmup: int = 1, done: Answers | None = None,
           tick: Callable[[], None] | None = None) -> Answers:
    """Run ``model`` on each image (CPU, the served path, one at a time), timed, after ``warmup`` runs;
    ``done``: answers already computed for the first images (only the rest are run); ``tick`` after each."""
    cpu = torch.device("cpu")
    out = Answers(list(done.outputs), list(done.ms)) if done else Answers()
    for im in images[:warmup] if not out.outputs else ():
        run_detector(model, [im], cpu)
    for im in images[len(out.outputs):]:
        t0 = time.perf_counter()
        out.outputs.append(run_detector(model, [im], cpu)[0])
        out.ms.append((time.perf_counter() - t0) * 1000)
        if tick:
            tick()
    return out


def compare_answers(eager: Answers, accelerated: Answers, floor: float = SCORE_FLOOR) -> ParityReport:
    """The gate's figures for two models' answers to the same images."""
    report = ParityReport(eager_ms=list(eager.ms), accelerated_ms=list(accelerated.ms))
    for n, (a, b) in enumerate(zip(eager.outputs, accelerated.outputs)):
        compare(a, b, report, f"image {n}", floor)
        report.images += 1
    return report


def check_parity(eager: nn.Module, accelerated: nn.Module, images: list[torch.Tensor],
                 warmup: int = 2, floor: float = SCORE_FLOOR) -> ParityReport:
    """Run both models on every image (CPU, the served path) and compare; time each image too."""
    return compare_answers(answer(eager, images, warmup), answer(accelerated, images, warmup), floor)
