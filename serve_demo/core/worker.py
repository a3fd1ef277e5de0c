"""The server-agnostic worker: one loaded archive answering batches of requests.

Every server and tool goes through :class:`Worker`: the TorchServe handler
(``handlers/detector_handler.py``), the KServe ``ModelServer`` (``serve_demo.serve.kserve_server``),
the LitServe peer, and the benchmark in-process. So they decode, run and answer alike, and a
request that is bad on one is bad, with the same code, on the others.

A batch goes through four stages, each a method a subclass may override (as TorchServe's
``BaseHandler`` offers ``preprocess / inference / postprocess``)::

    decode(rows, headers) -> [Parsed | Answer]   one request each; a bad one is already its 4xx Answer
    infer(images)         -> [raw output]        every good image of the batch at once (a list); if that
                                                 raises, one by one, so only the culprit gets its 422
    encode(parsed, outs)  -> Answer              threshold (pipeline.select), format, envelope, size limit
    observe(out, kept, r)                        metrics, drift statistics, capture of uncertain images

:meth:`Worker.handle` runs them for a server; :meth:`Worker.predict` runs the same ``decode``,
``infer`` and formatting for one image offline.
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
from .capture import Capturer
from .config import LABEL_FILE
from .envelopes import Parsed, error_answer, is_enveloped, parse_row, wrap
from .imaging import RequestError
from .layout import worker_layout
from .loader import ArchiveFiles, configure_threads, load_detector, open_archive, read_label_map
from .pipeline import Request, format_kept, parse_request, run_detector, select
from .runtime import Occupancy, thread_choice

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


class Worker:
    """An archive's detector with its label map and handler config, answering requests.

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
        self.cfg = files.handler
        self.runtime = self.cfg.runtime_config
        if self.runtime.name == "openvino" and self.device.type != "cpu":
            log.warning("this archive runs in OpenVINO, on the CPU: %s is not used (archive RUNTIME=eager or "
                        "onnxruntime for the GPU)", self.device)
            self.device = torch.device("cpu")
        if threads is None:  # a server's worker: the archive's threads, or the machine's layout
            layout = worker_layout(files.min_workers, self.cfg.threads)
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
        self.stats = observe.BatchStats()
        # the server's metrics: torchserve_metrics.TorchServeSink, the KServe server's PrometheusSink
        self.sink: observe.Sink | None = None
        capture = self.cfg.capture_config
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
                     runtime_threads: int | None = None) -> Worker:
        """Load a ``.mar`` file or its unpacked folder (``threads`` 0 leaves torch's setting alone;
        ``runtime_threads``: an accelerated runtime's, default torch's)."""
        return cls(open_archive(path), device, threads, runtime_threads)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, manifest: dict, config: dict | None,
                       device: torch.device | str = "cpu") -> Worker:
        """Load from a folder a server already unpacked (TorchServe's ``model_dir``)."""
        return cls(ArchiveFiles(Path(model_dir), manifest, config or {}), device)

    # ------------------------------------------------------------------------------------- stages

    def parse(self, row: dict, headers: dict) -> Parsed:
        """Decode one request (any protocol), raising :class:`RequestError` for a client mistake."""
        return parse_row(row, headers, self.cfg, self.device)

    def decode(self, rows: list[dict], headers: list[dict]) -> list[Parsed | Answer]:
        """Stage 1: each request decoded on its own; a bad one becomes its own 4xx :class:`Answer`."""
        out: list[Parsed | Answer] = []
        for i, (row, hdrs) in enumerate(zip(rows, headers)):
            try:
                out.append(self.parse(row, hdrs))
            except RequestError as err:
                out.append(Answer(err.code, error_answer(err, is_enveloped(row, hdrs)), err.kind))
                self.stats.refused.append(err.kind)
                log.info("request %d refused: %d %s: %s", i, err.code, err.kind, err.message)
        return out

    def infer(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor] | RequestError]:
        """Stage 2: the model on every image at once (mixed sizes: a list, never stacked); raw outputs.

        When the batch's forward pass raises, each image runs alone, so that only the one the model
        cannot take (an aspect ratio its resize turns into a zero-pixel side) fails: its place holds
        the 422 :class:`RequestError` its request will answer. Running out of GPU memory is not the
        image's fault and is raised.
        """
        if not images:
            return []
        try:
            return self._run(images)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - one image must not fail its batch
            if len(images) == 1:
                return [self._unprocessable(images[0], exc)]
            log.warning("a batch of %d images failed (%s: %s); running them one by one", len(images),
                        type(exc).__name__, exc)
        out: list[dict[str, torch.Tensor] | RequestError] = []
        for image in images:
            try:
                out.extend(self._run([image]))
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001
                out.append(self._unprocessable(image, exc))
        return out

    def _run(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return run_detector(self.model, images, self.device, self.cfg.fp16, self.cfg.pin_memory)

    def _unprocessable(self, image: torch.Tensor, exc: Exception) -> RequestError:
        h, w = image.shape[-2:]
        log.warning("the model failed on a %dx%d image: %s: %s", w, h, type(exc).__name__, exc)
        return RequestError(422, "image_not_processable",
                            f"the model cannot run on this {w}x{h} image ({type(exc).__name__}: {str(exc)[:160]}); "
                            "an aspect ratio this extreme or a side this small is not servable: crop or pad it")

    def encode(self, parsed: Parsed, outputs: list[dict[str, torch.Tensor] | RequestError]) -> Answer:
        """Stage 3: one request's answer from its images' raw outputs: the threshold applied once
        (:func:`~serve_demo.core.pipeline.select`), each image formatted, wrapped in the request's
        protocol; then :meth:`observe`. A request whose answer cannot be made (a drawn image over the
        size limit) gets its 4xx."""
        failed = next((o for o in outputs if isinstance(o, RequestError)), None)
        if failed is not None:  # an image the model could not take fails its whole request
            self.stats.refused.append(failed.kind)
            return Answer(failed.code, error_answer(failed, parsed.protocol != "plain"), failed.kind)
        kept = [select(o, r.threshold) for o, r in zip(outputs, parsed.requests)]
        try:
            payloads = [self.format_kept(k, r) for k, r in zip(kept, parsed.requests)]
            self.check_envelope_size(parsed, payloads)
        except RequestError as err:
            self.stats.refused.append(err.kind)
            return Answer(err.code, error_answer(err, parsed.protocol != "plain"), err.kind)
        for o, k, r in zip(outputs, kept, parsed.requests):
            self.observe(o, k, r)
        return Answer(200, wrap(parsed, payloads, self.name, self.version))

    def observe(self, output: dict[str, torch.Tensor], kept: dict[str, torch.Tensor], req: Request) -> None:
        """Stage 4: record what one answered image looked like and got (metrics, drift), and offer its
        raw ``output`` to capture (uncertainty reads the scores below the threshold too)."""
        labels = [self.names.get(int(c), str(int(c))) for c in kept["labels"].tolist()]
        h, w = req.image.shape[-2:]
        brightness = float(req.image.mean(dtype=torch.float32)) / 255.0
        self.stats.images.append(observe.ImageStats(int(w), int(h), brightness, labels,
                                                    [round(float(s), 4) for s in kept["scores"].tolist()]))
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

    def format_kept(self, kept: dict[str, torch.Tensor], req: Request) -> Any:
        """One image's kept detections as the payload ``req`` asked for."""
        return format_kept(kept, req, self.names, self.name, self.version, self.cfg.keypoint_names,
                           self.cfg.max_response_bytes)

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

    # ------------------------------------------------------------------------------ whole requests

    def handle(self, rows: list[dict], headers: list[dict]) -> list[Answer]:
        """A batch of requests in, one :class:`Answer` per request out (bad ones get their own 4xx).

        ``decode`` each, ``infer`` every good image at once, ``encode`` each request. The whole batch
        is marked busy for the other workers (:class:`serve_demo.core.runtime.Occupancy`).
        """
        with self._inside():
            self.stats = observe.BatchStats(requests=len(rows))
            t0 = time.perf_counter()
            decoded = self.decode(rows, headers)
            parsed = [d for d in decoded if isinstance(d, Parsed)]
            t1 = time.perf_counter()
            if len(rows) > 1:
                log.info("batch of %d requests (%d refused)", len(rows), len(rows) - len(parsed))
            images = [r.image for p in parsed for r in p.requests]
            outputs = iter(self.infer(images))
            t2 = time.perf_counter()
            answers = [d if isinstance(d, Answer) else self.encode(d, [next(outputs) for _ in d.requests])
                       for d in decoded]
            self.stats.decode_s = t1 - t0
            if images:  # a batch of refusals never reached the model
                self.stats.model_s, self.stats.encode_s = t2 - t1, time.perf_counter() - t2
            if self.sink is not None:
                observe.emit(self.stats, self.name, self.version, self.sink)
            return answers

    def predict(self, data: bytes, threshold: float | None = None, response_format: str = "detailed") -> Any:
        """The payload for one encoded image (detailed by default): the served path's ``decode``,
        ``infer`` and formatting (the archive's fp16, pinned memory, GPU decode), without metrics.

        Raises:
            RequestError: the bytes are not an image this server decodes, or a bad option.
        """
        headers = {"X-Response-Format": response_format}
        if threshold is not None:
            headers["X-Threshold"] = str(threshold)
        with self._inside():
            req = parse_request({"body": data}, headers, self.cfg, self.device)
            output = self.infer([req.image])[0]
            if isinstance(output, RequestError):
                raise output
            return self.format_kept(select(output, req.threshold), req)

    def _inside(self) -> contextlib.AbstractContextManager:
        """The request's occupancy mark (picks the runtime's wide sessions when no other worker is busy)."""
        return self.occupancy.inside(self.choice) if self.occupancy else contextlib.nullcontext()

    def close(self) -> None:
        """Remove an extracted ``.mar`` copy."""
        self.files.cleanup()
