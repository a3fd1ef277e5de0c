"""``serve_demo video IN --out OUT.mp4``: a video file or stream through the served detector.

Reads ``IN`` with PyAV (FFmpeg): a file, or a stream URL (``http://``, ``rtsp://``, ...). Every
``--every``-th frame is sent to the server (``/predictions/MODEL``, detailed JSON) with up to
``--inflight`` requests at once, answers kept in frame order. Every frame is written to ``OUT``
with the latest detections drawn (the client's drawing, ``serve_demo.core.draw``), and each sent
frame's detections go to a JSON-lines file (``OUT`` with ``.jsonl``). A progress bar runs while
it works; the achieved frames per second are printed at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests

from serve_demo.core import defaults, schema

from .client import DEFAULT_URL, PredictionError, predict_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoSpec:
    """What to read, where to send it and what to write."""

    source: str  # file path or stream URL
    out: Path
    model: str = defaults.DEMO_NAME
    url: str = DEFAULT_URL
    token: str | None = None
    threshold: float = defaults.THRESHOLD
    every: int = 1  # send every k-th frame; the others show the latest detections
    inflight: int = 4  # requests in flight
    max_frames: int | None = None

    @property
    def jsonl(self) -> Path:
        return self.out.with_suffix(".jsonl")


def _encode(frame) -> bytes:
    buf = io.BytesIO()
    frame.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def run(spec: VideoSpec, progress: bool = True) -> dict:
    """Process the video; return ``{"frames", "sent", "seconds", "fps", "out", "jsonl"}``.

    Raises:
        ValueError: the source has no video stream, or ``every``/``inflight`` are below 1.
        PredictionError: the server refused a frame (the message is the server's).
    """
    import av
    from tqdm import tqdm

    from serve_demo.core.draw import draw_detections

    if spec.every < 1 or spec.inflight < 1:
        raise ValueError("--every and --inflight must be at least 1")
    try:
        src = av.open(spec.source, timeout=30)
    except (av.FFmpegError, OSError) as exc:
        raise ValueError(f"cannot open {spec.source}: {exc}") from None
    if not src.streams.video:
        raise ValueError(f"{spec.source} has no video stream")
    stream = src.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or 25
    total = spec.max_frames or stream.frames or None
    spec.out.parent.mkdir(parents=True, exist_ok=True)
    dst = av.open(str(spec.out), "w")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    ostream = dst.add_stream(codec, rate=rate)
    ostream.pix_fmt = "yuv420p"
    ostream.width, ostream.height = stream.codec_context.width, stream.codec_context.height
    local = threading.local()

    def detect(data: bytes) -> dict:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        return predict_bytes(data, spec.model, url=spec.url, threshold=spec.threshold, response_format="detailed",
                             token=spec.token, session=local.session)

    pending: deque[tuple[int, float, object, Future | None]] = deque()
    latest: list = []
    frames = sent = 0
    bar = tqdm(total=total, desc=f"video {spec.model}", unit="frame", file=sys.stderr, disable=not progress)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(spec.inflight) as pool, open(spec.jsonl, "w") as jsonl:
        def flush(block: bool) -> None:
            nonlocal latest
            while pending and (block or len(pending) > spec.inflight or pending[0][3] is None
                               or pending[0][3].done()):
                index, when, image, future = pending.popleft()
                if future is not None:
                    payload = future.result()
                    latest = schema.parse_detections(payload)
                    jsonl.write(json.dumps({"frame": index, "time": round(when, 4),
                                            "detections": payload["detections"]}, separators=(",", ":")) + "\n")
                out = av.VideoFrame.from_image(draw_detections(image, latest))
                for packet in ostream.encode(out):
                    dst.mux(packet)
                bar.update(1)

        for frame in src.decode(stream):
            if spec.max_frames is not None and frames >= spec.max_frames:
                break
            image = frame.to_image()
            when = float(frame.time or frames / float(rate))
            future = pool.submit(detect, _encode(image)) if frames % spec.every == 0 else None
            sent += future is not None
            pending.append((frames, when, image, future))
            frames += 1
            flush(block=False)
        flush(block=True)
    for packet in ostream.encode():
        dst.mux(packet)
    dst.close()
    src.close()
    bar.close()
    seconds = time.perf_counter() - t0
    return {"frames": frames, "sent": sent, "seconds": round(seconds, 2),
            "fps": round(frames / seconds, 2) if seconds else 0.0, "out": str(spec.out), "jsonl": str(spec.jsonl)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a video file, or a stream URL (http://, rtsp://, ...)")
    p.add_argument("--out", required=True, help="annotated video to write (.mp4); detections go to OUT.jsonl")
    p.add_argument("--model", default=defaults.DEMO_NAME)
    p.add_argument("--url", default=DEFAULT_URL, help=f"inference URL (default {DEFAULT_URL})")
    p.add_argument("--threshold", type=float, default=defaults.THRESHOLD)
    p.add_argument("--every", type=int, default=1, help="send every k-th frame (the others show the latest answer)")
    p.add_argument("--inflight", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many frames (streams)")
    p.add_argument("--token", default=None, help="inference key (default: HOME/key_file.json if present)")
    p.add_argument("--home", default=defaults.HOME, help="the local server's folder (its key_file.json)")


def main(args: argparse.Namespace) -> int:
    from .management import read_key

    spec = VideoSpec(args.source, Path(args.out), args.model, args.url.rstrip("/"),
                     args.token or read_key(args.home, "inference"), args.threshold, args.every, args.inflight,
                     args.max_frames)
    try:
        result = run(spec)
    except (ValueError, PredictionError, requests.RequestException) as exc:
        print(f"video: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result['out']} ({result['frames']} frames, {result['sent']} sent) and {result['jsonl']}; "
          f"{result['fps']} frames/s")
    return 0
