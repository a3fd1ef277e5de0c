"""CPU time per request of every process of a server, TorchServe against LitServe.

    make bench BENCH_MODELS=demo              # builds build/bench/demo/store (shipped, eager archives)
    .venv/bin/python scripts/cpu_per_request.py [--requests 120]

Starts TorchServe with `shipped-1.0.mar` (make archive's defaults) and then LitServe on the eager
archive, sends the same requests at concurrency 4, and prints the CPU milliseconds each process used per request
(psutil user + system), with the throughput. On a CPU-bound machine, throughput is about
cores x 1000 / (total CPU ms per request), so this shows which process costs what.
docs/performance.md has the figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve_demo.bench.runner import litserve_server, load, load_images, multipart_sender, start_torchserve  # noqa: E402


def cpu_seconds(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def account(procs: dict[str, psutil.Process], send, images: list[bytes], n: int) -> tuple[float, dict[str, float]]:
    load(send, images, 4, 8)  # warm-up
    me = psutil.Process()
    before = {name: cpu_seconds(p) for name, p in procs.items()}
    mine = cpu_seconds(me)
    result = load(send, images, 4, n)
    per = {name: round((cpu_seconds(p) - before[name]) * 1000 / n, 1) for name, p in procs.items()}
    per["client (this process)"] = round((cpu_seconds(me) - mine) * 1000 / n, 1)
    return result["throughput_rps"], per


def report(name: str, rate: float, per: dict[str, float]) -> None:
    total = sum(per.values())
    parts = ", ".join(f"{k} {v}" for k, v in per.items() if v >= 0.5)
    print(f"{name}: {rate:.1f} req/s; CPU ms per request: {parts}; total {total:.1f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="build/bench/demo/store")
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--port", type=int, default=18660)
    p.add_argument("--metrics-mode", default="prometheus", choices=("prometheus", "log"),
                   help="TorchServe's metrics_mode (shipped: prometheus; log writes metric lines per request)")
    p.add_argument("--torchserve-only", action="store_true", help="skip the LitServe measurement")
    args = p.parse_args()
    store = Path(args.store)
    if not (store / "shipped-1.0.mar").exists():
        print(f"{store}/shipped-1.0.mar is missing: run `make bench BENCH_MODELS=demo` first", file=sys.stderr)
        return 2
    images = load_images(Path("data/shapes"), "test", 40)

    ts = start_torchserve(Path("build/bench/cpu-acct"), store, "shipped-1.0.mar", args.metrics_mode)
    try:
        desc = requests.get(f"{ts.management_url}/models/shipped", headers=ts.auth(), timeout=5).json()[0]
        procs = {"JVM frontend": psutil.Process(ts.pid())}
        procs.update({f"worker {w['pid']}": psutil.Process(w["pid"]) for w in desc["workers"]})
        send = multipart_sender(f"{ts.inference_url}/predictions/shipped", ts.auth("inference"))
        report(f"TorchServe (metrics_mode={args.metrics_mode}), {len(desc['workers'])} workers, shipped defaults",
               *account(procs, send, images, args.requests))
    finally:
        ts.stop()
    if args.torchserve_only:
        return 0

    with litserve_server(store / "eager-1.0.mar", 1, 2, args.port) as proc:
        root = psutil.Process(proc.pid)
        procs = {"launcher": root}
        for child in root.children(recursive=True):
            cmd = " ".join(child.cmdline())
            kind = "inference worker" if "multiprocessing.spawn" in cmd else "API server / helper"
            procs[f"{kind} {child.pid}"] = child
        send = multipart_sender(f"http://127.0.0.1:{args.port}/predict", {})
        report("LitServe, 1 worker x 2 threads", *account(procs, send, images, args.requests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
