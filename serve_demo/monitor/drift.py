"""``make drift``: is live traffic still like the data the served version was evaluated on?

The baseline is written by ``make evaluate`` (``reports/NAME-VERSION/drift_baseline.json``): the
evaluation split binned into the features below with the bins of :mod:`serve_demo.core.observe`.
The live window comes from Prometheus: the same bins are the server's detection metrics, and the
counts of a window are the counters' growth between its start and end. Per feature a population
stability index (PSI) compares the two distributions: below ``warn`` (0.1) stable, up to ``fail``
(0.25) a moderate shift, above it drift. The report (``reports/drift/NAME-VERSION/``) has a table,
one plot per feature and ``drift.json``. Exit 0: no drift; 1: drift; 2: no baseline, no
Prometheus, or too little traffic to tell.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests

from serve_demo.core import defaults
from serve_demo.core.observe import BANDS, DEFAULT_BUCKETS, band, bucket_index, bucket_labels

log = logging.getLogger(__name__)

BASELINE_FILE = "drift_baseline.json"
WARN, FAIL = 0.1, 0.25
HIST_LABELS = bucket_labels(DEFAULT_BUCKETS)


@dataclass(frozen=True)
class Feature:
    """A binned feature: how Prometheus holds it (metric, label or histogram) and its bin names."""

    name: str
    metric: str
    label: str | None  # a counter split by this label; None: a histogram (``le`` buckets)
    unit: str  # what one count is: image or detection
    description: str


FEATURES = (
    Feature("score", "DetectionScoreBand", "Band", "detection", "score of each answered detection"),
    Feature("class", "DetectionsPerClass", "Class", "detection", "class mix of the answered detections"),
    Feature("detections", "DetectionsPerImage", None, "image", "detections answered per image"),
    Feature("size", "ImageMegapixels", None, "image", "image size, megapixels"),
    Feature("brightness", "ImageBrightnessBand", "Band", "image", "mean brightness of the image"),
)


def empty_bins(feature: Feature, classes: list[str]) -> dict[str, float]:
    if feature.name == "class":
        return {c: 0.0 for c in classes}
    if feature.label == "Band":
        return {b: 0.0 for b in BANDS}
    return {b: 0.0 for b in HIST_LABELS}


# ---------------------------------------------------------------------------------------- baseline


def image_features(path: Path) -> tuple[int, int, float]:
    """(width, height, brightness) of an image file, as the worker measures them (RGB mean / 255)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    return rgb.shape[1], rgb.shape[0], float(rgb.mean() / 255.0)


def baseline_counts(images: list[tuple[int, int, float]], detections: list[list[tuple[str, float]]],
                    threshold: float, classes: list[str]) -> dict[str, dict[str, float]]:
    """Binned counts of images and of their detections at or above ``threshold`` (as answered)."""
    counts = {f.name: empty_bins(f, classes) for f in FEATURES}
    for (w, h, brightness), dets in zip(images, detections):
        kept = [(label, s) for label, s in dets if s >= threshold]
        counts["detections"][HIST_LABELS[bucket_index(float(len(kept)))]] += 1
        counts["size"][HIST_LABELS[bucket_index(w * h / 1e6)]] += 1
        counts["brightness"][band(brightness)] += 1
        for label, s in kept:
            counts["score"][band(s)] += 1
            counts["class"][label] = counts["class"].get(label, 0.0) + 1
    return counts


def write_baseline(out: Path, model: str, version: str, threshold: float, dataset: str, split: str,
                   counts: dict[str, dict[str, float]], images: int) -> Path:
    path = out / BASELINE_FILE
    path.write_text(json.dumps({"model": model, "version": version, "threshold": threshold, "dataset": dataset,
                                "split": split, "images": images, "features": counts}, indent=1) + "\n")
    return path


def baseline_from_evaluation(out: Path, folder: Path, coco: dict, payloads: dict[int, Any], threshold: float,
                             model: str, version: str, dataset: str, split: str) -> Path:
    """The drift baseline of an evaluation run (``make evaluate`` calls it): its images and answers."""
    from serve_demo.core import schema

    images, detections = [], []
    for im in coco["images"]:
        if im["id"] not in payloads:
            continue
        images.append(image_features(folder / im["file_name"]))
        detections.append([(d.label, d.score) for d in schema.parse_detections(payloads[im["id"]])])
    classes = [c["name"] for c in coco["categories"]]
    counts = baseline_counts(images, detections, threshold, classes)
    out.mkdir(parents=True, exist_ok=True)
    return write_baseline(out, model, version, threshold, dataset, split, counts, len(images))


# ---------------------------------------------------------------------------------------- live window


class Prometheus:
    """The few calls of Prometheus' HTTP API that drift and the dashboard need."""

    def __init__(self, url: str, timeout: float = 10) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant vector (``[{"metric": ..., "value": [t, v]}]``)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self._get("/api/v1/query", params)

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        """A range matrix (``[{"metric": ..., "values": [[t, v], ...]}]``)."""
        return self._get("/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step})

    def _get(self, path: str, params: dict[str, Any]) -> list[dict]:
        expr = params["query"]
        try:
            r = requests.get(f"{self.url}{path}", params=params, timeout=self.timeout)
        except requests.RequestException as exc:
            raise DriftError(f"Prometheus at {self.url} does not answer ({exc}); start it "
                             "(docker/compose.yaml, or point --prometheus at yours)") from None
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != 200 or body.get("status") != "success":
            raise DriftError(f"Prometheus refused {expr!r}: {body.get('error', r.text[:200])}")
        return body["data"]["result"]

    def by_label(self, expr: str, label: str, at: float) -> dict[str, float]:
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in self.query(expr, at)}


class DriftError(RuntimeError):
    """Drift cannot be measured; the message says why and what to do."""


def selector(model: str, version: str) -> str:
    return f'ModelName="{model}",ModelVersion="{version}"'


def window_counts(prom: Prometheus, feature: Feature, model: str, version: str, start: float, end: float,
                  classes: list[str]) -> dict[str, float]:
    """A feature's binned counts between ``start`` and ``end``: counters' growth (reset-safe)."""
    sel = selector(model, version)
    if feature.label:
        expr = f"sum by ({feature.label}) ({{__name__=~\"{feature.metric}(_total)?\",{sel}}})"
        label = feature.label
    else:
        expr = f"sum by (le) ({feature.metric}_bucket{{{sel}}})"
        label = "le"
    later, earlier = prom.by_label(expr, label, end), prom.by_label(expr, label, start)
    grown = {k: (v - earlier.get(k, 0.0)) if v >= earlier.get(k, 0.0) else v for k, v in later.items()}
    bins = empty_bins(feature, classes)
    if feature.label:
        for k, v in grown.items():
            bins[k] = bins.get(k, 0.0) + v
        return bins
    cumulative = sorted(((math.inf if k == "+Inf" else float(k)), v) for k, v in grown.items())
    previous = 0.0
    for le, total in cumulative:  # cumulative "le" counts -> counts per bin
        bins[HIST_LABELS[bucket_index(le)]] = max(total - previous, 0.0)
        previous = total
    return bins


# ---------------------------------------------------------------------------------------- comparison


def psi(expected: dict[str, float], actual: dict[str, float], eps: float = 1e-4) -> float:
    """Population stability index of two binned counts (bins missing on one side count 0)."""
    keys = sorted(set(expected) | set(actual))
    e_total, a_total = sum(expected.values()), sum(actual.values())
    if e_total <= 0 or a_total <= 0:
        return 0.0
    value = 0.0
    for k in keys:
        e = max(expected.get(k, 0.0) / e_total, eps)
        a = max(actual.get(k, 0.0) / a_total, eps)
        value += (a - e) * math.log(a / e)
    return value


@dataclass
class FeatureDrift:
    feature: str
    psi: float
    level: str  # stable | shift | drift
    baseline: dict[str, float]
    live: dict[str, float]


def level_of(value: float, warn: float = WARN, fail: float = FAIL) -> str:
    return "drift" if value > fail else "shift" if value > warn else "stable"


def compare(baseline: dict[str, dict[str, float]], live: dict[str, dict[str, float]], warn: float = WARN,
            fail: float = FAIL) -> list[FeatureDrift]:
    out = []
    for f in FEATURES:
        value = psi(baseline[f.name], live[f.name])
        out.append(FeatureDrift(f.name, round(value, 4), level_of(value, warn, fail), baseline[f.name], live[f.name]))
    return out


def plot(out: Path, drifts: list[FeatureDrift]) -> Path:
    """Baseline vs live share per bin, one panel per feature -> drift.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(drifts), figsize=(4.2 * len(drifts), 3.6))
    for ax, d in zip(axes, drifts):
        keys = [k for k in d.baseline if d.baseline.get(k, 0) or d.live.get(k, 0)] or list(d.baseline)
        b_total, l_total = sum(d.baseline.values()) or 1, sum(d.live.values()) or 1
        xs = range(len(keys))
        ax.bar([x - 0.2 for x in xs], [d.baseline.get(k, 0) / b_total for k in keys], 0.4, label="baseline")
        ax.bar([x + 0.2 for x in xs], [d.live.get(k, 0) / l_total for k in keys], 0.4, label="live")
        ax.set_xticks(list(xs), keys, rotation=60, fontsize=7)
        color = {"stable": "black", "shift": "darkorange", "drift": "red"}[d.level]
        ax.set_title(f"{d.feature}: PSI {d.psi:.3f} ({d.level})", color=color, fontsize=10)
    axes[0].legend(fontsize=8)
    axes[0].set_ylabel("share")
    fig.tight_layout()
    path = out / "drift.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(out: Path, meta: dict, drifts: list[FeatureDrift]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "drift.json").write_text(json.dumps({**meta, "features": [asdict(d) for d in drifts]}, indent=1) + "\n")
    png = plot(out, drifts)
    lines = [f"# Drift of {meta['model']} {meta['version']}", "",
             f"- live window: {meta['window_start']} to {meta['window_end']} ({meta['live_images']} images)",
             f"- baseline: {meta['baseline']} ({meta['baseline_images']} images)",
             f"- PSI thresholds: shift > {meta['warn']}, drift > {meta['fail']}", "",
             "| feature | PSI | level | what |", "|---|---|---|---|"]
    desc = {f.name: f.description for f in FEATURES}
    lines += [f"| {d.feature} | {d.psi:.4f} | {d.level} | {desc[d.feature]} |" for d in drifts]
    lines += ["", f"![baseline vs live]({png.name})", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``2h``, ``1d`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if len(text) < 2 or text[-1] not in units or not text[:-1].replace(".", "", 1).isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m, 2h or 1d")
    return float(text[:-1]) * units[text[-1]]


def run(prometheus: str, model: str, version: str, baseline_path: Path, start: float, end: float, out: Path,
        warn: float = WARN, fail: float = FAIL, min_images: int = 50) -> tuple[int, list[FeatureDrift], Path]:
    """Measure drift; returns (exit code, per-feature results, report path).

    Raises:
        DriftError: no baseline, Prometheus unreachable, or too little traffic in the window.
    """
    if not baseline_path.is_file():
        raise DriftError(f"no baseline {baseline_path}: run `make evaluate NAME={model} VERSION={version}` "
                         "(it writes the baseline of the evaluation split)")
    base = json.loads(baseline_path.read_text())
    classes = list(base["features"]["class"])
    prom = Prometheus(prometheus)
    live = {f.name: window_counts(prom, f, model, version, start, end, classes) for f in FEATURES}
    images = int(round(sum(live["size"].values())))
    if images < min_images:
        raise DriftError(f"{images} images of {model} {version} in the window (fewer than --min-images "
                         f"{min_images}): widen the window, or wait for traffic")
    drifts = compare(base["features"], live, warn, fail)
    meta = {"model": model, "version": version, "prometheus": prometheus, "baseline": str(baseline_path),
            "baseline_images": base["images"], "live_images": images, "warn": warn, "fail": fail,
            "window_start": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start)),
            "window_end": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(end))}
    path = report(out, meta, drifts)
    return (1 if any(d.level == "drift" for d in drifts) else 0), drifts, path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=defaults.DEMO_NAME)
    p.add_argument("--version", default=defaults.VERSION, help="the served version whose baseline applies")
    p.add_argument("--prometheus", default=defaults.PROMETHEUS_URL, help="Prometheus scraping the server")
    p.add_argument("--window", type=parse_duration, default=parse_duration("1h"),
                   help="live window ending now (or at --end): 30m, 2h, 1d (default 1h)")
    p.add_argument("--end", type=float, default=None, help="window end, Unix seconds (default now)")
    p.add_argument("--baseline", default=None, help="default reports/MODEL-VERSION/drift_baseline.json")
    p.add_argument("--out", default=None, help="report folder (default reports/drift/MODEL-VERSION)")
    p.add_argument("--warn", type=float, default=WARN, help="PSI above which a feature has shifted (0.1)")
    p.add_argument("--fail", type=float, default=FAIL, help="PSI above which it has drifted: exit 1 (0.25)")
    p.add_argument("--min-images", type=int, default=50, help="fewer live images than this: exit 2")


def main(args: argparse.Namespace) -> int:
    end = args.end or time.time()
    baseline = Path(args.baseline or f"reports/{args.model}-{args.version}/{BASELINE_FILE}")
    out = Path(args.out or f"reports/drift/{args.model}-{args.version}")
    try:
        code, drifts, path = run(args.prometheus, args.model, args.version, baseline, end - args.window, end, out,
                                 args.warn, args.fail, args.min_images)
    except DriftError as exc:
        print(f"drift: {exc}", file=sys.stderr)
        return 2
    for d in drifts:
        print(f"  {d.feature:<11} PSI {d.psi:7.4f}  {d.level}")
    verdict = "DRIFT" if code else "no drift"
    print(f"{args.model} {args.version}: {verdict} (shift > {args.warn}, drift > {args.fail}); report: {path}")
    return code
