"""The promotion gate: a candidate version's served metrics against the default's.

``make promote`` refuses a candidate whose mAP@[.5:.95] (boxes, and masks / keypoints for those
models) falls by more than the tolerance, or whose requests failed; ``make compare`` prints the
same table for any two versions.
"""

from __future__ import annotations


def text_table(rows: list[list[str]]) -> str:
    """Rows as left-aligned columns (the first row is the header)."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def gate_table(default: dict, candidate: dict, tolerance: float,
               headers: tuple[str, str] = ("default", "candidate")) -> tuple[bool, str]:
    """``(accepted, table)``: the candidate passes unless its mAP is lower by more than ``tolerance``."""
    dc, cc = default["metrics"]["coco"], candidate["metrics"]["coco"]
    df2, cf2 = default["metrics"]["f2"], candidate["metrics"]["f2"]
    rows = [["metric", f"{headers[0]} {default['version']}".strip(), f"{headers[1]} {candidate['version']}".strip(),
             "change"]]
    for key in ("mAP", "mAP_50", "mAP_75", "mAP_small", "mAP_medium", "mAP_large", "AR_100"):
        rows.append([key, f"{dc[key]:.4f}", f"{cc[key]:.4f}", f"{cc[key] - dc[key]:+.4f}"])
    rows.append([f"F2@0.5 (thr {df2['threshold']:.2f})", f"{df2['f2']:.4f}", f"{cf2['f2']:.4f}",
                 f"{cf2['f2'] - df2['f2']:+.4f}"])
    rows.append(["best F2@0.5", f"{df2['best_f2']:.4f} @{df2['best_threshold']:.2f}",
                 f"{cf2['best_f2']:.4f} @{cf2['best_threshold']:.2f}", f"{cf2['best_f2'] - df2['best_f2']:+.4f}"])
    for kind in gated_kinds(default, candidate)[1:]:
        d, c = default["metrics"][kind], candidate["metrics"][kind]
        label = kind.removeprefix("coco_")
        for key in ("mAP", "mAP_50", "mAP_75"):
            rows.append([f"{label} {key}", f"{d[key]:.4f}", f"{c[key]:.4f}", f"{c[key] - d[key]:+.4f}"])
    rows.append(["images / failures", f"{default['images']} / {len(default['failures'])}",
                 f"{candidate['images']} / {len(candidate['failures'])}", ""])
    accepted = not gate_drops(default, candidate, tolerance) and not candidate["failures"]
    return accepted, text_table(rows)


def gated_kinds(default: dict, candidate: dict) -> list[str]:
    """The metric families both reports hold: ``coco`` (boxes), then ``coco_segm`` / ``coco_keypoints``."""
    return [k for k in ("coco", "coco_segm", "coco_keypoints") if k in default["metrics"] and k in candidate["metrics"]]


def gate_drops(default: dict, candidate: dict, tolerance: float) -> dict[str, float]:
    """``{family: mAP drop}`` for each family whose mAP@[.5:.95] falls by more than ``tolerance``.

    Mask and keypoint models are gated on their masks / keypoints as well as their boxes.
    """
    drops = {}
    for kind in gated_kinds(default, candidate):
        drop = default["metrics"][kind]["mAP"] - candidate["metrics"][kind]["mAP"]
        if drop > tolerance:
            drops[kind.removeprefix("coco_").replace("coco", "bbox")] = drop
    return drops
