"""What a detector saw and answered, as metrics: one definition for every server, dashboard and drift check.

Per batch the worker records a :class:`BatchStats` (per image: size, brightness, the answered
detections; per refused request: its error type; stage times). :func:`emit` turns it into the
metrics of :data:`METRICS` through a *sink*: TorchServe's ``context.metrics`` in the handler
(declared in ``docker/metrics.yaml`` so they appear on ``:8082/metrics`` in Prometheus mode) or
``prometheus_client`` on the KServe server; the names and labels are the same on both.

The binned features (score, brightness, image size, detections per image, class) use the bins of
:data:`BINS`. ``make drift`` bins the evaluation baseline the same way, so the live counts read
from Prometheus and the baseline compare bin for bin. Labels stay low-cardinality: model,
version, class (from the label map), error type, stage, band.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

log = logging.getLogger(__name__)

# Prometheus' default histogram buckets: TorchServe 0.12's frontend builds every histogram with them
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
BANDS = tuple(f"{i / 10:.1f}-{(i + 1) / 10:.1f}" for i in range(10))  # ten equal bands of [0, 1]

MODEL_DIMS = ("ModelName", "ModelVersion")


class MetricSpec(NamedTuple):
    name: str
    kind: str  # counter | histogram (TorchServe: counter | gauge | histogram)
    unit: str
    dims: tuple[str, ...]
    help: str


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("DetectionsPerImage", "histogram", "Count", MODEL_DIMS,
               "detections answered per image (above the request's threshold)"),
    MetricSpec("DetectionsPerClass", "counter", "Count", (*MODEL_DIMS, "Class"),
               "detections answered, by class of the label map"),
    MetricSpec("DetectionScore", "histogram", "Score", MODEL_DIMS, "score of each answered detection"),
    MetricSpec("DetectionScoreBand", "counter", "Count", (*MODEL_DIMS, "Band"),
               "answered detections by score band (0.0-0.1 ... 0.9-1.0): the score distribution"),
    MetricSpec("ImageMegapixels", "histogram", "Megapixels", MODEL_DIMS, "size of each decoded image"),
    MetricSpec("ImageBrightnessBand", "counter", "Count", (*MODEL_DIMS, "Band"),
               "images by mean brightness band (0.0-0.1 ... 0.9-1.0)"),
    MetricSpec("RequestsRefused", "counter", "Count", (*MODEL_DIMS, "ErrorType"),
               "requests answered 4xx by the handler, by error type"),
    MetricSpec("StageSeconds", "histogram", "Seconds", (*MODEL_DIMS, "Stage"),
               "time per batch in each stage: decode, model, encode"),
    MetricSpec("BatchSize", "histogram", "Count", MODEL_DIMS, "requests per batch the worker received"),
    MetricSpec("HandlerSeconds", "histogram", "Seconds", MODEL_DIMS,
               "time the worker spent on a batch, all stages (p95 latency alert)"),
    MetricSpec("WorkerStarts", "counter", "Count", MODEL_DIMS, "workers that loaded the model (restarts show here)"),
    MetricSpec("CaptureSaved", "counter", "Count", MODEL_DIMS, "images kept for labelling (capture on)"),
    MetricSpec("CaptureDropped", "counter", "Count", (*MODEL_DIMS, "Reason"),
               "images chosen for capture but dropped: queue_full, limit, error"),
)
SPECS = {m.name: m for m in METRICS}


def band(value: float) -> str:
    """The band of a value in [0, 1] (1.0 goes to the top band)."""
    return BANDS[min(max(int(value * 10), 0), 9)]


def bucket_index(value: float, bounds: tuple[float, ...] = DEFAULT_BUCKETS) -> int:
    """Index of the first bucket ``le`` bound >= value (len(bounds) for +Inf)."""
    for i, b in enumerate(bounds):
        if value <= b:
            return i
    return len(bounds)


def bucket_labels(bounds: tuple[float, ...] = DEFAULT_BUCKETS) -> list[str]:
    """Human names of the histogram bins: ``<=0.005``, ``0.005-0.01``, ..., ``>10``."""
    labels, low = [], None
    for b in bounds:
        labels.append(f"<={b:g}" if low is None else f"{low:g}-{b:g}")
        low = b
    return [*labels, f">{bounds[-1]:g}"]


@dataclass
class ImageStats:
    """One answered image: what it looked like and what was answered for it."""

    width: int
    height: int
    brightness: float  # mean of all channels, 0-1
    labels: list[str] = field(default_factory=list)  # class names of the answered detections
    scores: list[float] = field(default_factory=list)


@dataclass
class BatchStats:
    """A batch as the worker saw it (see :meth:`serve_demo.core.worker.Worker.handle`)."""

    requests: int = 0
    images: list[ImageStats] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # error types of 4xx answers
    decode_s: float = 0.0
    model_s: float = 0.0
    encode_s: float = 0.0
    capture_saved: int = 0
    capture_dropped: dict[str, int] = field(default_factory=dict)


# What to feed the sinks: (metric, dimension values beyond the model's, value)
Sample = tuple[str, tuple[str, ...], float]


def samples(stats: BatchStats) -> list[Sample]:
    """The metric samples of one batch (counters as increments, histograms as observations)."""
    out: list[Sample] = [("BatchSize", (), float(stats.requests))]
    for stage, seconds in (("decode", stats.decode_s), ("model", stats.model_s), ("encode", stats.encode_s)):
        if seconds > 0:
            out.append(("StageSeconds", (stage,), seconds))
    out.append(("HandlerSeconds", (), stats.decode_s + stats.model_s + stats.encode_s))
    per_class: dict[str, int] = {}
    per_band: dict[str, int] = {}
    for im in stats.images:
        out.append(("DetectionsPerImage", (), float(len(im.scores))))
        out.append(("ImageMegapixels", (), im.width * im.height / 1e6))
        out.append(("ImageBrightnessBand", (band(im.brightness),), 1.0))
        for label, score in zip(im.labels, im.scores):
            per_class[label] = per_class.get(label, 0) + 1
            per_band[band(score)] = per_band.get(band(score), 0) + 1
            out.append(("DetectionScore", (), score))
    out += [("DetectionsPerClass", (label,), float(n)) for label, n in sorted(per_class.items())]
    out += [("DetectionScoreBand", (b,), float(n)) for b, n in sorted(per_band.items())]
    refused: dict[str, int] = {}
    for kind in stats.refused:
        refused[kind] = refused.get(kind, 0) + 1
    out += [("RequestsRefused", (kind,), float(n)) for kind, n in sorted(refused.items())]
    if stats.capture_saved:
        out.append(("CaptureSaved", (), float(stats.capture_saved)))
    out += [("CaptureDropped", (reason,), float(n)) for reason, n in sorted(stats.capture_dropped.items())]
    return out


Sink = Callable[[MetricSpec, tuple[str, ...], float], None]


def emit(stats: BatchStats, model: str, version: str, sink: Sink) -> None:
    """Send one batch's samples to ``sink``; a failing sink is logged, never raised (metrics never fail
    a request)."""
    try:
        for name, dims, value in samples(stats):
            sink(SPECS[name], (model, version, *dims), value)
    except Exception:  # noqa: BLE001 - observability must not break answers
        log.exception("metrics not emitted")
