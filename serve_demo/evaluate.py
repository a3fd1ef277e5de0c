"""Evaluate a model on a COCO split, through the live endpoint or in-process from its archive.

Both paths use the same decoding, the same model code and the same response schema, so their
metrics agree; the served path measures what users get. Metrics come from pycocotools: the 12
standard bbox numbers, per-class AP, and F2 (recall-weighted F-beta) at IoU 0.5.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests

from . import schema
from .client import DEFAULT_URL, PredictionError, predict_bytes
from .cocometrics import coco_bbox_metrics, f_beta_curve, matches_at_iou
from .data import load_coco, split_dir

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


class ArchiveModel:
    """An archive's model loaded in-process, answering like the handler does."""

    def __init__(self, mar: Path) -> None:
        import torch
        import yaml

        from .serving import LABEL_FILE, HandlerConfig, load_detector, read_label_map

        self._tmp = tempfile.TemporaryDirectory(prefix="serve_demo_mar_")
        root = Path(self._tmp.name)
        with zipfile.ZipFile(mar) as z:
            z.extractall(root)
        manifest = json.loads((root / "MAR-INF" / "MANIFEST.json").read_text())["model"]
        config = yaml.safe_load((root / manifest["configFile"]).read_text()) if manifest.get("configFile") else {}
        self.cfg = HandlerConfig.from_yaml((config or {}).get("handler"))
        self.name, self.version = manifest["modelName"], str(manifest.get("modelVersion", "1.0"))
        self.names = read_label_map(root / LABEL_FILE)
        self.device = torch.device("cpu")
        sys.path.insert(0, str(root))
        try:
            self.model = load_detector(root, manifest.get("serializedFile"), manifest.get("modelFile"),
                                       self.cfg, len(self.names), self.device)
        finally:
            sys.path.remove(str(root))

    def predict(self, data: bytes, threshold: float = 0.0) -> dict:
        """Detailed payload for one encoded image, computed like the served path."""
        from .imaging import decode_image
        from .serving import Request, format_output, run_detector

        req = Request(decode_image(data, self.cfg.max_image_pixels), threshold, "detailed")
        out = run_detector(self.model, [req.image], self.device)[0]
        return format_output(out, req, self.names, self.name, self.version)


def to_rows(payloads: dict[int, Any], coco: dict) -> list[dict]:
    """Detailed payloads as COCO result rows (label names matched to category ids)."""
    cat_by_name = {c["name"]: c["id"] for c in coco["categories"]}
    rows = []
    for image_id, payload in payloads.items():
        for d in schema.parse_detections(payload):
            if d.label not in cat_by_name:
                continue
            x1, y1, x2, y2 = d.box
            rows.append({"image_id": image_id, "category_id": cat_by_name[d.label], "score": d.score,
                         "bbox": [x1, y1, x2 - x1, y2 - y1]})
    return rows


def compute_metrics(coco: dict, rows: list[dict], serving_threshold: float) -> dict[str, Any]:
    """COCO numbers, per-class AP and F2 at IoU 0.5."""
    overall = coco_bbox_metrics(coco, rows)
    per_class = {}
    for cat in coco["categories"]:
        if not any(a["category_id"] == cat["id"] for a in coco["annotations"]):
            continue
        sub = {**coco, "annotations": [a for a in coco["annotations"] if a["category_id"] == cat["id"]],
               "categories": [cat]}
        m = coco_bbox_metrics(sub, [r for r in rows if r["category_id"] == cat["id"]])
        per_class[cat["name"]] = {"AP": m["mAP"], "AP50": m["mAP_50"]}
    scores, tps, n_gt = matches_at_iou(coco, rows, 0.5)
    thr, f2, prec, rec = f_beta_curve(scores, tps, n_gt)
    _, f2s, ps, rs = f_beta_curve(scores, tps, n_gt, thresholds=np.array([serving_threshold]))
    best = int(np.argmax(f2)) if len(f2) else 0
    return {
        "coco": overall, "per_class": per_class,
        "f2": {"iou": 0.5, "threshold": serving_threshold, "f2": float(f2s[0]),
               "precision": float(ps[0]), "recall": float(rs[0]),
               "best_threshold": float(thr[best]), "best_f2": float(f2[best]) if len(f2) else 0.0},
        "f2_curve": {"thresholds": thr.tolist(), "f2": f2.tolist(), "precision": prec.tolist(),
                     "recall": rec.tolist()},
    }


def write_report(out: Path, result: dict) -> None:
    """``metrics.json`` and ``report.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    c, f2 = result["metrics"]["coco"], result["metrics"]["f2"]
    lines = [f"# {result['model']} {result['version']} on {result['dataset']} ({result['split']})", "",
             f"Mode: {result['mode']}; {result['images']} images, {len(result['failures'])} failures; "
             f"archive sha256 `{(result.get('archive_sha256') or '-')[:16]}`, dataset sha256 "
             f"`{result['dataset_sha256'][:16]}`.", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in c.items()]
    lines += [f"| F2@0.5 (threshold {f2['threshold']:.2f}) | {f2['f2']:.4f} |",
              f"| best F2@0.5 (threshold {f2['best_threshold']:.2f}) | {f2['best_f2']:.4f} |", "",
              "| class | AP | AP50 |", "|---|---|---|"]
    lines += [f"| {n} | {v['AP']:.4f} | {v['AP50']:.4f} |" for n, v in result["metrics"]["per_class"].items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="COCO-format folder")
    p.add_argument("--split", default="test")
    p.add_argument("--model", default="shapes", help="served model name")
    p.add_argument("--version", default=None, help="served model version (default: the default one)")
    p.add_argument("--url", default=DEFAULT_URL)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--threshold", type=float, default=0.5, help="serving threshold for F2")
    p.add_argument("--offline", metavar="MAR", default=None,
                   help="evaluate this archive in-process instead of through the endpoint")
    p.add_argument("--archive", default=None, help="archive whose checksum the report records")
    p.add_argument("--out", default=None, help="report folder (default reports/MODEL-VERSION[-offline])")


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    folder = split_dir(args.dataset, args.split)
    coco = load_coco(args.dataset, args.split)
    t0 = time.time()
    if args.offline:
        model = ArchiveModel(Path(args.offline))
        payloads, failures = {}, {}
        for im in tqdm(coco["images"], desc="predict offline", file=sys.stderr, unit="img"):
            payloads[im["id"]] = model.predict((folder / im["file_name"]).read_bytes())
        name, version, archive = model.name, model.version, Path(args.offline)
    else:
        payloads, failures = served_predictions(folder, coco, args.model, args.url, args.version,
                                                args.concurrency)
        first = next(iter(payloads.values()), {})
        name, version = first.get("model", args.model), first.get("version", args.version or "?")
        archive = Path(args.archive) if args.archive else None
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = compute_metrics(coco, to_rows(payloads, coco), args.threshold)
    result = {"model": name, "version": version, "mode": "offline" if args.offline else "served",
              "dataset": str(args.dataset), "split": args.split, "images": len(coco["images"]),
              "dataset_sha256": dataset_checksum(folder, coco),
              "archive_sha256": sha256(archive) if archive and archive.exists() else None,
              "threshold": args.threshold, "seconds": round(time.time() - t0, 1),
              "failures": failures, "metrics": metrics}
    out = Path(args.out or f"reports/{name}-{version}{'-offline' if args.offline else ''}")
    write_report(out, result)
    c, f2 = metrics["coco"], metrics["f2"]
    print(f"{name} {version} ({result['mode']}, {args.split}, {len(coco['images'])} images, "
          f"{len(failures)} failures): mAP {c['mAP']:.4f}  mAP@0.5 {c['mAP_50']:.4f}  "
          f"mAP@0.75 {c['mAP_75']:.4f}  F2@0.5 {f2['f2']:.4f} (thr {f2['threshold']:.2f}; best "
          f"{f2['best_f2']:.4f} at {f2['best_threshold']:.2f})")
    print(f"report: {out / 'report.md'}")
    return 1 if failures else 0
