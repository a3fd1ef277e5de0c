#!/usr/bin/env python3
"""What the detection metrics and the capture cost per request, in-process (the worker's side).

    .venv/bin/python scripts/bench_observe.py [--mar model-store/shapes-1.0.mar] [--images data/shapes/test]

Runs the same single-image requests through ``Worker.handle`` (what a TorchServe worker runs) in
five modes, interleaved round by round so that drift of the machine hits every mode alike:

- ``bare``: no statistics, no metrics (``Worker.observe`` replaced by a no-op);
- ``stats``: the per-image statistics only (sizes, brightness, answered classes and scores);
- ``torchserve``: statistics + TorchServe's metrics cache (the handler's path: one log line per
  metric, parsed by the frontend: that JVM side is not in this number);
- ``prometheus``: statistics + prometheus_client (the KServe server's path);
- ``capture 10 %`` / ``capture 100 %``: ``torchserve`` + capture on (``rate`` 0.1 / 1.0).

Prints the median per request and the difference to ``bare``. Run it on a quiet machine (`uptime`).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from serve_demo.core.capture import CaptureConfig, Capturer  # noqa: E402
from serve_demo.core.torchserve_metrics import TorchServeSink  # noqa: E402
from serve_demo.core.worker import Worker  # noqa: E402
from serve_demo.serve.kserve_server import PrometheusSink  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mar", default="model-store/shapes-1.0.mar")
    p.add_argument("--images", default="data/shapes/test")
    p.add_argument("--count", type=int, default=40, help="images per round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} (run it on a quiet machine)")
    torch.set_num_threads(1)
    det = Worker.from_archive(args.mar, threads=1)
    bodies = [f.read_bytes() for f in sorted(Path(args.images).glob("*.jpg"))[: args.count]]
    headers = [{"Content-Type": "image/jpeg"}]

    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    ts_cache = MetricsCacheYamlImpl(str(Path(__file__).resolve().parent.parent / "docker/metrics.yaml"))
    ts_cache.initialize_cache()
    import logging

    logging.getLogger().handlers.clear()
    logging.getLogger().addHandler(logging.StreamHandler(io.StringIO()))  # the worker logs metric lines
    logging.getLogger().setLevel(logging.INFO)
    sinks = {"torchserve": TorchServeSink(ts_cache), "prometheus": PrometheusSink()}
    real_observe = det.observe
    tmp = Path(tempfile.mkdtemp(prefix="bench-capture-"))
    capturers = {rate: Capturer(CaptureConfig(enabled=True, rate=rate, dir=str(tmp / str(rate)), max_images=10**6,
                                              queue=64), det.name, det.version, det.names) for rate in (0.1, 1.0)}
    modes = {
        "bare": (lambda *a: None, None, None),
        "stats": (real_observe, None, None),
        "torchserve": (real_observe, sinks["torchserve"], None),
        "prometheus": (real_observe, sinks["prometheus"], None),
        "capture 10 %": (real_observe, sinks["torchserve"], capturers[0.1]),
        "capture 100 %": (real_observe, sinks["torchserve"], capturers[1.0]),
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    for body in bodies[:5]:  # warm-up
        det.handle([{"body": body}], headers)
    for _ in range(args.rounds):
        for mode, (obs, sink, cap) in modes.items():
            det.observe, det.sink, det.capturer = obs, sink, cap
            for body in bodies:
                t0 = time.perf_counter()
                det.handle([{"body": body}], headers)
                times[mode].append((time.perf_counter() - t0) * 1000)
        for cap in capturers.values():
            cap.flush(60)
    bare = statistics.median(times["bare"])
    print(f"{len(bodies)} images x {args.rounds} rounds per mode, one thread; median ms per request:")
    for mode, ts in times.items():
        med = statistics.median(ts)
        print(f"  {mode:<14} {med:7.2f} ms   {med - bare:+6.2f} ms ({(med - bare) / bare * 100:+5.1f} %)")
    saved = {rate: c.saved for rate, c in capturers.items()}
    print(f"captured: {saved[0.1]} images at 10 %, {saved[1.0]} at 100 % (of {len(bodies) * args.rounds} offered)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
