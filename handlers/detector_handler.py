"""TorchServe handler for torchvision-style object detectors (thin: the work is in serve_demo.core).

Per batch: each request is decoded on its own (a bad one gets its own 4xx JSON error, the rest
of the batch still succeeds), the good images go through the detector at once (mixed sizes are
fine: never stacked), and each request is answered in the protocol and format it asked for,
always as JSON. The same :class:`serve_demo.core.worker.Worker` answers on the KServe server.
Each batch's detection metrics (serve_demo/core/observe.py) go to TorchServe's metrics cache
(:class:`TorchServeSink`, this server's sink; the KServe server's is in serve_demo/serve/kserve_server.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler

from serve_demo.core.observe import MetricSpec
from serve_demo.core.worker import Worker

log = logging.getLogger(__name__)


class PerRequestLines(logging.Filter):
    """Drops TorchServe's own per-request INFO line (``Backend received inference at: ...``, logged on
    the root logger by ts.protocol): one line per request in model_log.log, nothing an operator reads.
    The frontend's per-request lines are dropped by docker/log4j2.xml."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Backend received inference at")


def quiet_per_request_lines() -> None:
    """Installs :class:`PerRequestLines` on the root logger's handlers, once."""
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, PerRequestLines) for f in h.filters):
            h.addFilter(PerRequestLines())


class TorchServeSink:
    """Into TorchServe's metrics cache (``context.metrics``): the frontend serves them on :8082."""

    def __init__(self, metrics: Any) -> None:
        from ts.metrics.metric_type_enum import MetricTypes

        self.metrics = metrics
        self.types = {"counter": MetricTypes.COUNTER, "histogram": MetricTypes.HISTOGRAM}
        self.cache: dict[str, Any] = {}

    def __call__(self, spec: MetricSpec, dims: tuple[str, ...], value: float) -> None:
        metric = self.cache.get(spec.name)
        if metric is None:
            try:  # declared in docker/metrics.yaml: TorchServe built it at worker start
                metric = self.metrics.get_metric(spec.name, self.types[spec.kind])
            except Exception:  # noqa: BLE001 - ts raises its own MetricsCacheKeyError: build it here
                metric = self.metrics.add_metric_to_cache(spec.name, spec.unit, list(spec.dims),
                                                          self.types[spec.kind])
            self.cache[spec.name] = metric
        metric.add_or_update(value, list(dims))


class DetectorHandler(BaseHandler):
    """Serves any ``nn.Module`` honouring torchvision's detection contract."""

    def initialize(self, context) -> None:
        """Load config, label map and weights once per worker; fail naming the missing piece."""
        props = context.system_properties
        gpu = props.get("gpu_id")
        device = torch.device(f"cuda:{gpu}" if torch.cuda.is_available() and gpu is not None else "cpu")
        self.detector = Worker.from_model_dir(props.get("model_dir"), context.manifest.get("model", {}),
                                                getattr(context, "model_yaml_config", None), device)
        if hasattr(context.metrics, "add_metric_to_cache"):  # detection metrics on :8082 (docker/metrics.yaml)
            self.detector.attach_metrics(TorchServeSink(context.metrics))
        quiet_per_request_lines()
        self.context = context
        self.initialized = True

    def handle(self, data: list[dict], context) -> list[bytes]:
        """One JSON answer per request; per-request status codes for the bad ones."""
        start = time.perf_counter()
        self.context = context
        answers = self.detector.handle(data, [context.get_all_request_header(i) for i in range(len(data))])
        for i, answer in enumerate(answers):
            context.set_response_content_type(i, answer.content_type)
            if answer.status != 200:
                context.set_response_status(answer.status, answer.kind, i)
        if context.metrics is not None:
            context.metrics.add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2), None, "ms")
        return [answer.body for answer in answers]
