"""Many sources through one server: threads per source, one shared budget of requests in flight.

Per source: a :class:`~.source.Reader` fills its slot; a dispatcher waits for a frame, then for a free
request (``inflight``, shared by all sources: the server's capacity, not one per source), takes the
oldest frame the slot still keeps (a live slot keeps two) and sends it; a collector takes the answers
in frame order, tracks and counts them and writes the sinks. A watchdog prints a line per source every
``report_every`` seconds and keeps the metrics; sources are added and removed while running from a
watched sources file.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import requests

from serve_demo.core import schema
from serve_demo.serve.client import PredictionError, predict_bytes

from .sinks import JsonlSink, LiveFrames, Metrics, VideoSink
from .source import LIVE_DEPTH, Frame, Reader, Slot
from .spec import SourceSpec, SpecError, StreamSpec, read_sources_file
from .track import SourceTracker, annotate, request_threshold

log = logging.getLogger(__name__)

FATAL = (401, 403, 404)  # wrong key, or no such model: no frame will fare better
LATENCY_WINDOW = 200  # answers kept per source for the watchdog's p50/p95


class Fatal(RuntimeError):
    """The server refuses every frame (key, model name): the stream stops and says why."""


def percentile(values, q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class SourceRun:
    """One source's threads, tracker, sinks and figures."""

    def __init__(self, spec: SourceSpec, runner: StreamRunner) -> None:
        self.spec, self.runner = spec, runner
        self.stop = threading.Event()
        self.slot = Slot(blocking=not spec.live, depth=LIVE_DEPTH if spec.live else 1)
        self.reader = Reader(spec, self.slot, self.stop, runner.spec.max_frames)
        self.pending: queue.Queue[tuple[Frame, Future] | None] = queue.Queue()
        self.tracker: SourceTracker | None = None
        self.last_tracked: list = []
        self.request_threshold = request_threshold(runner.spec.threshold)  # ByteTrack's second stage, from frame 0
        out = runner.spec.out
        self.video = VideoSink(out / f"{spec.name}.mp4", None) if runner.spec.video else None
        self.jsonl = JsonlSink(out / f"{spec.name}.jsonl")
        self.processed = self.errors = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.all_latencies: list[float] = []
        self.started = time.monotonic()
        self.ended: float | None = None
        self.last_error: str | None = None
        self._threads = [threading.Thread(target=self._dispatch, name=f"send-{spec.name}", daemon=True),
                         threading.Thread(target=self._collect, name=f"collect-{spec.name}", daemon=True)]

    def start(self) -> None:
        self.reader.start()
        for t in self._threads:
            t.start()

    @property
    def done(self) -> bool:
        return not self._threads[1].is_alive()

    def close(self, timeout: float = 30.0) -> None:
        """Stop reading, let the frames in flight come back, finish the files."""
        self.stop.set()
        for t in self._threads:
            t.join(timeout)
        self.reader.join(timeout)
        if self.video:
            self.video.close()
        self.jsonl.close()

    # the dispatcher: the oldest frame the slot keeps, once a request is free
    def _dispatch(self) -> None:
        budget = self.runner.budget
        try:
            while not self.stop.is_set():
                if not self.slot.wait_ready(0.2):
                    if self.slot.closed:
                        break
                    continue
                if self.spec.every > 1:  # every k-th frame is sent; the others only drawn, in order
                    frame = self.slot.take(0)
                    if frame is None:
                        continue
                    if frame.index % self.spec.every:
                        self.pending.put((frame, None))
                        continue
                    while not budget.acquire(timeout=0.2):
                        if self.stop.is_set():
                            return
                else:
                    if not budget.acquire(timeout=0.2):
                        continue
                    frame = self.slot.take(0)  # the oldest kept: newer ones may have pushed it out while we waited
                    if frame is None:
                        budget.release()
                        continue
                future = self.runner.pool.submit(self.runner.detect, frame, self.request_threshold)
                future.add_done_callback(lambda _: budget.release())
                self.pending.put((frame, future))
        finally:
            self.pending.put(None)

    # the collector: answers in frame order -> tracks, counts, files, page, metrics
    def _collect(self) -> None:
        while True:
            item = self.pending.get()
            if item is None:
                break
            frame, future = item
            if future is None:  # not sent (every k-th): drawn with the latest tracks
                self._draw(frame, self.last_tracked)
                continue
            try:
                payload = future.result()
            except PredictionError as exc:
                if exc.status in FATAL:
                    self.runner.fail(Fatal(f"{self.spec.name}: the server refused a frame: {exc}"))
                self._failed(frame, str(exc))
                continue
            except requests.RequestException as exc:
                self._failed(frame, f"the server did not answer: {type(exc).__name__}")
                continue
            latency = time.monotonic() - frame.captured
            self.latencies.append(latency)
            self.all_latencies.append(latency)
            self.processed += 1
            if self.tracker is None:
                self.tracker = SourceTracker(self.runner.spec.threshold, self.spec.max_fps or self.reader.fps_nominal,
                                             self.spec.lines, self.spec.zones, self.runner.spec.trace)
            tracked = self.tracker.update(schema.parse_detections(payload), frame.time)
            self.last_tracked = tracked
            self._draw(frame, tracked)
            self.jsonl.write({"frame": frame.index, "time": frame.time, "wall": round(frame.wall, 3),
                              "latency_ms": round(latency * 1000, 1),
                              "detections": [t.as_json() for t in tracked], "counts": self.tracker.counts.as_json()})
            self.runner.observe(self, latency)
        self.ended = time.monotonic()

    def _draw(self, frame: Frame, tracked: list) -> None:
        image = annotate(frame.image, tracked, self.tracker) if self.tracker else frame.image
        if self.video:
            self.video.write(image, frame.time)
        self.runner.frames.publish(self.spec.name, image)

    def _failed(self, frame: Frame, why: str) -> None:
        self.errors += 1
        if why != self.last_error:
            log.warning("%s: frame %d: %s", self.spec.name, frame.index, why)
        self.last_error = why

    def state(self) -> str:
        if self.ended is not None or (self.slot.closed and not self.reader.is_alive()):
            return "ended"
        if self.reader.connected:
            return "live" if self.reader.stream_url else "reading"
        return "reconnecting" if self.reader.reconnects else "connecting"

    def figures(self, dt: float | None = None, last: dict | None = None, whole: bool = False) -> dict:
        """The watchdog's figures; fps over the last ``dt`` seconds when ``last`` (the previous figures) is given,
        latency over the last answers (``whole``: all of them)."""
        end = self.ended or time.monotonic()
        elapsed = max(end - self.started, 1e-9)
        frames_in, processed = self.reader.frames_in, self.processed
        if last is not None and dt:
            fps_in = (frames_in - last["frames_in"]) / dt
            fps_out = (processed - last["processed"]) / dt
        else:
            fps_in, fps_out = frames_in / elapsed, processed / elapsed
        window = self.all_latencies if whole else self.latencies
        p50, p95 = percentile(window, 50), percentile(window, 95)
        return {"url": self.spec.url, "state": self.state(), "live": self.reader.live,
                "frames_in": frames_in, "processed": processed, "dropped": self.slot.dropped,
                "skipped": self.reader.skipped, "errors": self.errors, "reconnects": self.reader.reconnects,
                "fps_in": round(fps_in, 2), "fps_out": round(fps_out, 2),
                "latency_ms": {"p50": round(p50 * 1000, 1) if p50 is not None else None,
                               "p95": round(p95 * 1000, 1) if p95 is not None else None},
                "tracks": self.tracker.active if self.tracker else 0,
                "counts": self.tracker.counts.as_json() if self.tracker else None,
                "error": self.reader.error if not self.reader.connected else None}


class StreamRunner:
    """Runs the sources of a :class:`StreamSpec` until they end, ``duration`` passes or :meth:`stop` is called."""

    def __init__(self, spec: StreamSpec, sources: list[SourceSpec]) -> None:
        self.spec = spec
        self.initial = sources
        self.budget = threading.BoundedSemaphore(spec.inflight)
        self.pool = ThreadPoolExecutor(spec.inflight, thread_name_prefix="request")
        self.metrics = Metrics()
        self.frames = LiveFrames()
        self.runs: dict[str, SourceRun] = {}
        self.finished: dict[str, dict] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._local = threading.local()
        self.error: Exception | None = None
        self.page = None
        self.port: int | None = None
        self._file_mtime: float | None = None
        self._file_specs: dict[str, SourceSpec] = {}
        self._last_figures: dict[str, dict] = {}
        self._last_report = time.monotonic()

    # requests (called from the pool's threads)
    def detect(self, frame: Frame, threshold: float) -> dict:
        import io

        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        buf = io.BytesIO()
        frame.image.save(buf, format="JPEG", quality=90)
        return predict_bytes(buf.getvalue(), self.spec.model, url=self.spec.url, threshold=threshold,
                             response_format="detailed", token=self.spec.token, session=self._local.session,
                             timeout=30)

    def observe(self, run: SourceRun, latency: float) -> None:
        m, name = self.metrics, run.spec.name
        m.processed.labels(name).inc()
        m.latency.labels(name).observe(latency)
        if run.tracker:
            m.tracks.labels(name).set(run.tracker.active)
            counts = run.tracker.counts
            for line, directions in counts.lines_by_label.items():
                for direction, labels in directions.items():
                    for label, n in labels.items():
                        m.add(m.crossings, name, n, line, direction, label)
            for zone, labels in counts.zones_by_label.items():
                for label in run.tracker.labels.values():
                    m.zone.labels(name, zone, label).set(labels.get(label, 0))

    def fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
            log.error("%s", exc)
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()

    # sources
    def add(self, source: SourceSpec) -> None:
        with self._lock:
            if source.name in self.runs:
                raise SpecError(f"a source named {source.name!r} is already running")
            run = SourceRun(source, self)
            self.runs[source.name] = run
        run.start()
        log.info("%s: started (%s%s)", source.name, source.url, ", live: newest frame first" if source.live else "")

    def remove(self, name: str) -> None:
        with self._lock:
            run = self.runs.pop(name, None)
        if run is None:
            return
        run.close()
        self.metrics.remove(name)
        self.frames.drop(name)
        self.finished[name] = run.figures(whole=True)  # last: a source in `finished` is gone everywhere
        log.info("%s: removed", name)

    def _watch_file(self) -> None:
        path = self.spec.sources_file
        if path is None:
            return
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return
        if mtime == self._file_mtime:
            return
        self._file_mtime = mtime
        try:
            wanted = {s.name: s for s in read_sources_file(path)}
        except SpecError as exc:
            log.error("%s; the running sources are kept", exc)
            return
        for name, old in list(self._file_specs.items()):
            if name not in wanted or wanted[name] != old:
                self.remove(name)
                del self._file_specs[name]
        for name, source in wanted.items():
            if name not in self._file_specs:
                if name in self.runs:
                    log.error("%s: %s names a source given on the command line; skipped", path, name)
                    continue
                self._file_specs[name] = source
                self.add(source)

    # the watchdog
    def status(self) -> dict:
        with self._lock:
            runs = dict(self.runs)
        return {"model": self.spec.model, "inflight": self.spec.inflight,
                "sources": {n: r.figures() for n, r in runs.items()}}

    def _sync_metrics(self) -> None:
        m = self.metrics
        for name, run in list(self.runs.items()):
            m.add(m.frames_in, name, run.reader.frames_in)
            m.add(m.dropped, name, run.slot.dropped)
            m.add(m.skipped, name, run.reader.skipped)
            m.add(m.reconnects, name, run.reader.reconnects)
            m.add(m.errors, name, run.errors)
            m.up.labels(name).set(1 if run.reader.connected else 0)

    def _report(self) -> None:
        now = time.monotonic()
        dt = now - self._last_report
        self._last_report = now
        for name, run in list(self.runs.items()):
            f = run.figures(dt, self._last_figures.get(name))
            self._last_figures[name] = f
            lat = f["latency_ms"]
            log.info("%-12s %-12s in %5.1f fps  out %5.1f fps  latency p50 %s p95 %s ms  dropped %d  skipped %d  "
                     "tracks %d  reconnects %d  errors %d%s", name, f["state"], f["fps_in"], f["fps_out"],
                     lat["p50"], lat["p95"], f["dropped"], f["skipped"], f["tracks"], f["reconnects"], f["errors"],
                     f"  ({f['error']})" if f["error"] else "")

    def run(self) -> dict:
        """Run until every source has ended (no sources file), ``duration`` passed or :meth:`stop`; return the
        summary: ``{"sources": {name: figures}, "seconds", "page"}``."""
        from .sinks import Page, create_app
        from .track import warm_up

        warm_up()  # the tracker's imports take a second: not while the first answers wait
        self.spec.out.mkdir(parents=True, exist_ok=True)
        if self.spec.port is not None:
            self.page = Page(create_app(self.frames, self.metrics, self.status), self.spec.port)
            self.page.start()
            self.port = self.page.wait_started()
            log.info("live page: http://127.0.0.1:%d/ (MJPEG per source, /status, /metrics)", self.port)
        t0 = time.monotonic()
        try:
            for source in self.initial:
                self.add(source)
            self._watch_file()
            while not self._stop.wait(0.25):
                self._watch_file()
                self._sync_metrics()
                if time.monotonic() - self._last_report >= self.spec.report_every:
                    self._report()
                if self.spec.duration is not None and time.monotonic() - t0 >= self.spec.duration:
                    break
                if self.spec.sources_file is None and self.runs and all(r.done for r in self.runs.values()):
                    break
                if self.spec.sources_file is None and not self.runs:
                    break
        finally:
            for name in list(self.runs):
                self.remove(name)
            self._sync_metrics()
            self.pool.shutdown(wait=True, cancel_futures=True)
            if self.page:
                self.page.stop()
        summary = {"model": self.spec.model, "seconds": round(time.monotonic() - t0, 2),
                   "sources": dict(self.finished)}
        if self.spec.summary:
            (self.spec.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def resolve(spec: StreamSpec, urls: list[str], **source_options) -> tuple[StreamSpec, list[SourceSpec]]:
    """Sources from the command line's URLs (names from the URLs), checked now so that a typo is named
    before anything starts."""
    from .spec import check_source, name_for

    taken: set[str] = set()
    sources = []
    for url in urls:
        check_source(url)
        name = name_for(url, taken)
        taken.add(name)
        sources.append(SourceSpec(name, url, **source_options))
    if spec.sources_file is not None:
        for s in read_sources_file(spec.sources_file):
            check_source(s.url)
    return replace(spec, out=Path(spec.out)), sources
