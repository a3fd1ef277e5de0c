"""Opt-in capture of the images a model is least sure about, with its predictions, for labelling.

Off unless the archive's ``model-config.yaml`` says ``handler: {capture: {enabled: true, ...}}``
(``make archive CAPTURE=1``): keeping users' images is a privacy decision recorded with the model
version, not a server flag (docs/monitoring.md). When on, an image is a candidate when one of the
model's raw scores lies in the uncertain band ``[low, high)`` (default 0.3-0.7) or nothing reaches
the answer threshold; ``rate`` of the candidates are kept. The request thread only puts a
reference on a bounded queue (``put_nowait``): when the queue is full the image is dropped and
counted, so capture never slows or fails a request. One writer thread per worker encodes the
JPEG and appends one JSON line of predictions (COCO ``xywh`` boxes, category ids of the label map)
to ``predictions-PID.jsonl``. At most ``max_images`` files are kept per model version; files
older than ``retention_days`` are deleted at worker start and by ``make collect``.

Where: ``$SERVE_DEMO_CAPTURE_DIR``, else ``capture/`` beside the server's ``logs/`` folder
(``build/server/capture`` locally, ``/home/model-server/run/capture`` in the image), then
``NAME-VERSION/``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CAPTURE_ENV = "SERVE_DEMO_CAPTURE_DIR"


@dataclass
class CaptureConfig:
    """The ``handler.capture`` section of ``model-config.yaml``."""

    enabled: bool = False
    rate: float = 0.1  # share of the uncertain images kept
    low: float = 0.3  # a raw score in [low, high) makes an image uncertain
    high: float = 0.7
    max_images: int = 1000  # per model version; later candidates are dropped ("limit")
    retention_days: float = 7.0
    queue: int = 16  # images waiting for the writer; more are dropped ("queue_full")
    dir: str = ""  # "" -> $SERVE_DEMO_CAPTURE_DIR, else capture/ beside the server's logs/

    @classmethod
    def from_yaml(cls, section: Any) -> CaptureConfig:
        if section is None:
            return cls()
        if not isinstance(section, dict):
            raise ValueError("model-config.yaml handler.capture must be a mapping (enabled, rate, low, high, ...)")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"model-config.yaml handler.capture: unknown keys {unknown}; known: {sorted(known)}")
        cfg = cls(**section)
        if not (0 <= cfg.rate <= 1 and 0 <= cfg.low < cfg.high <= 1):
            raise ValueError("model-config.yaml handler.capture: need 0 <= rate <= 1 and 0 <= low < high <= 1")
        if int(cfg.max_images) < 1 or int(cfg.queue) < 1 or cfg.retention_days <= 0:
            raise ValueError("model-config.yaml handler.capture: max_images and queue >= 1, retention_days > 0")
        return cfg


def capture_root(cfg: CaptureConfig) -> Path:
    """Where captures go: the config's dir, ``$SERVE_DEMO_CAPTURE_DIR``, or ``capture/`` beside ``logs/``."""
    if cfg.dir:
        return Path(cfg.dir)
    if os.environ.get(CAPTURE_ENV):
        return Path(os.environ[CAPTURE_ENV])
    logs = os.environ.get("LOG_LOCATION")
    return Path(logs).parent / "capture" if logs else Path("capture")


def uncertainty(scores: list[float], threshold: float, low: float, high: float) -> float | None:
    """How unsure the model is about an image, in (0, 1], or None when it is sure.

    Uncertain: a raw score in ``[low, high)`` (1 when a score sits on the threshold, less further
    away), or no score reaching the threshold (0.5).
    """
    band = [s for s in scores if low <= s < high]
    if band:
        return max(1e-3, 1 - min(abs(s - threshold) for s in band) / max(high - low, 1e-6))
    if not any(s >= threshold for s in scores):
        return 0.5
    return None


@dataclass
class _Item:
    image: torch.Tensor  # uint8 CHW, on the CPU
    detections: list[dict]
    threshold: float
    uncertainty: float


@dataclass
class Capturer:
    """One worker's capture: selection on the request thread, writing on its own thread."""

    cfg: CaptureConfig
    model: str
    version: str
    names: dict[int, str]
    root: Path = field(init=False)
    saved: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.root = capture_root(self.cfg) / f"{self.model}-{self.version}"
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        labels = self.root / "labels.json"
        if not labels.exists():
            labels.write_text(json.dumps({str(k): v for k, v in sorted(self.names.items())}, indent=1))
        prune(self.root, self.cfg.retention_days)
        self.saved = sum(1 for _ in (self.root / "images").glob("*.jpg"))
        self.queue: queue.Queue[_Item] = queue.Queue(maxsize=int(self.cfg.queue))
        self.lines = self.root / f"predictions-{os.getpid()}.jsonl"
        self.thread = threading.Thread(target=self._write_loop, name="capture-writer", daemon=True)
        self.thread.start()
        log.info("capture on: %.0f %% of uncertain images (scores %.2f-%.2f) -> %s (at most %d, %g days)",
                 self.cfg.rate * 100, self.cfg.low, self.cfg.high, self.root, self.cfg.max_images,
                 self.cfg.retention_days)

    def offer(self, image: torch.Tensor, output: dict[str, torch.Tensor], threshold: float) -> str | None:
        """Consider one answered image: ``"saved"`` (queued), a drop reason, or None (not chosen)."""
        scores = output["scores"].tolist()
        u = uncertainty(scores, threshold, self.cfg.low, self.cfg.high)
        if u is None or random.random() >= self.cfg.rate:
            return None
        if self.saved >= self.cfg.max_images:
            return "limit"
        keep = [i for i, s in enumerate(scores) if s >= self.cfg.low]
        boxes = output["boxes"][keep].tolist()
        labels = output["labels"][keep].tolist()
        dets = [{"category_id": int(c), "label": self.names.get(int(c), str(int(c))),
                 "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                 "score": round(scores[i], 4)}
                for i, (x1, y1, x2, y2), c in zip(keep, boxes, labels)]
        try:
            self.queue.put_nowait(_Item(image.detach().to("cpu", non_blocking=False), dets, threshold, u))
        except queue.Full:
            return "queue_full"
        self.saved += 1
        return "saved"

    def _write_loop(self) -> None:
        from PIL import Image

        n = 0
        while True:
            item = self.queue.get()
            try:
                n += 1
                name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{n:06d}.jpg"
                arr = item.image.permute(1, 2, 0).numpy()
                Image.fromarray(arr).save(self.root / "images" / name, quality=95)
                line = {"file": f"images/{name}", "width": int(arr.shape[1]), "height": int(arr.shape[0]),
                        "time": time.time(), "model": self.model, "version": self.version,
                        "threshold": item.threshold, "uncertainty": round(item.uncertainty, 4),
                        "detections": item.detections}
                with open(self.lines, "a") as f:
                    f.write(json.dumps(line) + "\n")
            except Exception:  # noqa: BLE001 - a failed write loses one capture, nothing else
                log.exception("capture: could not write an image")
            finally:
                self.queue.task_done()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until the queued images are written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self.queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)


def prune(root: Path, retention_days: float) -> int:
    """Delete captured images older than ``retention_days``; returns how many."""
    cutoff = time.time() - retention_days * 86400
    gone = 0
    for img in (root / "images").glob("*.jpg"):
        try:
            if img.stat().st_mtime < cutoff:
                img.unlink()
                gone += 1
        except OSError:
            pass
    return gone
