"""``serve_demo video IN --out OUT.mp4``: one video file or stream through the served detector.

One source through :mod:`serve_demo.stream`'s runner (the same reader, requests in flight, tracker
and sinks as ``serve_demo stream``), named after ``OUT``: every ``--every``-th frame is sent, with up to
``--inflight`` requests at once; every frame is written to ``OUT`` with the latest tracked detections
drawn, and each sent frame's detections (with their ``track_id``) go to ``OUT`` with ``.jsonl``.
A file, or a video file over HTTP, is read whole; a live stream (RTSP, a camera) drops the oldest
frames when the server falls behind. The achieved frames per second are printed at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from serve_demo.core import defaults
from serve_demo.serve.client import DEFAULT_URL

from .spec import SourceSpec, SpecError, StreamSpec, check_source


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


def run(spec: VideoSpec) -> dict:
    """Process the video; return ``{"frames", "sent", "errors", "seconds", "fps", "out", "jsonl"}``.

    Raises:
        ValueError: no such file, or ``every``/``inflight`` below 1 (the message says which).
        RuntimeError: the server refused the frames (wrong key or model; the server's message).
    """
    from .runner import StreamRunner

    if spec.every < 1 or spec.inflight < 1:
        raise ValueError("--every and --inflight must be at least 1")
    if spec.out.suffix.lower() != ".mp4":
        raise ValueError(f"--out {spec.out}: expected a .mp4 path")
    try:
        check_source(spec.source)
    except SpecError as exc:
        raise ValueError(str(exc)) from None
    source = SourceSpec(spec.out.stem, spec.source, every=spec.every)
    runner = StreamRunner(StreamSpec(out=spec.out.parent, model=spec.model, url=spec.url, token=spec.token,
                                     threshold=spec.threshold, inflight=spec.inflight, port=None,
                                     max_frames=spec.max_frames, summary=False), [source])
    t0 = time.perf_counter()
    summary = runner.run()
    seconds = time.perf_counter() - t0
    if runner.error is not None:
        raise RuntimeError(str(runner.error))
    f = summary["sources"][source.name]
    frames = f["frames_in"]
    if not frames:
        raise ValueError(f"cannot read {spec.source}: {f.get('error') or 'no frame decoded'}")
    return {"frames": frames, "sent": f["processed"], "errors": f["errors"], "seconds": round(seconds, 2),
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
    from serve_demo.serve.management import read_key

    spec = VideoSpec(args.source, Path(args.out), args.model, args.url.rstrip("/"),
                     args.token or read_key(args.home, "inference"), args.threshold, args.every, args.inflight,
                     args.max_frames)
    try:
        result = run(spec)
    except (ValueError, RuntimeError) as exc:
        print(f"video: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result['out']} ({result['frames']} frames, {result['sent']} sent"
          f"{', ' + str(result['errors']) + ' failed' if result['errors'] else ''}) and {result['jsonl']}; "
          f"{result['fps']} frames/s")
    return 0
