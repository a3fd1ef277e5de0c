"""TorchServe's side of the metrics: the sink into its metrics cache, and the filter of its per-request
log line. Used by ``handlers/detector_handler.py`` inside TorchServe's worker, where an archive brings
only ``serve_demo/core`` and the handler file (which must define exactly one class). The KServe
server's sink lives beside it, in :mod:`serve_demo.serve.kserve_server`.
"""

from __future__ import annotations

import logging
from typing import Any

from .observe import MetricSpec


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
