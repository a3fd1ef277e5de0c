"""The operators' dashboard, defined once: Grafana JSON for ``docker/compose.yaml``, and a PNG drawn
from a live Prometheus (``make dashboard``) where no Grafana runs.

Every panel is PromQL over the metric names of TorchServe 0.12 and :mod:`serve_demo.core.observe`;
``docker/grafana/dashboards/serve-demo.json`` is generated from :data:`PANELS` (a test checks the
committed file is current, and that every query parses in a real Prometheus).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from serve_demo.core import defaults

from .drift import DriftError, Prometheus

GRAFANA_JSON = Path("docker/grafana/dashboards/serve-demo.json")


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str  # Grafana unit id
    kind: str = "timeseries"  # timeseries | bars (latest values, one bar per series)


def _mean(sum_expr: str, count_expr: str) -> str:
    return f"{sum_expr} / {count_expr}"


PANELS: tuple[Panel, ...] = (
    Panel("Throughput (requests/s)", (
        Query("sum by (model_name) (rate(ts_inference_requests_total[1m]))", "{{model_name}}"),), "reqps"),
    Panel("Latency (ms)", (
        Query("sum(rate(ts_inference_latency_microseconds[1m])) / sum(rate(ts_inference_requests_total[1m])) / 1000",
              "mean, end to end"),
        Query("1000 * histogram_quantile(0.5, sum by (le) (rate(HandlerSeconds_bucket[1m])))", "worker p50"),
        Query("1000 * histogram_quantile(0.95, sum by (le) (rate(HandlerSeconds_bucket[1m])))", "worker p95"),
        Query("1000 * histogram_quantile(0.99, sum by (le) (rate(HandlerSeconds_bucket[1m])))", "worker p99")), "ms"),
    Panel("Errors by type (/s)", (
        Query("sum by (ErrorType) (rate(RequestsRefused[1m]))", "{{ErrorType}}"),
        Query("sum(rate(Requests5XX[1m]))", "5xx")), "reqps"),
    Panel("Detections per class (/s)", (
        Query("sum by (Class) (rate(DetectionsPerClass[1m]))", "{{Class}}"),), "short"),
    Panel("Score distribution (last hour)", (
        Query("sum by (Band) (increase(DetectionScoreBand[1h]))", "{{Band}}"),), "short", "bars"),
    Panel("Time per stage (ms per batch)", (
        Query("1000 * sum by (Stage) (rate(StageSeconds_sum[1m])) / sum by (Stage) (rate(StageSeconds_count[1m]))",
              "{{Stage}}"),), "ms"),
    Panel("Detections per image (mean)", (
        Query(_mean("sum(rate(DetectionsPerImage_sum[5m]))", "sum(rate(DetectionsPerImage_count[5m]))"), "mean"),),
        "short"),
    Panel("Image brightness (last hour)", (
        Query("sum by (Band) (increase(ImageBrightnessBand[1h]))", "{{Band}}"),), "short", "bars"),
    Panel("Batch size and image size (mean)", (
        Query(_mean("sum(rate(BatchSize_sum[5m]))", "sum(rate(BatchSize_count[5m]))"), "requests per batch"),
        Query(_mean("sum(rate(ImageMegapixels_sum[5m]))", "sum(rate(ImageMegapixels_count[5m]))"), "megapixels")),
        "short"),
    # serve_demo stream's page (make stream), scraped beside the server
    Panel("Streams: frames/s in and answered", (
        Query("sum by (source) (rate(stream_frames_in_total[1m]))", "{{source}} in"),
        Query("sum by (source) (rate(stream_frames_processed_total[1m]))", "{{source}} answered"),
        Query("sum by (source) (rate(stream_frames_dropped_total[1m]))", "{{source}} dropped")), "short"),
    Panel("Streams: capture to answer (ms)", (
        Query("1000 * histogram_quantile(0.5, sum by (source, le) (rate(stream_latency_seconds_bucket[1m])))",
              "{{source}} p50"),
        Query("1000 * histogram_quantile(0.95, sum by (source, le) (rate(stream_latency_seconds_bucket[1m])))",
              "{{source}} p95")), "ms"),
    Panel("Streams: line crossings (last hour)", (
        Query("sum by (source, line, direction) (increase(stream_line_crossings_total[1h]))",
              "{{source}} {{line}} {{direction}}"),), "short", "bars"),
)


def grafana_json() -> dict:
    """The Grafana dashboard (schema 39) for PANELS, on a Prometheus datasource with uid ``prometheus``."""
    panels = []
    for i, p in enumerate(PANELS):
        ds = {"type": "prometheus", "uid": "prometheus"}
        targets = [{"datasource": ds, "expr": q.expr, "legendFormat": q.legend, "refId": chr(65 + j),
                    **({"instant": True, "range": False} if p.kind == "bars" else {})}
                   for j, q in enumerate(p.queries)]
        panel = {"id": i + 1, "title": p.title, "type": "bargauge" if p.kind == "bars" else "timeseries",
                 "datasource": ds, "targets": targets, "gridPos": {"h": 8, "w": 8, "x": (i % 3) * 8, "y": (i // 3) * 8},
                 "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []}}
        if p.kind == "bars":
            panel["options"] = {"orientation": "vertical", "displayMode": "basic", "showUnfilled": False}
        panels.append(panel)
    return {"uid": "serve-demo", "title": "serve_demo: detector serving", "schemaVersion": 39, "version": 1,
            "editable": True, "refresh": "10s", "time": {"from": "now-1h", "to": "now"}, "tags": ["serve_demo"],
            "templating": {"list": []}, "annotations": {"list": []}, "panels": panels}


def write_grafana(path: Path = GRAFANA_JSON) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(grafana_json(), indent=1) + "\n")
    return path


def legend(template: str, labels: dict) -> str:
    out = template
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    return out


def render(prometheus: str, out: Path, minutes: float = 30, end: float | None = None, step: float = 5) -> Path:
    """Draw PANELS from ``prometheus`` over the last ``minutes`` into a PNG (3 x 3 grid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prom = Prometheus(prometheus, timeout=15)
    end = end or time.time()
    start = end - minutes * 60
    rows = (len(PANELS) + 2) // 3
    fig, axes = plt.subplots(rows, 3, figsize=(16, 4.2 * rows))
    for ax, p in zip(axes.flat, PANELS):
        ax.set_title(p.title, fontsize=10)
        if p.kind == "bars":
            series = [(legend(q.legend, s["metric"]), float(s["value"][1]))
                      for q in p.queries for s in prom.query(q.expr, end)]
            series.sort()
            ax.bar([k for k, _ in series], [v for _, v in series], color="tab:blue")
            ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        else:
            for q in p.queries:
                for s in prom.query_range(q.expr, start, end, step):
                    xs = [(float(t) - end) / 60 for t, _ in s["values"]]
                    ys = [float(v) if v not in ("NaN", "+Inf", "-Inf") else float("nan") for _, v in s["values"]]
                    ax.plot(xs, ys, label=legend(q.legend, s["metric"]), linewidth=1.2)
            ax.set_xlabel("minutes before now", fontsize=8)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        ax.set_ylabel(p.unit, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(PANELS):]:
        ax.axis("off")
    fig.suptitle(f"serve_demo dashboard from {prometheus} ({time.strftime('%Y-%m-%d %H:%M', time.localtime(end))})")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prometheus", default=defaults.PROMETHEUS_URL)
    p.add_argument("--minutes", type=float, default=30, help="time range of the time series panels")
    p.add_argument("--out", default="reports/dashboard/dashboard.png")
    p.add_argument("--grafana", action="store_true", help=f"(re)write {GRAFANA_JSON} from the panel list instead")


def main(args: argparse.Namespace) -> int:
    if args.grafana:
        print(f"wrote {write_grafana()}")
        return 0
    try:
        path = render(args.prometheus, Path(args.out), args.minutes)
    except DriftError as exc:  # Prometheus unreachable or refusing a query
        print(f"dashboard: {exc}", file=sys.stderr)
        return 2
    print(f"dashboard: {path}")
    return 0
