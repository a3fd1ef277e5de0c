"""``serve_demo stream SOURCE [SOURCE ...] --out DIR``: live sources through the served detector, tracked and
counted.

Writes per source ``DIR/NAME.mp4`` (annotated: boxes, track ids and traces, lines and zones with their
counts), ``DIR/NAME.jsonl`` (per processed frame: ``frame``, ``time``, ``wall``, ``latency_ms``,
``detections`` each with its ``track_id``, and the ``counts``) and at the end ``DIR/summary.json``.
While it runs: a watchdog line per source every few seconds, and a page on 127.0.0.1 with every source
as MJPEG, ``/status`` and ``/metrics`` for Prometheus. Ctrl-C stops it and finishes the files.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from serve_demo.core import defaults

from .spec import PACES, SpecError, StreamSpec, parse_points, region

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = StreamSpec(out=Path("."))
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="video files, stream URLs (rtsp://, http(s)://, rtmp://, udp://, srt://) or cameras "
                        "(/dev/videoN)")
    p.add_argument("--out", required=True, help="folder for NAME.mp4, NAME.jsonl and summary.json")
    p.add_argument("--sources-file", type=Path, default=None,
                   help="YAML/JSON list of sources with their lines and zones; re-read when it changes, so "
                        "sources are added and removed while running (docs/streams.md)")
    p.add_argument("--model", default=d.model)
    p.add_argument("--url", default=f"http://127.0.0.1:{defaults.port('INFERENCE_PORT')}",
                   help="the server's inference URL")
    p.add_argument("--token", default=None, help="inference key (default: HOME/key_file.json if present)")
    p.add_argument("--home", default=defaults.HOME, help="the local server's folder (its key_file.json)")
    p.add_argument("--threshold", type=float, default=d.threshold, help=f"score threshold (default {d.threshold})")
    p.add_argument("--inflight", type=int, default=d.inflight,
                   help=f"requests in flight across all sources: the server's capacity (default {d.inflight})")
    p.add_argument("--max-fps", type=float, default=None, help="at most this many frames a second per source")
    p.add_argument("--pace", choices=PACES, default="fast",
                   help="files: every frame as fast as the server answers (fast, default), or at the file's own "
                        "rate with the oldest frames dropped, like a camera (realtime)")
    p.add_argument("--loop", action="store_true", help="files: start over at the end (stop with Ctrl-C or --duration)")
    p.add_argument("--line", action="append", default=[], metavar="[NAME=]X1,Y1,X2,Y2",
                   help="a counting line on every source given here, in pixels (repeatable)")
    p.add_argument("--zone", action="append", default=[], metavar="[NAME=]X1,Y1,X2,Y2,X3,Y3,...",
                   help="a counting zone (polygon) on every source given here (repeatable)")
    p.add_argument("--port", type=int, default=d.port,
                   help=f"the live page's port on 127.0.0.1 (default {d.port}; 0 = a free one, -1 = no page)")
    p.add_argument("--report-every", type=float, default=d.report_every, help="seconds between watchdog lines")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--max-frames", type=int, default=None, help="stop each source after this many frames read")
    p.add_argument("--no-video", action="store_true", help="write no MP4 (JSON lines and the page only)")


def _regions(items: list[str], kind: str):
    out = []
    for i, item in enumerate(items):
        name, sep, points = item.rpartition("=")
        out.append(region(name if sep else f"{kind}{i + 1}", parse_points(points, f"--{kind}"), kind))
    return tuple(out)


def main(args: argparse.Namespace) -> int:
    from serve_demo.serve.management import read_key

    from .runner import StreamRunner, resolve

    logging.getLogger("serve_demo.stream").setLevel(logging.INFO)
    if not args.sources and args.sources_file is None:
        print("stream: give at least one SOURCE or --sources-file (make stream plays a generated clip)",
              file=sys.stderr)
        return 2
    if args.inflight < 1 or (args.max_fps is not None and args.max_fps <= 0):
        print("stream: --inflight must be at least 1 and --max-fps positive", file=sys.stderr)
        return 2
    try:
        spec = StreamSpec(out=Path(args.out), model=args.model, url=args.url.rstrip("/"),
                          token=args.token or read_key(args.home, "inference"), threshold=args.threshold,
                          inflight=args.inflight, port=None if args.port < 0 else args.port,
                          report_every=args.report_every, duration=args.duration, max_frames=args.max_frames,
                          sources_file=args.sources_file, video=not args.no_video)
        spec, sources = resolve(spec, args.sources, max_fps=args.max_fps, pace=args.pace, loop=args.loop,
                                lines=_regions(args.line, "line"), zones=_regions(args.zone, "zone"))
    except SpecError as exc:
        print(f"stream: {exc}", file=sys.stderr)
        return 2
    runner = StreamRunner(spec, sources)

    def interrupt(signum, frame):  # first Ctrl-C: finish the files; second: leave now
        if runner._stop.is_set():
            raise KeyboardInterrupt
        print("\nstream: stopping (finishing the files; Ctrl-C again to leave at once)", file=sys.stderr)
        runner.stop()

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        summary = runner.run()
    except RuntimeError as exc:
        print(f"stream: {exc}", file=sys.stderr)
        return 2
    for name, f in summary["sources"].items():
        lat = f["latency_ms"]
        crossings = ((f["counts"] or {}).get("lines") or {}).items()
        lines = "  ".join(f"{n} in {c['in']} out {c['out']}" for n, c in crossings)
        print(f"{name}: {f['frames_in']} frames in, {f['processed']} processed ({f['fps_out']} fps), "
              f"{f['dropped']} dropped, {f['skipped']} skipped, latency p50 {lat['p50']} ms p95 {lat['p95']} ms, "
              f"{f['reconnects']} reconnects, {f['errors']} errors{'  ' + lines if lines else ''}")
    names = sorted(summary["sources"])
    files = [f"{n}.{ext}" for n in names for ext in (("mp4", "jsonl") if spec.video else ("jsonl",))]
    print(f"wrote {', '.join(files + ['summary.json'])} in {spec.out}")
    if runner.error is not None:
        print(f"stream: {runner.error}", file=sys.stderr)
        return 2
    return 0
