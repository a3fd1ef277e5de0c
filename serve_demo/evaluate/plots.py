"""Report figures (matplotlib, headless): PR curves, F2 vs threshold, version comparison, samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from serve_demo.core.draw import draw_detections
from serve_demo.core.schema import Detection


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], ap50: dict[str, float], title: str,
                   path: Path) -> Path:
    """Precision-recall at IoU 0.5, one line per class (legend carries AP50)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=110)
    colors = plt.get_cmap("tab10")
    for i, (name, (recall, precision)) in enumerate(sorted(curves.items())):
        ax.plot(recall, precision, lw=1.8, color=colors(i % 10),
                label=f"{name} (AP50 {ap50.get(name, 0.0):.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.01), ylim=(0, 1.01),
           title=f"Precision-recall at IoU 0.5: {title}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_f2(curve: dict, serving_threshold: float, best_threshold: float, title: str, path: Path) -> Path:
    """F2, precision and recall against the score threshold, serving and best thresholds marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    t = np.asarray(curve["thresholds"])
    ax.plot(t, curve["f2"], lw=2.2, color="black", label="F2 (IoU 0.5)")
    ax.plot(t, curve["precision"], lw=1.2, ls="--", color="tab:blue", label="precision")
    ax.plot(t, curve["recall"], lw=1.2, ls="--", color="tab:orange", label="recall")
    ax.axvline(serving_threshold, color="tab:green", lw=1, label=f"serving threshold {serving_threshold:.2f}")
    ax.axvline(best_threshold, color="tab:red", lw=1, ls=":", label=f"best F2 at {best_threshold:.2f}")
    ax.set(xlabel="score threshold", ylabel="value", ylim=(0, 1.01), title=f"F2 vs threshold: {title}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower center", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_compare(a: dict, b: dict, path: Path) -> Path:
    """Side-by-side bars of the headline metrics and per-class AP, plus both F2 curves."""
    plt = _pyplot()
    la, lb = f"{a['model']} {a['version']}", f"{b['model']} {b['version']}"
    keys = ["mAP", "mAP_50", "mAP_75", "mAP_small", "mAP_medium", "mAP_large", "AR_100"]
    va = [a["metrics"]["coco"][k] for k in keys] + [a["metrics"]["f2"]["f2"]]
    vb = [b["metrics"]["coco"][k] for k in keys] + [b["metrics"]["f2"]["f2"]]
    labels = keys + ["F2@0.5"]
    classes = sorted(set(a["metrics"]["per_class"]) | set(b["metrics"]["per_class"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), dpi=100, gridspec_kw={"width_ratios": [3, 2, 2]})
    for ax, names, xa, xb, title in (
        (axes[0], labels, va, vb, "headline metrics"),
        (axes[1], classes, [a["metrics"]["per_class"].get(c, {}).get("AP", 0) for c in classes],
         [b["metrics"]["per_class"].get(c, {}).get("AP", 0) for c in classes], "AP@[.5:.95] per class"),
    ):
        x = np.arange(len(names))
        ax.bar(x - 0.2, xa, 0.4, label=la, color="tab:gray")
        ax.bar(x + 0.2, xb, 0.4, label=lb, color="tab:blue")
        ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
        ax.set(ylim=(0, 1), title=title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    for res, label, color in ((a, la, "tab:gray"), (b, lb, "tab:blue")):
        curve = res["metrics"]["f2_curve"]
        axes[2].plot(curve["thresholds"], curve["f2"], color=color, lw=2, label=label)
    axes[2].set(xlabel="score threshold", ylabel="F2 (IoU 0.5)", ylim=(0, 1), title="F2 vs threshold")
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_sample(image: Image.Image, truth: list[Detection], predicted: list[Detection], caption: str,
                scale: int = 2) -> Image.Image:
    """Ground truth (thin green) and predictions (thick, class colour, label + score), enlarged."""
    big = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)

    def scaled(d: Detection) -> Detection:
        kps = [[x * scale, y * scale, s] for x, y, s in d.keypoints] if d.keypoints else None
        return Detection(d.label, d.label_id, d.score, tuple(v * scale for v in d.box), d.mask, kps)

    out = draw_detections(big, [scaled(d) for d in predicted], width=3)
    # ground truth on top, thin, so it stays visible where a prediction sits right on it
    out = draw_detections(out, [scaled(d) for d in truth], width=1, color=(0, 255, 0), caption=False)
    banner = Image.new("RGB", (out.width, 18), (32, 32, 32))
    ImageDraw.Draw(banner).text((4, 3), caption, fill=(255, 255, 255))
    canvas = Image.new("RGB", (out.width, out.height + banner.height))
    canvas.paste(banner, (0, 0))
    canvas.paste(out, (0, banner.height))
    return canvas
