"""Where a stream's results go: ``DIR/NAME.mp4``, ``DIR/NAME.jsonl``, Prometheus metrics, and a live page.

The page (``serve_demo stream --port``, 127.0.0.1 only) shows every source's annotated frames as
MJPEG (``/streams/NAME.mjpg``, what a browser's ``<img>`` and VLC play), the watchdog's figures as
JSON (``/status``) and the metrics for Prometheus (``/metrics``): per source, frames in, processed,
dropped and skipped, reconnects, errors, answer latency (a histogram: p50/p95 in PromQL), active
tracks, line crossings and zone occupancy by label.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from fractions import Fraction
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class VideoSink:
    """An annotated MP4 at the frames' capture times (a live source's dropped frames leave no gap in time)."""

    TIME_BASE = Fraction(1, 1000)

    def __init__(self, path: Path, fps: float | None) -> None:
        self.path, self.fps = path, fps or 25.0
        self._out = self._stream = None
        self._last_pts = -1
        self._t0: float | None = None

    def write(self, image: Image.Image, when: float) -> None:
        import av

        if self._out is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._out = av.open(str(self.path), "w")
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            self._stream = self._out.add_stream(codec, rate=round(self.fps))
            self._stream.width, self._stream.height = image.size[0] // 2 * 2, image.size[1] // 2 * 2
            self._stream.pix_fmt = "yuv420p"
            self._stream.codec_context.time_base = self.TIME_BASE
            self._t0 = when
        size = (self._stream.width, self._stream.height)
        if image.size != size:  # a source that came back at another size: the file keeps its first one
            image = image.resize(size)
        frame = av.VideoFrame.from_image(image)
        pts = max(self._last_pts + 1, round((when - self._t0) / float(self.TIME_BASE)))
        frame.pts, frame.time_base = pts, self.TIME_BASE
        self._last_pts = pts
        for packet in self._stream.encode(frame):
            self._out.mux(packet)

    def close(self) -> None:
        if self._out is not None:
            for packet in self._stream.encode():
                self._out.mux(packet)
            self._out.close()
            self._out = None


class JsonlSink:
    """One JSON line per processed frame, flushed as written (``tail -f`` follows it); a run starts it over."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "w", buffering=1)

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()


class Metrics:
    """Per-source Prometheus metrics in their own registry (``/metrics`` on the stream's page)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        src = ["source"]
        self.frames_in = Counter("stream_frames_in", "Frames decoded from the source", src, registry=self.registry)
        self.processed = Counter("stream_frames_processed", "Frames answered by the server", src,
                                 registry=self.registry)
        self.dropped = Counter("stream_frames_dropped", "Frames dropped unsent because a newer one came (live)",
                               src, registry=self.registry)
        self.skipped = Counter("stream_frames_skipped", "Frames left out by max_fps", src, registry=self.registry)
        self.errors = Counter("stream_errors", "Frames the server failed or refused", src, registry=self.registry)
        self.reconnects = Counter("stream_reconnects", "Times the source was opened again", src,
                                  registry=self.registry)
        self.latency = Histogram("stream_latency_seconds", "Capture to answer, per processed frame", src,
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tracks = Gauge("stream_tracks", "Tracks in the last processed frame", src, registry=self.registry)
        self.up = Gauge("stream_source_up", "1 while the source delivers frames", src, registry=self.registry)
        self.crossings = Counter("stream_line_crossings", "Objects across a counting line", src + ["line", "direction",
                                 "label"], registry=self.registry)
        self.zone = Gauge("stream_zone_objects", "Objects inside a zone in the last processed frame",
                          src + ["zone", "label"], registry=self.registry)
        self._seen: dict[str, dict[tuple, float]] = {}

    def add(self, counter, source: str, total: float, *labels: str) -> None:
        """Advance a counter to a running total kept elsewhere (the reader's, the slot's, the tracker's)."""
        key = (id(counter), *labels)
        last = self._seen.setdefault(source, {}).get(key, 0.0)
        if total > last:
            counter.labels(source, *labels).inc(total - last)
            self._seen[source][key] = total

    def remove(self, source: str) -> None:
        for metric in (self.frames_in, self.processed, self.dropped, self.skipped, self.errors, self.reconnects,
                       self.latency, self.tracks, self.up):
            try:
                metric.remove(source)
            except KeyError:
                pass
        for metric in (self.crossings, self.zone):
            for labels in [k for k in list(metric._metrics) if k[0] == source]:
                metric.remove(*labels)
        self._seen.pop(source, None)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class LiveFrames:
    """The newest annotated JPEG of every source, for the MJPEG page."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frames: dict[str, tuple[int, bytes]] = {}

    def publish(self, source: str, image: Image.Image) -> None:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=80)
        with self._lock:
            seq = self._frames.get(source, (0, b""))[0] + 1
            self._frames[source] = (seq, buf.getvalue())

    def latest(self, source: str) -> tuple[int, bytes] | None:
        with self._lock:
            return self._frames.get(source)

    def drop(self, source: str) -> None:
        with self._lock:
            self._frames.pop(source, None)

    def sources(self) -> list[str]:
        with self._lock:
            return sorted(self._frames)


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>serve_demo stream</title>
<style>body{{font-family:sans-serif;background:#111;color:#eee;margin:1em}}figure{{display:inline-block;margin:.5em}}
img{{max-width:46vw;border:1px solid #444}}pre{{font-size:12px;color:#aaa}}</style></head><body>
<h1>serve_demo stream</h1><div id="streams">{figures}</div><pre id="status"></pre>
<script>async function tick(){{try{{const r=await fetch('status');const s=await r.json();
document.getElementById('status').textContent=JSON.stringify(s,null,1);
const have=new Set([...document.querySelectorAll('figure')].map(f=>f.id));
for(const name of Object.keys(s.sources)){{if(!have.has(name)){{location.reload();return}}}}
}}catch(e){{}} setTimeout(tick,2000)}} tick();</script></body></html>"""


def create_app(frames: LiveFrames, metrics: Metrics, status) -> object:
    """The page's Starlette app: ``/``, ``/streams/NAME.mjpg``, ``/status``, ``/metrics``, ``/healthz``."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    async def index(request):
        figures = "".join(f'<figure id="{n}"><img src="streams/{n}.mjpg" alt="{n}"><figcaption>{n}</figcaption>'
                          "</figure>" for n in status()["sources"])
        return HTMLResponse(PAGE.format(figures=figures or "<p>no source yet</p>"))

    async def mjpeg(request):
        name = request.path_params["name"]
        if name not in status()["sources"]:
            return JSONResponse({"code": 404, "type": "unknown_source",
                                 "message": f"no source {name!r}; known: {', '.join(status()['sources']) or 'none'}"},
                                status_code=404)

        async def parts():
            last = 0
            idle_since = time.monotonic()
            while True:
                got = frames.latest(name)
                if got and got[0] != last:
                    last, idle_since = got[0], time.monotonic()
                    yield (b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: " + str(len(got[1])).encode()
                           + b"\r\n\r\n" + got[1] + b"\r\n")
                elif name not in status()["sources"] or time.monotonic() - idle_since > 60:
                    return  # the source was removed, or nothing new for a minute
                await asyncio.sleep(0.02)

        return StreamingResponse(parts(), media_type="multipart/x-mixed-replace; boundary=frame",
                                 headers={"Cache-Control": "no-store"})

    async def status_json(request):
        return JSONResponse(status())

    async def metrics_text(request):
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request):
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/", index), Route("/streams/{name}.mjpg", mjpeg), Route("/status", status_json),
                             Route("/metrics", metrics_text), Route("/healthz", healthz)])


class Page(threading.Thread):
    """The page's uvicorn server in a thread (slow clients cut as on our other listeners)."""

    def __init__(self, app, port: int) -> None:
        super().__init__(name="stream-page", daemon=True)
        from serve_demo.serve.ui import web_server

        self.server = web_server(app, port)
        self.server.install_signal_handlers = lambda: None  # the stream's own Ctrl-C handling stays

    def run(self) -> None:
        self.server.run()

    def wait_started(self, timeout: float = 10.0) -> int:
        """The bound port, once listening (0 asks for a free one)."""
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the stream's page did not start (is the port taken? --port 0 picks a free one)")
            time.sleep(0.05)
        return self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.join(5)
