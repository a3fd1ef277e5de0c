"""The server-agnostic worker: one loaded archive answering batches of requests.

Every server and tool goes through :class:`Detector`: the TorchServe handler
(``handlers/detector_handler.py``), the KServe ``ModelServer`` (``serve_demo.serve.kserve_server``),
the evaluator and the benchmark in-process, and the LitServe peer. So they decode, run and
answer alike, and a request that is bad on one is bad, with the same code, on the others.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import observe, schema
from .capture import CaptureConfig, Capturer
from .config import LABEL_FILE, HandlerConfig
from .envelopes import Parsed, error_answer, is_enveloped, parse_row, wrap
from .imaging import RequestError, decode_image
from .layout import worker_layout
from .loader import ArchiveFiles, configure_threads, load_detector, open_archive, read_label_map
from .pipeline import Request, format_output, run_detector
from .runtime import Occupancy, RuntimeConfig, thread_choice

log = logging.getLogger(__name__)
JSON = "application/json"


@dataclass
class Answer:
    """One request's answer: HTTP status, error type (``"ok"`` on success) and payload: JSON, or
    a drawn image (:class:`~serve_demo.core.schema.ImageAnswer`)."""

    status: int
    payload: Any
    kind: str = "ok"

    @property
    def content_type(self) -> str:
        return self.payload.content_type if isinstance(self.payload, schema.ImageAnswer) else JSON

    @property
    def body(self) -> bytes:
        return self.payload.data if isinstance(self.payload, schema.ImageAnswer) else schema.dumps(self.payload)


@dataclass
class Timing:
    """Milliseconds spent on the last batch, by stage."""

    decode_ms: float = 0.0
    model_ms: float = 0.0
    encode_ms: float = 0.0
    images: int = 0


class Detector:
    """An archive's detector with its label map and handler config, ready to answer.

    Args:
        files: the archive on disk (:func:`serve_demo.core.loader.open_archive`).
        device: where the model runs (``cpu``, ``cuda:N``).
        threads: torch intra-op threads to set (None: ``handler.threads`` of the archive, where 0 means
            the machine's layout, :func:`serve_demo.core.layout.worker_layout`; 0: leave the process's
            setting alone).
        runtime_threads: an accelerated runtime's threads (None: the layout's when it chose the
            threads, else the torch threads).
    """

    def __init__(self, files: ArchiveFiles, device: torch.device | str = "cpu",
                 threads: int | None = None, runtime_threads: int | None = None) -> None:
        self.files = files
        self.device = torch.device(device)
        self.cfg = HandlerConfig.from_yaml(files.config.get("handler"))
        self.runtime = RuntimeConfig.from_yaml(self.cfg.runtime)
        if self.runtime.name == "openvino" and self.device.type != "cpu":
            log.warning("this archive runs in OpenVINO, on the CPU: %s is not used (archive RUNTIME=eager or "
                        "onnxruntime for the GPU)", self.device)
            self.device = torch.device("cpu")
        if threads is None:  # a server's worker: the archive's threads, or the machine's layout
            layout = worker_layout(files.config)
            threads = layout.threads if self.device.type == "cpu" else self.cfg.threads
            if self.device.type == "cpu" and not self.cfg.threads and not runtime_threads:
                runtime_threads = layout.runtime_threads
        configure_threads(threads)
        self.runtime_threads = max(runtime_threads or 0, torch.get_num_threads())  # when alone
        self.name, self.version = files.name, files.version
        self.names = read_label_map(files.model_dir / LABEL_FILE)
        model_dir = str(files.model_dir)
        added = model_dir not in sys.path
        if added:  # a user's model file is imported from the archive's folder
            sys.path.insert(0, model_dir)
        try:
            self.model = load_detector(files.model_dir, files.manifest.get("serializedFile"),
                                       files.manifest.get("modelFile"), self.cfg, len(self.names), self.device,
                                       wide_threads=self.runtime_threads)
        finally:
            if added:
                sys.path.remove(model_dir)
        self.choice = thread_choice(self.model)  # wide runtime sessions: used when no other worker is busy
        self.occupancy = Occupancy(Path(tempfile.gettempdir()) / f"serve_demo-busy-{self.name}-{self.version}") \
            if self.choice else None
        self.timing = Timing()
        self.stats = observe.BatchStats()
        self.sink: observe.Sink | None = None  # the server's metrics (observe.TorchServeSink, PrometheusSink)
        capture = CaptureConfig.from_yaml(self.cfg.capture)
        self.capturer = Capturer(capture, self.name, self.version, self.names) if capture.enabled else None
        threads_note = f"{torch.get_num_threads()} threads" + (
            f", runtime {self.runtime_threads} threads when alone" if self.choice else "")
        log.info("%s %s ready on %s (%s, %s): %d classes, threshold %.2f, format %s", self.name,
                 self.version, self.device, self.runtime.label, threads_note, len(self.names) - 1,
                 self.cfg.threshold, self.cfg.response_format)

    def attach_metrics(self, sink: observe.Sink) -> None:
        """Emit each batch's :class:`~serve_demo.core.observe.BatchStats` to ``sink`` (and count this load)."""
        self.sink = sink
        try:
            sink(observe.SPECS["WorkerStarts"], (self.name, self.version), 1.0)
        except Exception:  # noqa: BLE001 - metrics never stop a worker
            log.exception("metrics sink refused WorkerStarts")

    @classmethod
    def from_archive(cls, path: str | Path, device: torch.device | str = "cpu", threads: int = 0,
                     runtime_threads: int | None = None) -> Detector:
        """Load a ``.mar`` file or its unpacked folder (``threads`` 0 leaves torch's setting alone;
        ``runtime_threads``: an accelerated runtime's, default torch's)."""
        return cls(open_archive(path), device, threads, runtime_threads)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, manifest: dict, config: dict | None,
                       device: torch.device | str = "cpu") -> Detector:
        """Load from a folder a server already unpacked (TorchServe's ``model_dir``)."""
        return cls(ArchiveFiles(Path(model_dir), manifest, config or {}), device)

    def parse(self, row: dict, headers: dict) -> Parsed:
        """Decode one request (any protocol), raising :class:`RequestError` for a client mistake."""
        return parse_row(row, headers, self.cfg, self.device)

    def answer(self, parsed: list[Parsed]) -> list[Answer]:
        """Run every image of the parsed requests through the model at once; one answer each (a
        request whose answer cannot be made, such as a drawn image over the size limit, gets its 4xx)."""
        images = [r.image for p in parsed for r in p.requests]
        if not images:
            return []
        t0 = time.perf_counter()
        outputs = iter(run_detector(self.model, images, self.device, self.cfg.fp16, self.cfg.pin_memory))
        t1 = time.perf_counter()
        answers = []
        for p in parsed:
            outs = [next(outputs) for _ in p.requests]  # consumed whatever happens to this request
            try:
                payloads = [self.format(o, r) for o, r in zip(outs, p.requests)]
                self.check_envelope_size(p, payloads)
                answers.append(Answer(200, wrap(p, payloads, self.name, self.version)))
                for o, r in zip(outs, p.requests):
                    self.observe(o, r)
            except RequestError as err:
                answers.append(Answer(err.code, error_answer(err, p.protocol != "plain"), err.kind))
                self.stats.refused.append(err.kind)
        t2 = time.perf_counter()
        self.timing.model_ms += (t1 - t0) * 1000
        self.timing.encode_ms += (t2 - t1) * 1000
        self.timing.images += len(images)
        self.stats.model_s += t1 - t0
        self.stats.encode_s += t2 - t1
        return answers

    def observe(self, output: dict[str, torch.Tensor], req: Request) -> None:
        """Record what one answered image looked like and got (metrics, drift), and offer it to capture."""
        keep = output["scores"] >= req.threshold
        labels = [self.names.get(int(c), str(int(c))) for c in output["labels"][keep].tolist()]
        h, w = req.image.shape[-2:]
        brightness = float(req.image.mean(dtype=torch.float32)) / 255.0
        self.stats.images.append(observe.ImageStats(int(w), int(h), brightness, labels,
                                                    [round(float(s), 4) for s in output["scores"][keep].tolist()]))
        if self.capturer is not None:
            try:
                outcome = self.capturer.offer(req.image, output, req.threshold)
            except Exception:  # noqa: BLE001 - capture never fails a request
                log.exception("capture failed")
                outcome = "error"
            if outcome == "saved":
                self.stats.capture_saved += 1
            elif outcome:
                self.stats.capture_dropped[outcome] = self.stats.capture_dropped.get(outcome, 0) + 1

    def check_envelope_size(self, parsed: Parsed, payloads: list[Any]) -> None:
        """Drawn images inside a JSON envelope travel as base64 (4/3 larger): refuse past the limit.

        Raises:
            RequestError: 413 ``image_answer_too_large``.
        """
        if parsed.protocol == "plain":
            return
        size = sum(len(p.data) for p in payloads if isinstance(p, schema.ImageAnswer)) * 4 // 3
        if size > self.cfg.max_response_bytes:
            raise RequestError(413, "image_answer_too_large",
                               f"{len(payloads)} drawn images make about {size} bytes of base64, over the "
                               f"{self.cfg.max_response_bytes}-byte response limit: send fewer images per request")

    def format(self, output: dict[str, torch.Tensor], req: Request) -> Any:
        """One model output as the payload ``req`` asked for."""
        return format_output(output, req, self.names, self.name, self.version, self.cfg.keypoint_names,
                             self.cfg.max_response_bytes)

    def handle(self, rows: list[dict], headers: list[dict]) -> list[Answer]:
        """A batch of requests in, one :class:`Answer` per request out (bad ones get their own 4xx).

        Every good image of the batch goes through the model at once; mixed sizes are fine
        (a list, never stacked). The whole batch (decode, model, answers) is marked busy for the
        other workers (:class:`serve_demo.core.runtime.Occupancy`).
        """
        with self._inside():
            return self._handle(rows, headers)

    def _handle(self, rows: list[dict], headers: list[dict]) -> list[Answer]:
        self.timing = Timing()
        self.stats = observe.BatchStats(requests=len(rows))
        t0 = time.perf_counter()
        answers: list[Answer | None] = [None] * len(rows)
        good, parsed = [], []
        for i, (row, hdrs) in enumerate(zip(rows, headers)):
            try:
                parsed.append(self.parse(row, hdrs))
                good.append(i)
            except RequestError as err:
                answers[i] = Answer(err.code, error_answer(err, is_enveloped(row, hdrs)), err.kind)
                self.stats.refused.append(err.kind)
                log.info("request %d refused: %d %s: %s", i, err.code, err.kind, err.message)
        self.timing.decode_ms = (time.perf_counter() - t0) * 1000
        self.stats.decode_s = self.timing.decode_ms / 1000
        if len(rows) > 1:
            log.info("batch of %d requests (%d refused)", len(rows), len(rows) - len(parsed))
        for i, answer in zip(good, self.answer(parsed)):
            answers[i] = answer
        if self.sink is not None:
            observe.emit(self.stats, self.name, self.version, self.sink)
        return answers  # type: ignore[return-value]

    def predict(self, data: bytes, threshold: float | None = None, response_format: str = "detailed") -> Any:
        """The payload for one encoded image (detailed by default), computed like the served path.

        Raises:
            RequestError: the bytes are not an image this server decodes.
        """
        with self._inside():
            req = Request(decode_image(data, self.cfg.max_image_pixels),
                          self.cfg.threshold if threshold is None else threshold, response_format,
                          self.cfg.mask_threshold)
            out = run_detector(self.model, [req.image], self.device)[0]
            return self.format(out, req)

    def _inside(self) -> contextlib.AbstractContextManager:
        """The request's occupancy mark (picks the runtime's wide sessions when no other worker is busy)."""
        return self.occupancy.inside(self.choice) if self.occupancy else contextlib.nullcontext()

    def close(self) -> None:
        """Remove an extracted ``.mar`` copy."""
        self.files.cleanup()
