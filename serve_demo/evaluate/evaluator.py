"""Evaluate a model on a COCO split, through the live endpoint or in-process from its archive.

Both paths use the same decoding, the same model code and the same response schema, so their
metrics agree; the served path measures what users get. Metrics come from pycocotools: the 12
standard bbox numbers, per-class AP, and F2 (recall-weighted F-beta) at IoU 0.5. The report
folder holds ``metrics.json``, ``report.md``, precision-recall and F2 curves, annotated samples, and
``drift_baseline.json`` (the split binned as ``make drift`` reads live traffic).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests

from serve_demo.core import defaults, schema
from serve_demo.core.imaging import load_rgb
from serve_demo.data.coco import load_coco, split_dir
from serve_demo.data.cocometrics import coco_metrics, f_beta_curve, image_errors, iou_types, matches_at_iou, pr_curves
from serve_demo.serve.client import DEFAULT_URL, PredictionError, predict_bytes
from serve_demo.serve.management import DEFAULT_MANAGEMENT_URL, Management, ManagementError, read_key

log = logging.getLogger(__name__)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dataset_checksum(folder: Path, coco: dict) -> str:
    """SHA-256 over the annotation file and every image of the split."""
    h = hashlib.sha256((folder / "_annotations.coco.json").read_bytes())
    for im in sorted(coco["images"], key=lambda i: i["id"]):
        h.update(sha256(folder / im["file_name"]).encode())
    return h.hexdigest()


def served_predictions(folder: Path, coco: dict, model: str, url: str, version: str | None,
                       concurrency: int = 4, token: str | None = None,
                       retries: int = 3) -> tuple[dict[int, Any], dict[int, str]]:
    """``{image_id: detailed payload}`` from the endpoint, and failures ``{image_id: reason}``."""
    from tqdm import tqdm

    local = threading.local()

    def one(im: dict) -> tuple[int, Any, str | None]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        data = (folder / im["file_name"]).read_bytes()
        attempt = 0
        while True:
            try:
                body = predict_bytes(data, model, url=url, version=version, threshold=0.0,
                                     response_format="detailed", token=token, session=local.session)
                return im["id"], body, None
            except requests.ConnectionError as exc:  # retried: the server may be restarting
                if attempt == retries:
                    return im["id"], None, f"connection: {exc}"
                time.sleep(0.5 * 2 ** attempt)
                attempt += 1
            except (PredictionError, requests.RequestException) as exc:
                return im["id"], None, str(exc)

    results, failures = {}, {}
    with ThreadPoolExecutor(concurrency) as pool:
        for image_id, body, err in tqdm(pool.map(one, coco["images"]), total=len(coco["images"]),
                                        desc=f"predict {model}", file=sys.stderr, unit="img"):
            if err:
                failures[image_id] = err
            else:
                results[image_id] = body
    return results, failures


def to_rows(payloads: dict[int, Any], coco: dict) -> list[dict]:
    """Detailed payloads as COCO result rows (label names matched to category ids)."""
    cat_by_name = {c["name"]: c["id"] for c in coco["categories"]}
    rows = []
    for image_id, payload in payloads.items():
        for d in schema.parse_detections(payload):
            if d.label not in cat_by_name:
                continue
            x1, y1, x2, y2 = d.box
            row = {"image_id": image_id, "category_id": cat_by_name[d.label], "score": d.score,
                   "bbox": [x1, y1, x2 - x1, y2 - y1]}
            if d.mask is not None:
                row["segmentation"] = d.mask
            if d.keypoints is not None:
                row["keypoints"] = [float(v) for x, y, _ in d.keypoints for v in (x, y, 1.0)]
            rows.append(row)
    return rows


def extra_iou_types(coco: dict, rows: list[dict]) -> list[str]:
    """``segm`` / ``keypoints`` when both the ground truth and the predictions carry them."""
    fields = {"segm": "segmentation", "keypoints": "keypoints"}
    return [t for t in iou_types(coco)[1:] if any(fields[t] in r for r in rows)]


def compute_metrics(coco: dict, rows: list[dict], serving_threshold: float) -> dict[str, Any]:
    """COCO numbers (bbox, plus segm / keypoints where both sides have them), per-class AP,
    PR curves and F2 at IoU 0.5 (boxes)."""
    overall = coco_metrics(coco, rows, "bbox")
    extra = {t: coco_metrics(coco, rows, t) for t in extra_iou_types(coco, rows)}
    per_class = {}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    for cat in coco["categories"]:
        if not any(a["category_id"] == cat["id"] for a in coco["annotations"]):
            continue
        sub = {**coco, "annotations": [a for a in coco["annotations"] if a["category_id"] == cat["id"]],
               "categories": [cat]}
        mine = [r for r in rows if r["category_id"] == cat["id"]]
        m = coco_metrics(sub, mine, "bbox")
        per_class[cat["name"]] = {"AP": m["mAP"], "AP50": m["mAP_50"]}
        for t in extra:
            mt = coco_metrics(sub, mine, t)
            per_class[cat["name"]].update({f"{t}_AP": mt["mAP"], f"{t}_AP50": mt["mAP_50"]})
    curves = {names[k]: {"recall": r.round(4).tolist(), "precision": p.round(4).tolist()}
              for k, (r, p) in pr_curves(coco, rows, 0.5).items() if names[k] in per_class}
    scores, tps, n_gt = matches_at_iou(coco, rows, 0.5)
    thr, f2, prec, rec = f_beta_curve(scores, tps, n_gt)
    _, f2s, ps, rs = f_beta_curve(scores, tps, n_gt, thresholds=np.array([serving_threshold]))
    best = int(np.argmax(f2)) if len(f2) else 0
    return {
        "coco": overall, **{f"coco_{t}": m for t, m in extra.items()}, "per_class": per_class,
        "f2": {"iou": 0.5, "threshold": serving_threshold, "f2": float(f2s[0]),
               "precision": float(ps[0]), "recall": float(rs[0]),
               "best_threshold": float(thr[best]), "best_f2": float(f2[best]) if len(f2) else 0.0},
        "f2_curve": {"thresholds": thr.tolist(), "f2": f2.tolist(), "precision": prec.tolist(),
                     "recall": rec.tolist()},
        "pr_curves_iou50": curves,
    }


def subset(coco: dict, limit: int | None) -> dict:
    """The first ``limit`` images of a split (by id) with their annotations; all when None."""
    if not limit or limit >= len(coco["images"]):
        return coco
    images = sorted(coco["images"], key=lambda i: i["id"])[:limit]
    ids = {im["id"] for im in images}
    return {**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}


def pick_samples(coco: dict, rows: list[dict], threshold: float, n: int = 6) -> list[tuple[dict, int, int]]:
    """Images worth looking at: the ones with the most errors at the threshold, then clean ones.

    Returns ``[(image, false positives, missed)]``: up to ``n - n // 3`` with errors, the rest without.
    """
    errors = image_errors(coco, rows, threshold)
    by_id = {im["id"]: im for im in coco["images"]}
    ranked = sorted(by_id, key=lambda i: (-(errors[i][0] + errors[i][1]), i))
    bad = [i for i in ranked if sum(errors[i]) > 0][: n - n // 3]
    clean = [i for i in sorted(by_id) if sum(errors[i]) == 0][: n - len(bad)]
    return [(by_id[i], *errors[i]) for i in bad + clean]


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def write_samples(out: Path, folder: Path, coco: dict, payloads: dict[int, Any], rows: list[dict],
                  threshold: float, n: int = 6) -> list[tuple[str, str]]:
    """Annotated sample images under ``out/samples``; returns ``[(relative path, caption)]``."""
    from .plots import draw_sample

    names = {c["id"]: c["name"] for c in coco["categories"]}
    (out / "samples").mkdir(parents=True, exist_ok=True)
    written = []
    for im, fp, fn in pick_samples(coco, rows, threshold, n):
        truth = []
        for a in coco["annotations"]:
            if a["image_id"] == im["id"]:
                x, y, w, h = a["bbox"]
                truth.append(schema.Detection(names[a["category_id"]], a["category_id"], 1.0, (x, y, x + w, y + h)))
        predicted = [d for d in schema.parse_detections(payloads.get(im["id"], {"detections": []}))
                     if d.score >= threshold]
        caption = (f"{im['file_name']}: {plural(len(truth), 'object')}, {plural(fp, 'false positive')}, "
                   f"{fn} missed")
        rel = f"samples/{Path(im['file_name']).stem}.png"
        draw_sample(load_rgb(folder / im["file_name"]), truth, predicted, caption).save(out / rel)
        written.append((rel, caption))
    return written


def write_report(out: Path, result: dict, samples: list[tuple[str, str]] | None = None) -> None:
    """``metrics.json``, ``report.md``, ``pr_curves.png`` and ``f2_threshold.png`` in ``out``."""
    from .plots import plot_f2, plot_pr_curves

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    m = result["metrics"]
    c, f2 = m["coco"], m["f2"]
    title = f"{result['model']} {result['version']} ({result['mode']})"
    curves = {k: (np.asarray(v["recall"]), np.asarray(v["precision"])) for k, v in m["pr_curves_iou50"].items()}
    plot_pr_curves(curves, {k: v["AP50"] for k, v in m["per_class"].items()}, title, out / "pr_curves.png")
    plot_f2(m["f2_curve"], f2["threshold"], f2["best_threshold"], title, out / "f2_threshold.png")
    failures = result["failures"]
    lines = [f"# {result['model']} {result['version']} on {result['dataset']} ({result['split']})", "",
             f"- mode: {result['mode']}" + (f" ({result['url']})" if result.get("url") else ""),
             f"- images: {result['images']}, failures: {len(failures)}, time: {result['seconds']} s",
             f"- archive: `{result.get('archive') or '-'}` sha256 `{(result.get('archive_sha256') or '-')[:16]}`",
             f"- dataset sha256 `{result['dataset_sha256'][:16]}`; serving threshold {result['threshold']}", "",
             "## COCO bbox metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in c.items()]
    for t, title_t in (("segm", "segm (instance masks)"), ("keypoints", "keypoints (OKS)")):
        if f"coco_{t}" in m:
            lines += ["", f"## COCO {title_t} metrics", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4f} |" for k, v in m[f"coco_{t}"].items()]
    lines += ["", "## F2 at IoU 0.5 (recall weighted)", "",
              "| threshold | F2 | precision | recall |", "|---|---|---|---|",
              f"| {f2['threshold']:.2f} (serving) | {f2['f2']:.4f} | {f2['precision']:.4f} | {f2['recall']:.4f} |"]
    i = int(np.argmin(np.abs(np.asarray(m["f2_curve"]["thresholds"]) - f2["best_threshold"])))
    lines += [f"| {f2['best_threshold']:.2f} (best) | {f2['best_f2']:.4f} | {m['f2_curve']['precision'][i]:.4f} "
              f"| {m['f2_curve']['recall'][i]:.4f} |", "", "![F2 vs threshold](f2_threshold.png)", "",
              "## Per class", ""]
    extra = [t for t in ("segm", "keypoints") if f"coco_{t}" in m]
    lines += ["| class | AP@[.5:.95] | AP@0.5 |" + "".join(f" {t} AP | {t} AP@0.5 |" for t in extra),
              "|---|---|---|" + "---|---|" * len(extra)]
    lines += [f"| {n} | {v['AP']:.4f} | {v['AP50']:.4f} |"
              + "".join(f" {v[t + '_AP']:.4f} | {v[t + '_AP50']:.4f} |" for t in extra)
              for n, v in m["per_class"].items()]
    lines += ["", "![Precision-recall per class](pr_curves.png)", ""]
    if samples:
        lines += ["## Samples", "",
                  f"Thin green: ground truth. Thick, coloured, captioned: predictions scoring at least "
                  f"{result['threshold']}. The images with the most errors come first.", ""]
        lines += [f"**{cap}**\n\n![{cap}]({rel})\n" for rel, cap in samples]
    if failures:
        lines += ["## Failed requests", "", "| image id | reason |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in list(failures.items())[:50]]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def resolve_served(model: str, version: str | None, management: Management | None,
                   store: Path) -> tuple[str | None, Path | None]:
    """The version and archive file the server answers ``model[/version]`` with (None if unknown)."""
    if management is None:
        return version, None
    try:
        desc = management.describe(model, version)
    except ManagementError as exc:
        if exc.status == 404:
            raise
        log.warning("cannot ask the management API which archive serves %s: %s", model, exc)
        return version, None
    url = Path(desc.get("modelUrl", ""))
    archive = url if url.is_absolute() else store / url
    return str(desc["modelVersion"]), archive if archive.is_file() else None


def cached_result(out: Path, expected: dict) -> dict | None:
    """A previous ``metrics.json`` in ``out`` made from the same archive, data and settings."""
    path = out / "metrics.json"
    if not path.is_file() or not expected.get("archive_sha256"):
        return None
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return None
    keys = ("mode", "archive_sha256", "dataset_sha256", "split", "images", "threshold")
    if all(old.get(k) == expected.get(k) for k in keys) and not old.get("failures"):
        return old
    return None


def evaluate(dataset: str | Path, split: str = "test", *, model: str = defaults.DEMO_NAME, version: str | None = None,
             url: str = DEFAULT_URL, management: Management | None = None, store: Path = Path(defaults.MODEL_STORE),
             offline: Path | None = None, archive: Path | None = None, concurrency: int = 4,
             threshold: float = defaults.THRESHOLD, limit: int | None = None, out: Path | None = None,
             reuse: bool = False, samples: int = 6, token: str | None = None) -> dict:
    """Evaluate one model version (served, or ``offline`` from an archive) and write its report.

    With ``reuse``, a report in the output folder made from the same archive checksum, dataset
    checksum, split, image count and threshold is returned instead of predicting again.

    Raises:
        ManagementError: the server does not know ``model``/``version`` (404).
    """
    folder = split_dir(dataset, split)
    coco = subset(load_coco(dataset, split), limit)
    base = {"mode": "offline" if offline else "served", "dataset": str(dataset), "split": split,
            "images": len(coco["images"]), "limit": limit, "dataset_sha256": dataset_checksum(folder, coco),
            "threshold": threshold}
    if offline:
        archive = Path(offline)
        with contextlib.redirect_stdout(io.StringIO()):
            from serve_demo.core.worker import Worker

            local = Worker.from_archive(archive)
        name, version = local.name, local.version
    else:
        name = model
        version, found = resolve_served(model, version, management, Path(store))
        archive = found or (Path(archive) if archive else None)
        base["url"] = url
    base["archive"] = str(archive) if archive else None
    base["archive_sha256"] = sha256(archive) if archive and archive.is_file() else None
    if version:
        out = Path(out or f"reports/{name}-{version}{'-offline' if offline else ''}")
        if reuse and (old := cached_result(out, base)):
            log.info("%s %s: reusing %s (same archive, data and settings)", name, version, out / "metrics.json")
            return old
    t0 = time.time()
    if offline:
        from tqdm import tqdm

        payloads, failures = {}, {}
        for im in tqdm(coco["images"], desc=f"predict {name} {version} offline", file=sys.stderr, unit="img"):
            payloads[im["id"]] = local.predict((folder / im["file_name"]).read_bytes(), threshold=0.0)
    else:
        payloads, failures = served_predictions(folder, coco, model, url, version, concurrency, token=token)
        first = next(iter(payloads.values()), {})
        version = version or first.get("version", "unknown")
    out = Path(out or f"reports/{name}-{version}")
    rows = to_rows(payloads, coco)
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = compute_metrics(coco, rows, threshold)
        picked = write_samples(out, folder, coco, payloads, rows, threshold, samples) if samples else []
    result = {"model": name, "version": version, **base, "seconds": round(time.time() - t0, 1),
              "failures": failures, "metrics": metrics, "report": str(out)}
    write_report(out, result, picked)
    from serve_demo.monitor.drift import baseline_from_evaluation

    baseline_from_evaluation(out, folder, coco, payloads, threshold, name, version, str(dataset), split)
    return result


def summary_line(result: dict) -> str:
    m = result["metrics"]
    c, f2 = m["coco"], m["f2"]
    extra = "".join(f"  {t} mAP {m[f'coco_{t}']['mAP']:.4f}  {t} mAP@0.5 {m[f'coco_{t}']['mAP_50']:.4f}"
                    for t in ("segm", "keypoints") if f"coco_{t}" in m)
    return (f"{result['model']} {result['version']} ({result['mode']}, {result['split']}, {result['images']} images, "
            f"{len(result['failures'])} failures): mAP {c['mAP']:.4f}  mAP@0.5 {c['mAP_50']:.4f}  "
            f"mAP@0.75 {c['mAP_75']:.4f}{extra}  F2@0.5 {f2['f2']:.4f} (thr {f2['threshold']:.2f}; best "
            f"{f2['best_f2']:.4f} at {f2['best_threshold']:.2f})")


def add_dataset_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by evaluate, promote and compare."""
    p.add_argument("--dataset", default=defaults.DEMO_DATA, help="COCO-format folder (train/ valid/ test/)")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images of the split")
    p.add_argument("--url", default=DEFAULT_URL, help="inference API")
    p.add_argument("--management-url", default=DEFAULT_MANAGEMENT_URL,
                   help="management API (finds the archive behind a version)")
    p.add_argument("--token", default=None, help="management token (default: HOME/key_file.json if present)")
    p.add_argument("--inference-token", default=os.environ.get("TS_INFERENCE_TOKEN"),
                   help="inference token (default: HOME/key_file.json if present)")
    p.add_argument("--home", default=defaults.HOME, help="the server's state folder (its key_file.json)")
    p.add_argument("--model-store", default=defaults.MODEL_STORE)
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--threshold", type=float, default=defaults.THRESHOLD, help="serving threshold for F2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_dataset_arguments(p)
    p.add_argument("--model", default=defaults.DEMO_NAME, help="served model name")
    p.add_argument("--version", default=None, help="served model version (default: the default one)")
    p.add_argument("--offline", metavar="MAR", default=None,
                   help="evaluate this archive in-process instead of through the endpoint")
    p.add_argument("--archive", default=None, help="archive whose checksum the report records "
                   "(default: the one the management API names)")
    p.add_argument("--samples", type=int, default=6, help="annotated sample images in the report")
    p.add_argument("--out", default=None, help="report folder (default reports/MODEL-VERSION[-offline])")


def inference_token(args: argparse.Namespace) -> str | None:
    return args.inference_token or read_key(args.home, "inference")


def management_from_args(args: argparse.Namespace) -> Management:
    return Management(args.management_url, token=args.token, home=args.home)


def main(args: argparse.Namespace) -> int:
    mgmt = None if args.offline else management_from_args(args)
    try:
        result = evaluate(args.dataset, args.split, model=args.model, version=args.version, url=args.url,
                          management=mgmt, store=Path(args.model_store),
                          offline=Path(args.offline) if args.offline else None,
                          archive=Path(args.archive) if args.archive else None, concurrency=args.concurrency,
                          threshold=args.threshold, limit=args.limit,
                          out=Path(args.out) if args.out else None, samples=args.samples,
                          token=inference_token(args))
    except ManagementError as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    print(summary_line(result))
    print(f"report: {Path(result['report']) / 'report.md'}")
    return 1 if result["failures"] else 0
