"""TorchServe handler for torchvision-style object detectors (thin: logic lives in serve_demo).

Per batch: decode each request on its own (a bad one gets its own 4xx JSON error, the rest of
the batch still succeeds), run the detector once on the list of good images (mixed sizes are
fine: never stacked), answer each request in the format it asked for, always as JSON.
"""

from __future__ import annotations

import logging
import sys
import time

import torch
from ts.torch_handler.vision_handler import VisionHandler

from serve_demo import schema
from serve_demo.envelopes import error_answer, is_enveloped, parse_row, wrap
from serve_demo.imaging import RequestError
from serve_demo.serving import (
    LABEL_FILE,
    HandlerConfig,
    configure_threads,
    format_output,
    load_detector,
    read_label_map,
    run_detector,
)

log = logging.getLogger(__name__)
JSON = "application/json"


class DetectorHandler(VisionHandler):
    """Serves any ``nn.Module`` honouring torchvision's detection contract."""

    def initialize(self, context) -> None:
        """Load config, label map and weights once per worker; fail naming the missing piece."""
        props = context.system_properties
        model_dir = props.get("model_dir")
        if model_dir not in sys.path:
            sys.path.insert(0, model_dir)
        gpu = props.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu}" if torch.cuda.is_available() and gpu is not None else "cpu")
        yaml_cfg = getattr(context, "model_yaml_config", None) or {}
        self.cfg = HandlerConfig.from_yaml(yaml_cfg.get("handler"))
        configure_threads(self.cfg.threads)
        model = context.manifest.get("model", {})
        self.model_name = model.get("modelName", "detector")
        self.model_version = str(model.get("modelVersion", "1.0"))
        self.names = read_label_map(f"{model_dir}/{LABEL_FILE}")
        self.model = load_detector(model_dir, model.get("serializedFile"), model.get("modelFile"),
                                   self.cfg, len(self.names), self.device)
        self.context = context
        self.initialized = True
        log.info("%s %s ready on %s: %d classes, threshold %.2f, format %s", self.model_name,
                 self.model_version, self.device, len(self.names) - 1, self.cfg.threshold,
                 self.cfg.response_format)

    def handle(self, data: list[dict], context) -> list[bytes]:
        """One JSON answer per request; per-request status codes for the bad ones.

        A request is one image (``/predictions``) or several (KServe v1/v2 envelopes,
        ``serve_demo.envelopes``); every good image of the batch goes through the model at once.
        """
        start = time.perf_counter()
        self.context = context
        answers: list[bytes | None] = [None] * len(data)
        good, parsed = [], []
        for i, row in enumerate(data):
            context.set_response_content_type(i, JSON)
            try:
                parsed.append(parse_row(row, context.get_all_request_header(i), self.cfg, self.device))
                good.append(i)
            except RequestError as err:
                context.set_response_status(err.code, err.kind, i)
                answers[i] = schema.dumps(error_answer(err, is_enveloped(row)))
                log.info("request %d refused: %d %s: %s", i, err.code, err.kind, err.message)
        if len(data) > 1:
            log.info("batch of %d requests (%d refused)", len(data), len(data) - len(parsed))
        images = [r.image for p in parsed for r in p.requests]
        if images:
            outputs = iter(run_detector(self.model, images, self.device, self.cfg.fp16, self.cfg.pin_memory))
            for i, p in zip(good, parsed):
                payloads = [format_output(next(outputs), r, self.names, self.model_name,
                                          self.model_version, self.cfg.keypoint_names)
                            for r in p.requests]
                answers[i] = schema.dumps(wrap(p, payloads, self.model_name, self.model_version))
        if context.metrics is not None:
            context.metrics.add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2),
                                     None, "ms")
        return answers
