"""``make bench-streams``: 1, 2 and 4 live cameras at 25 fps into the running server, one quiet run.

Each camera is the moving-shapes clip (``serve_demo clip``, MJPEG) served by the local RTSP server
(``scripts/rtsp_server.py``, GStreamer) on a free loopback port; ``serve_demo stream``'s runner reads
them for ``--seconds`` with ``--inflight`` requests shared. Per layout it prints and writes
(``reports/bench/streams.md`` and ``.json``): frames/s in and answered per source, the share dropped,
capture-to-answer latency p50/p95, and the tracking scores of the answered frames against the truth.
The machine must be quiet (the load average is checked first, as ``make bench`` does).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from serve_demo.core import defaults
from serve_demo.evaluate.tracking import read_rows, score
from serve_demo.stream import clip as clips
from serve_demo.stream.rtsp import LocalRtspServer
from serve_demo.stream.runner import StreamRunner
from serve_demo.stream.spec import Region, SourceSpec, StreamSpec

from .runner import busy, platform_cpu

log = logging.getLogger(__name__)


def measure(layouts: list[int], seconds: float, url: str, token: str | None, model: str, inflight: int,
            out: Path, spec: clips.ClipSpec) -> list[dict]:
    """One row per layout: N cameras for ``seconds`` each."""
    camera_clip = out / "camera.mkv"
    truth_path = clips.write(spec, camera_clip, "mjpeg")
    truth = json.loads(truth_path.read_text())
    line = Region("door", tuple((float(x), float(y)) for x, y in spec.line))
    rows = []
    for n in layouts:
        camera = LocalRtspServer({f"cam{i + 1}": camera_clip for i in range(n)})
        camera.start()
        try:
            run_out = out / f"{n}-sources"
            sources = [SourceSpec(f"cam{i + 1}", camera.url(f"cam{i + 1}"), lines=(line,)) for i in range(n)]
            summary = StreamRunner(StreamSpec(out=run_out, model=model, url=url, token=token, inflight=inflight,
                                              port=None, duration=seconds, report_every=seconds + 1), sources).run()
        finally:
            camera.stop()
        for name, f in sorted(summary["sources"].items()):
            tracking = score(read_rows(run_out / f"{name}.jsonl"), truth)
            rows.append({"sources": n, "source": name, "fps_in": round(f["frames_in"] / seconds, 1),
                         "fps_out": round(f["processed"] / seconds, 1),
                         "dropped": round(f["dropped"] / max(f["frames_in"], 1), 3),
                         "p50_ms": f["latency_ms"]["p50"], "p95_ms": f["latency_ms"]["p95"],
                         "mota": tracking["mota"], "idf1": tracking["idf1"], "switches": tracking["switches"],
                         "errors": f["errors"]})
        log.info("%d source(s) done", n)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| sources | source | fps in | fps answered | dropped | latency p50 ms | p95 ms | MOTA | IDF1 | "
            "ID switches |\n|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(f"| {r['sources']} | {r['source']} | {r['fps_in']} | {r['fps_out']} | {r['dropped']:.0%} | "
                          f"{r['p50_ms']} | {r['p95_ms']} | {r['mota']:.3f} | {r['idf1']:.3f} | {r['switches']} |\n"
                          for r in rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sources", default="1,2,4", help="camera counts to run, one after another (default 1,2,4)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds per layout (default 20)")
    p.add_argument("--model", default=defaults.DEMO_NAME)
    p.add_argument("--url", default=f"http://127.0.0.1:{defaults.port('INFERENCE_PORT')}")
    p.add_argument("--home", default=defaults.HOME, help="the server's folder (its key_file.json)")
    p.add_argument("--inflight", type=int, default=defaults.STREAM_INFLIGHT)
    p.add_argument("--width", type=int, default=320, help="camera frame width (height: 3/4 of it)")
    p.add_argument("--out", type=Path, default=Path("reports/bench/streams"))
    p.add_argument("--allow-busy", action="store_true", help="measure even when the machine is busy (marked)")


def main(args: argparse.Namespace) -> int:
    from serve_demo.core.layout import available_cpus
    from serve_demo.serve.management import read_key

    logging.getLogger("serve_demo").setLevel(logging.INFO)
    cores = available_cpus()
    is_busy, loads = busy(cores)
    if is_busy and not args.allow_busy:
        print(f"bench-streams: load average {loads} on {cores} cores: something else is running (stop it, or "
              "--allow-busy to measure anyway, marked as busy)", file=sys.stderr)
        return 2
    spec = clips.ClipSpec.at_width(args.width, seconds=max(args.seconds, 12.0) + 4)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        rows = measure([int(n) for n in args.sources.split(",")], args.seconds, args.url.rstrip("/"),
                       read_key(args.home, "inference"), args.model, args.inflight, args.out, spec)
    except RuntimeError as exc:
        print(f"bench-streams: {exc}", file=sys.stderr)
        return 2
    header = (f"{cores} CPU cores ({platform_cpu()}); load average before {loads}"
              f"{' (BUSY)' if is_busy else ' (quiet)'}; model {args.model}, {spec.width}x{spec.height} MJPEG "
              f"cameras at {spec.fps} fps over RTSP, inflight {args.inflight}, {args.seconds:.0f} s per layout; "
              f"{time.strftime('%Y-%m-%d', time.localtime(t0))}")
    md = f"{header}\n\n{table(rows)}"
    (args.out.parent / "streams.md").write_text(md)
    (args.out.parent / "streams.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    print(md)
    return 0
