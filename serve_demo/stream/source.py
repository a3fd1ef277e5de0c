"""Reading a source in its own thread, newest frame first.

A :class:`Reader` decodes its source with PyAV (FFmpeg) into a small :class:`Slot`. A live
source (camera, stream, or a file at ``pace: realtime``) keeps its two newest frames: an older one
nobody took is dropped and counted, so an answer always concerns a recent frame. A file at
``pace: fast`` waits instead: every frame is processed, as fast as the server answers.
``max_fps`` skips frames that come sooner than ``1/max_fps`` after the last one kept.
When a source fails or ends (live), it is opened again after a back-off of 0.5 s doubling to 10 s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from .spec import SourceSpec

log = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 5.0  # no packet for this long: the source is gone, reconnect
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 10.0)
LIVE_DEPTH = 2  # frames a live source keeps for its consumer (a burst's two frames; older ones are dropped)


@dataclass
class Frame:
    """One decoded frame and when it was captured."""

    index: int  # counted from the reader's start, across reconnects
    time: float  # seconds: the file's media time, or since the reader started (live)
    captured: float  # time.monotonic() when decoded (latency is measured from here)
    wall: float  # time.time() when decoded
    image: object  # PIL.Image (RGB)


class Slot:
    """A few frames between a reader and its consumer, oldest first.

    Live (``blocking=False``): a frame that finds the slot full pushes the oldest out (counted in
    ``dropped``), so what is taken is at most ``depth`` frames old. ``depth=2`` absorbs a network burst
    (two frames decoded back to back) without dropping. A file (``blocking=True``) waits for room instead.
    """

    def __init__(self, blocking: bool, depth: int = 1) -> None:
        self._cond = threading.Condition()
        self._frames: deque[Frame] = deque()
        self._closed = False
        self.blocking = blocking
        self.depth = max(1, depth)
        self.dropped = 0

    def put(self, frame: Frame, stop: threading.Event) -> bool:
        """Offer a frame; False once the slot is closed or ``stop`` is set."""
        with self._cond:
            if self.blocking:
                while len(self._frames) >= self.depth and not self._closed and not stop.is_set():
                    self._cond.wait(0.2)
            while len(self._frames) >= self.depth:
                self._frames.popleft()
                self.dropped += 1
            if self._closed or stop.is_set():
                return False
            self._frames.append(frame)
            self._cond.notify_all()
            return True

    def take(self, timeout: float | None = None) -> Frame | None:
        """The oldest frame kept (waiting up to ``timeout``); None on timeout or when closed and empty."""
        with self._cond:
            if not self._frames and not self._closed:
                self._cond.wait(timeout)
            frame = self._frames.popleft() if self._frames else None
            self._cond.notify_all()
            return frame

    def wait_ready(self, timeout: float) -> bool:
        """Wait until a frame is there (without taking it); False on timeout or when closed and empty."""
        with self._cond:
            if not self._frames and not self._closed:
                self._cond.wait(timeout)
            return bool(self._frames)

    def make_blocking(self) -> None:
        """From now on wait for room instead of dropping (a source found to be a file)."""
        with self._cond:
            self.blocking, self.depth = True, 1

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed and not self._frames


def backoff(attempt: int) -> float:
    """Seconds to wait before the ``attempt``-th reconnection (1-based)."""
    return BACKOFF_S[min(attempt, len(BACKOFF_S)) - 1]


def open_options(url: str) -> tuple[dict, str | None]:
    """FFmpeg options and format for a source: RTSP over TCP (no lost UDP packets), V4L2 for cameras."""
    if url.startswith(("rtsp://", "rtsps://")):
        return {"rtsp_transport": "tcp"}, None
    if url.startswith("/dev/video"):
        return {}, "v4l2"
    return {}, None


class Reader(threading.Thread):
    """Decode ``spec``'s frames into ``slot`` until stopped, the file ends or ``max_frames`` are read."""

    def __init__(self, spec: SourceSpec, slot: Slot, stop: threading.Event, max_frames: int | None = None) -> None:
        super().__init__(name=f"read-{spec.name}", daemon=True)
        self.spec, self.slot, self.stop, self.max_frames = spec, slot, stop, max_frames
        self.frames_in = 0  # frames decoded
        self.skipped = 0  # frames left out by max_fps
        self.reconnects = 0
        self.connected = False
        self.error: str | None = None  # the last reason the source failed
        self.fps_nominal: float | None = None
        self._t0 = time.monotonic()
        self.stream_url = spec.live_url  # False for a file, and for an http(s) URL with a duration (a video file)
        self._offset = 0.0  # a looped file's media time goes on from where the last pass ended
        self._last_media = 0.0

    @property
    def live(self) -> bool:
        """Frames come at their own rate and the oldest are dropped."""
        return self.stream_url or self.spec.pace == "realtime"

    def run(self) -> None:
        attempt = 0
        try:
            while not self.stop.is_set():
                ended = self._read_once()
                if ended == "done" or self.stop.is_set():
                    break
                if ended == "again":  # a looped file: from the start, at once
                    continue
                if ended == "ok":
                    attempt = 0  # it delivered frames: back-off from the start
                attempt += 1
                self.reconnects += 1
                delay = backoff(attempt)
                log.warning("%s: %s; reconnecting in %.1f s (attempt %d)", self.spec.name,
                            self.error or "the stream ended", delay, attempt)
                self.stop.wait(delay)
        finally:
            self.connected = False
            self.slot.close()

    def _read_once(self) -> str:
        """One connection: "done" (finished for good), "again" (a looped file ended), "ok" (frames came,
        then it failed or ended), "failed" (no frame)."""
        import av

        options, fmt = open_options(self.spec.url)
        url = self.spec.url[len("file://"):] if self.spec.url.startswith("file://") else self.spec.url
        try:
            container = av.open(url, format=fmt, options=options, timeout=(OPEN_TIMEOUT_S, READ_TIMEOUT_S))
        except (av.FFmpegError, OSError) as exc:
            self.error = f"cannot open {self.spec.url}: {exc}"
            return "failed" if self.stream_url else "done"
        got = False
        try:
            if not container.streams.video:
                self.error = f"{self.spec.url} has no video stream"
                return "done"
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            self.fps_nominal = float(rate) if rate else None
            if (self.stream_url and self.spec.url.startswith(("http://", "https://")) and container.duration
                    and self.spec.pace != "realtime" and not self.frames_in):
                self.stream_url = False  # a video file over HTTP: every frame, like a local file
                self.slot.make_blocking()
            self.connected = True
            self.error = None
            realtime = self.spec.pace == "realtime" and not self.stream_url
            first_media: float | None = None
            started = time.monotonic()
            last_kept: float | None = None
            for frame in container.decode(stream):
                if self.stop.is_set():
                    return "done"
                now = time.monotonic()
                media = float(frame.time) if frame.time is not None else self.frames_in / (self.fps_nominal or 25)
                if realtime:  # a file played like a camera: wait for the frame's moment
                    first_media = media if first_media is None else first_media
                    ahead = (media - first_media) - (now - started)
                    if ahead > 0 and self.stop.wait(ahead):
                        return "done"
                    now = time.monotonic()
                when = self._offset + media if not self.stream_url else now - self._t0
                self._last_media = when
                if self.max_frames is not None and self.frames_in >= self.max_frames:
                    return "done"
                got = True
                index = self.frames_in
                self.frames_in += 1
                if self.spec.max_fps and last_kept is not None and when - last_kept < 1.0 / self.spec.max_fps - 1e-6:
                    self.skipped += 1
                    continue
                last_kept = when
                image = frame.to_image()
                if not self.slot.put(Frame(index, round(when, 4), now, time.time(), image), self.stop):
                    return "done"
        except (av.FFmpegError, OSError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.connected = False
            container.close()
        if not self.stream_url and self.error is not None:
            return "done"  # a broken file does not get better
        if not self.stream_url:  # a file's end
            if self.spec.loop and got:
                self._offset = self._last_media + 1.0 / (self.fps_nominal or 25)
                return "again"
            return "done"
        if self.error is None:
            self.error = "the stream ended"
        return "ok" if got else "failed"
