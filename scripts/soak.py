"""Soak (or plain load test) of the running local server with locust, watching worker memory.

    make soak                         # 50 users x 5 min, 10 % malformed requests, RSS sampled
    make loadtest USERS=20 DURATION=2m

Runs ``locust -f scripts/locustfile.py`` headless against the server ``make serve`` started,
samples every worker's RSS (psutil) every few seconds, and writes to OUT (default reports/soak):
``locust_stats.csv`` and friends, ``locust.html``, ``rss.csv`` and ``soak.json``. Prints a
summary; exits 1 when a request got an unexpected answer or, with ``--max-rss-growth``, when
the workers' RSS grew more than that after the warm-up (the first fifth of the run).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serve_demo.serve.management import Management, ManagementError  # noqa: E402


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``5m``, ``1h`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def worker_pids(management: str, model: str, home: str) -> list[int]:
    versions = Management(management, home=home).versions(model)
    return [w["pid"] for v in versions for w in v.get("workers", []) if w.get("pid")]


def sample_rss(pids: list[int], out: list[tuple[float, int]], stop: threading.Event, every: float) -> None:
    t0 = time.monotonic()
    while not stop.is_set():
        total = 0
        for pid in pids:
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                pass
        out.append((time.monotonic() - t0, total))
        stop.wait(every)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--spawn-rate", type=float, default=10)
    p.add_argument("--duration", default="5m", help="e.g. 90s, 5m")
    p.add_argument("--model", default="shapes")
    p.add_argument("--url", default=f"http://127.0.0.1:{os.environ.get('INFERENCE_PORT', '8080')}")
    p.add_argument("--management-url", default=f"http://127.0.0.1:{os.environ.get('MANAGEMENT_PORT', '8081')}")
    p.add_argument("--home", default="build/server", help="the server's folder (key_file.json)")
    p.add_argument("--bad-share", type=float, default=0.1, help="fraction of malformed requests")
    p.add_argument("--images", default="data/shapes/test")
    p.add_argument("--out", default="reports/soak")
    p.add_argument("--max-rss-growth", type=float, default=None, help="fail above this growth (0.05 = 5 %%)")
    args = p.parse_args()

    seconds = parse_duration(args.duration)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        pids = worker_pids(args.management_url, args.model, args.home)
    except ManagementError as exc:
        print(f"soak: no server answers at {args.management_url} ({exc}); start it with `make serve`", file=sys.stderr)
        return 2
    rss: list[tuple[float, int]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(pids, rss, stop, max(1.0, seconds / 100)), daemon=True)
    env = {**os.environ, "MODEL": args.model, "BAD_SHARE": str(args.bad_share), "IMAGES": args.images,
           "SERVER_HOME": args.home}
    cmd = [str(Path(sys.executable).parent / "locust"), "-f", str(ROOT / "scripts" / "locustfile.py"), "--headless",
           "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{seconds}s", "--host", args.url,
           "--csv", str(out / "locust"), "--html", str(out / "locust.html"), "--only-summary",
           "--stop-timeout", "30"]
    print(f"soak: {args.users} users for {seconds} s against {args.url}/predictions/{args.model} "
          f"({args.bad_share:.0%} malformed), workers {pids}")
    sampler.start()
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - t0
    stop.set()
    sampler.join()

    with open(out / "locust_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    agg = rows["Aggregated"]
    with open(out / "rss.csv", "w") as f:
        f.write("seconds,rss_bytes\n" + "".join(f"{t:.1f},{b}\n" for t, b in rss))
    warm = next((b for t, b in rss if t >= seconds / 5), rss[0][1])
    end = rss[-1][1]
    growth = (end - warm) / warm if warm else 0.0
    result = {
        "users": args.users, "seconds": round(elapsed), "bad_share": args.bad_share, "model": args.model,
        "requests": int(agg["Request Count"]), "failures": int(agg["Failure Count"]),
        "rps": round(float(agg["Requests/s"]), 2), "median_ms": float(agg["Median Response Time"]),
        "p95_ms": float(agg["95%"]), "p99_ms": float(agg["99%"]), "max_ms": float(agg["Max Response Time"]),
        "worker_rss_mib": {"start": round(rss[0][1] / 2**20), "after_warmup": round(warm / 2**20),
                           "end": round(end / 2**20), "growth_after_warmup": round(growth, 4)},
        "workers_replaced": sorted(set(pids) - set(worker_pids(args.management_url, args.model, args.home))),
        "locust_exit": proc.returncode,
    }
    (out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    bad = result["failures"] > 0 or result["workers_replaced"] or (
        args.max_rss_growth is not None and growth > args.max_rss_growth)
    print(f"soak: {'FAIL' if bad else 'PASS'}; report in {out}/ (soak.json, locust.html, rss.csv)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
