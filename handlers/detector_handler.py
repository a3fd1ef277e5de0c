"""TorchServe handler for torchvision-style object detectors (thin: the work is in serve_demo.core).

Per batch: each request is decoded on its own (a bad one gets its own 4xx JSON error, the rest
of the batch still succeeds), the good images go through the detector at once (mixed sizes are
fine: never stacked), and each request is answered in the protocol and format it asked for,
always as JSON. The same :class:`serve_demo.core.worker.Worker` answers on the KServe server.
Each batch's detection metrics (serve_demo/core/observe.py) go to TorchServe's metrics cache
(``serve_demo/core/torchserve_metrics.py``: TorchServe's sink, in core because an archive carries only
core and this file, and TorchServe wants one class here; the KServe server's sink is in
serve_demo/serve/kserve_server.py).
"""

from __future__ import annotations

import logging
import time

import torch
from ts.torch_handler.base_handler import BaseHandler

from serve_demo.core.torchserve_metrics import TorchServeSink, quiet_per_request_lines
from serve_demo.core.worker import Worker

log = logging.getLogger(__name__)


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
