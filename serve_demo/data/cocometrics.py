"""COCO bbox, segm and keypoint metrics with pycocotools (no hand-written AP)."""

from __future__ import annotations

import contextlib
import copy
import io
import logging

import numpy as np

log = logging.getLogger(__name__)

STAT_NAMES = (
    "mAP", "mAP_50", "mAP_75", "mAP_small", "mAP_medium", "mAP_large",
    "AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large",
)


def _coco_gt(gt: dict):
    """A pycocotools COCO index over a copy of ``gt`` (missing optional fields filled in)."""
    from pycocotools.coco import COCO

    gt = copy.deepcopy(gt)
    gt.setdefault("info", {})
    gt.setdefault("licenses", [])
    for a in gt["annotations"]:
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
        a.setdefault("iscrowd", 0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
    return coco_gt


KEYPOINT_STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_medium", "mAP_large",
                       "AR", "AR_50", "AR_75", "AR_medium", "AR_large")
# COCO's per-keypoint OKS sigmas for its 17 person keypoints; other skeletons get a uniform one
COCO_PERSON_SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07,
                               .87, .87, .89, .89]) / 10.0
UNIFORM_SIGMA = 0.05


def iou_types(gt: dict) -> list[str]:
    """The COCO evaluations a ground truth supports: bbox always, segm and keypoints if annotated."""
    anns = gt.get("annotations", [])
    types = ["bbox"]
    if anns and all(a.get("segmentation") for a in anns):
        types.append("segm")
    if anns and any(a.get("num_keypoints", 0) or a.get("keypoints") for a in anns):
        types.append("keypoints")
    return types


def coco_metrics(gt: dict, detections: list[dict], iou_type: str = "bbox") -> dict[str, float]:
    """The standard COCO numbers (12 for bbox/segm, 10 for keypoints) of ``detections``.

    Args:
        gt: a parsed COCO annotation file (with ``segmentation`` / ``keypoints`` for those types).
        detections: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]`` plus
            ``segmentation`` (RLE) for ``segm`` or ``keypoints`` (flat x, y, v) for ``keypoints``.
        iou_type: ``bbox``, ``segm`` or ``keypoints``.
    """
    from pycocotools.cocoeval import COCOeval

    names = KEYPOINT_STAT_NAMES if iou_type == "keypoints" else STAT_NAMES
    detections = for_iou_type(detections, iou_type)
    if not detections:
        return {name: 0.0 for name in names}
    coco_gt = _coco_gt(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if iou_type == "keypoints":
            k = len(detections[0]["keypoints"]) // 3
            ev.params.kpt_oks_sigmas = COCO_PERSON_SIGMAS if k == 17 else np.full(k, UNIFORM_SIGMA)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(max(v, 0.0)) for name, v in zip(names, np.asarray(ev.stats))}


def for_iou_type(detections: list[dict], iou_type: str) -> list[dict]:
    """Copies of the rows holding only what pycocotools reads for ``iou_type``.

    ``loadRes`` takes a row's area from its ``bbox`` whenever one is present, so segm rows must
    go without it (area from the mask) and keypoint rows without both (area from the keypoints).
    """
    drop = {"bbox": ("segmentation", "keypoints"), "segm": ("bbox", "keypoints"),
            "keypoints": ("bbox", "segmentation")}[iou_type]
    need = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}[iou_type]
    return [{k: copy.deepcopy(v) for k, v in r.items() if k not in drop} for r in detections if need in r]


def coco_bbox_metrics(gt: dict, detections: list[dict]) -> dict[str, float]:
    """The 12 standard COCO bbox numbers (:func:`coco_metrics` with ``bbox``)."""
    return coco_metrics(gt, detections, "bbox")


def to_coco_detections(image_id: int, boxes, scores, labels, label_to_cat: dict[int, int],
                       segmentations: list | None = None, keypoints: list | None = None) -> list[dict]:
    """Model outputs (xyxy) of one image as COCO result rows; unknown labels are dropped.

    ``segmentations`` (RLE per detection) and ``keypoints`` (``[[x, y, score], ...]`` per
    detection) are added to the rows when given.
    """
    rows = []
    for i, ((x1, y1, x2, y2), s, lab) in enumerate(zip(boxes, scores, labels)):
        cat = label_to_cat.get(int(lab))
        if cat is None:
            continue
        row = {"image_id": int(image_id), "category_id": cat, "score": float(s),
               "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]}
        if segmentations is not None:
            row["segmentation"] = segmentations[i]
        if keypoints is not None:
            row["keypoints"] = [float(v) for kp in keypoints[i] for v in (kp[0], kp[1], 1.0)]
        rows.append(row)
    return rows


def _evaluate_at_iou(gt: dict, detections: list[dict], iou: float):
    """pycocotools' per-image matching (``evaluate``) at one IoU, all object sizes."""
    from pycocotools.cocoeval import COCOeval

    coco_gt = _coco_gt(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(detections)), "bbox")
        ev.params.iouThrs = np.array([iou])
        ev.params.areaRng = [ev.params.areaRng[0]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
    return ev


def matches_at_iou(gt: dict, detections: list[dict], iou: float = 0.5) -> tuple[np.ndarray, np.ndarray, int]:
    """pycocotools' own matching at one IoU: (scores, is_true_positive, number of objects)."""

    n_gt = sum(1 for a in gt["annotations"] if not a.get("iscrowd"))
    if not detections:
        return np.zeros(0), np.zeros(0, dtype=bool), n_gt
    ev = _evaluate_at_iou(gt, detections, iou)
    scores, tps = [], []
    for e in ev.evalImgs:
        if e is None:
            continue
        for d, s in enumerate(e["dtScores"]):
            if not e["dtIgnore"][0][d]:
                scores.append(s)
                tps.append(e["dtMatches"][0][d] > 0)
    return np.asarray(scores), np.asarray(tps, dtype=bool), n_gt


def f_beta_curve(scores: np.ndarray, tps: np.ndarray, n_gt: int, beta: float = 2.0,
                 thresholds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """F-beta, precision and recall at each threshold (detections scoring >= threshold)."""
    if thresholds is None:
        thresholds = np.round(np.arange(0.05, 0.96, 0.01), 2)
    f, p, r = [], [], []
    for t in thresholds:
        keep = scores >= t
        tp = int(tps[keep].sum())
        prec = tp / max(1, int(keep.sum()))
        rec = tp / max(1, n_gt)
        b2 = beta * beta
        f.append((1 + b2) * prec * rec / max(1e-12, b2 * prec + rec))
        p.append(prec)
        r.append(rec)
    return thresholds, np.asarray(f), np.asarray(p), np.asarray(r)


def pr_curves(gt: dict, detections: list[dict], iou: float = 0.5) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """pycocotools' interpolated precision at 101 recall points, per category id, at one IoU.

    Returns ``{category_id: (recall, precision)}``; precision is -1 where the recall is never reached
    (dropped here), so each curve ends at the category's maximum recall.
    """
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return {}
    coco_gt = _coco_gt(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(detections)), "bbox")
        ev.params.iouThrs = np.array([iou])
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]  # [iou, recall, category, area, maxDets]
    recall = np.asarray(ev.params.recThrs)
    curves = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[0, :, k, 0, -1]
        keep = p >= 0
        curves[int(cat_id)] = (recall[keep], p[keep])
    return curves


def image_errors(gt: dict, detections: list[dict], threshold: float, iou: float = 0.5) -> dict[int, tuple[int, int]]:
    """``{image_id: (false positives, missed objects)}`` at a score threshold and one IoU.

    Uses pycocotools' greedy matching (highest scores first), so a detection kept at the
    threshold is a true positive exactly when pycocotools matched it.
    """

    errors = {int(im["id"]): [0, 0] for im in gt["images"]}
    for a in gt["annotations"]:
        if not a.get("iscrowd"):
            errors[int(a["image_id"])][1] += 1
    if not detections:
        return {k: (v[0], v[1]) for k, v in errors.items()}
    ev = _evaluate_at_iou(gt, detections, iou)
    for e in ev.evalImgs:
        if e is None:
            continue
        counts = errors[int(e["image_id"])]
        for d, score in enumerate(e["dtScores"]):
            if score >= threshold and not e["dtIgnore"][0][d]:
                if e["dtMatches"][0][d] > 0:
                    counts[1] -= 1  # an object found
                else:
                    counts[0] += 1
    return {k: (v[0], v[1]) for k, v in errors.items()}
