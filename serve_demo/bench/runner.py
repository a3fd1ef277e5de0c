"""``make bench``: the model's own limit against the servers, measured in one run.

On the same images and weights:

* **limit**: the archive's model in-process, back to back, same decoding and JSON, same threads;
* **ours**: this project's handler on TorchServe, over a sweep of workers x threads and
  batch size / max batch delay, with mixed-size and same-size images;
* **stock**: TorchServe's built-in ``object_detector`` handler on the same weights (same-size
  images; a batch of mixed sizes is shown failing);
* **kserve**: the same archives on KServe's ``ModelServer`` (``make serve SERVER=kserve``), one
  process, unbatched and batched;
* **litserve**: the same model served by LitServe.

Each server gets latency at concurrency 1 (p50/p95/p99) and throughput at concurrency 2, 4 and 8.
Every request is sent as multipart field ``data`` (a form all four servers read), from Python
threads on the same machine. Writes ``bench.json``, ``bench.md`` and two plots to ``--out``.
Ratios are the headline, not absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import requests
from PIL import Image

log = logging.getLogger(__name__)

CONCURRENCY = (2, 4, 8)


def load_images(dataset: Path, split: str, n: int, size: tuple[int, int] | None = None) -> list[bytes]:
    """The first ``n`` images of a split as JPEG bytes (resized to ``size`` when given)."""
    from serve_demo.data.coco import load_coco, split_dir

    coco = load_coco(dataset, split)
    folder = split_dir(dataset, split)
    out = []
    for im in sorted(coco["images"], key=lambda i: i["id"])[:n]:
        if size is None:
            out.append((folder / im["file_name"]).read_bytes())
        else:
            buf = io.BytesIO()
            Image.open(folder / im["file_name"]).convert("RGB").resize(size).save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
    return out


def stats(latencies: list[float]) -> dict[str, float]:
    a = np.asarray(latencies) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 1), "p95_ms": round(float(np.percentile(a, 95)), 1),
            "p99_ms": round(float(np.percentile(a, 99)), 1), "mean_ms": round(float(a.mean()), 1)}


def load(send: Callable[[requests.Session, bytes], bool], images: list[bytes], concurrency: int,
         total: int) -> dict[str, Any]:
    """``total`` requests from ``concurrency`` threads; throughput, latency, errors."""
    lock, counter = threading.Lock(), [0]
    latencies: list[float] = []
    errors = [0]

    def worker() -> None:
        with requests.Session() as s:
            while True:
                with lock:
                    i = counter[0]
                    counter[0] += 1
                if i >= total:
                    return
                t0 = time.perf_counter()
                ok = send(s, images[i % len(images)])
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    errors[0] += 0 if ok else 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    elapsed = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": total, "errors": errors[0],
            "throughput_rps": round(total / elapsed, 2), **stats(latencies), "latencies": latencies}


def measure_server(send, images: list[bytes], n_latency: int, n_load: int) -> dict[str, Any]:
    """Warm up, then c=1 latency and throughput at each concurrency."""
    with requests.Session() as s:
        for data in images[:4]:
            send(s, data)
    result = {"c1": load(send, images, 1, n_latency)}
    for c in CONCURRENCY:
        result[f"c{c}"] = load(send, images, c, n_load)
    return result


def multipart_sender(url: str, headers: dict[str, str]) -> Callable[[requests.Session, bytes], bool]:
    def send(s: requests.Session, data: bytes) -> bool:
        r = s.post(url, files={"data": ("image.jpg", data, "image/jpeg")}, headers=headers, timeout=120)
        return r.status_code == 200 and isinstance(r.json(), list)
    return send


def bench_inprocess(mar: Path, images: list[bytes], threads: int) -> dict[str, Any]:
    """The limit: decode + model + JSON for each image, back to back, in this process."""
    import torch

    from serve_demo.core.schema import dumps
    from serve_demo.core.worker import Detector

    torch.set_num_threads(threads)
    model = Detector.from_archive(mar)
    for data in images[:4]:
        model.predict(data, 0.5, "stock")
    latencies = []
    t0 = time.perf_counter()
    for data in images:
        t = time.perf_counter()
        dumps(model.predict(data, 0.5, "stock"))
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t0
    return {"throughput_rps": round(len(images) / elapsed, 2), **stats(latencies), "latencies": latencies,
            "threads": threads}


def stock_archive(weights: Path, labels: Path, arch: str, store: Path, build: Path, batch: int) -> Path:
    """An archive of the same weights for TorchServe's built-in ``object_detector`` handler."""
    from serve_demo.archive.builder import stage_extra_files
    from serve_demo.core.loader import read_label_map

    stage = build / "stock-extra"
    shutil.rmtree(stage, ignore_errors=True)
    stage_extra_files(stage, labels)
    n = len(read_label_map(labels))
    model_file = build / "stock_model.py"
    model_file.write_text(
        '"""Generated by serve_demo.bench.runner: the architecture, constructible without arguments."""\n'
        "import torch\n\nfrom serve_demo.core.models import build_model\n\n\n"
        "class StockDetector(torch.nn.Module):\n"
        "    def __new__(cls):\n"
        f"        return build_model({arch!r}, {n})\n")
    (build / "stock-config.yaml").write_text(f"minWorkers: 1\nmaxWorkers: 1\nbatchSize: {batch}\n"
                                             "maxBatchDelay: 5\nresponseTimeout: 120\n")
    tmp = build / "stock-tmp"
    tmp.mkdir(exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "torch-model-archiver"), "--model-name", f"stock_b{batch}",
           "--version", "1.0", "--serialized-file", str(weights.resolve()), "--model-file", str(model_file),
           "--handler", "object_detector", "--extra-files", str(stage), "--config-file",
           str(build / "stock-config.yaml"), "--export-path", str(store), "--force"]
    subprocess.run(cmd, check=True, env={**os.environ, "TMPDIR": str(tmp)}, capture_output=True)
    return store / f"stock_b{batch}.mar"


def ours_archive(weights: Path, labels: Path, arch: str, store: Path, build: Path, name: str, workers: int,
                 threads: int, batch: int, delay: int) -> Path:
    from serve_demo.archive.builder import ArchiveSpec
    from serve_demo.archive.builder import build as build_archive

    return build_archive(ArchiveSpec(name=name, weights=str(weights), labels=str(labels), arch=arch,
                                     batch_size=batch, max_batch_delay=delay, workers=workers, threads=threads,
                                     export_path=str(store), build_dir=str(build), no_check=True))


def start_torchserve(home: Path, store: Path, models: str, metrics_mode: str = "log"):
    """TorchServe with the shipped config on free ports; ``metrics_mode`` log by default, because
    the per-request HandlerTime lines need it (the shipped prometheus mode keeps only the last
    value of a gauge)."""
    from serve_demo.serve.torchserve import TorchServe

    ts = TorchServe.on_free_ports(home, store, models=models, environment={"TS_METRICS_MODE": metrics_mode})
    ts.start()
    ts.wait_ready(180)
    return ts


def handler_times(home: Path, model: str) -> list[float]:
    """TorchServe's own ``HandlerTime`` metric (ms) of each request to ``model``, in order."""
    import re

    path = home / "logs" / "model_metrics.log"
    if not path.exists():
        return []
    pattern = re.compile(r"HandlerTime\.ms:([0-9.]+)\|#ModelName:" + re.escape(model) + r",")
    return [float(m.group(1)) for m in pattern.finditer(path.read_text())]


@contextlib.contextmanager
def litserve_server(mar: Path, workers: int, threads: int, port: int):
    """``serve_demo.serve.litserve_app`` running on ``port`` until the block ends (its whole process group)."""
    proc = subprocess.Popen([sys.executable, "-m", "serve_demo.serve.litserve_app", "--mar", str(mar),
                             "--port", str(port), "--threads", str(threads), "--workers", str(workers)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"LitServe exited ({proc.returncode}): run python -m serve_demo.serve.litserve_app "
                                   f"--mar {mar} to see why")
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        yield proc
    finally:  # LitServe's API server and workers are child processes: end the whole group
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)


def bench_litserve(mar: Path, workers: int, threads: int, port: int, images: list[bytes], n_lat: int,
                   n_load: int) -> dict[str, Any]:
    """The same model served by LitServe with this layout."""
    with litserve_server(mar, workers, threads, port):
        return measure_server(multipart_sender(f"http://127.0.0.1:{port}/predict", {}), images, n_lat, n_load)


def bench_kserve(store: Path, home: Path, name: str, images: list[bytes], n_lat: int, n_load: int) -> dict[str, Any]:
    """The same archive on KServe's ModelServer (TorchServe's /predictions route, multipart)."""
    from serve_demo.serve.kserve_local import KServeServer

    with KServeServer.on_free_ports(home, store, [f"{name}-1.0.mar"]).running(180) as ks:
        return measure_server(multipart_sender(f"{ks.url}/predictions/{name}", {}), images, n_lat, n_load)


def write_outputs(out: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    limit = result["limit"]["mixed"]["throughput_rps"]
    ax.axhline(limit, color="black", ls="--", lw=1, label=f"in-process limit ({limit:.1f}/s)")
    for r in rows:
        xs = [1, *CONCURRENCY]
        ys = [r["c1"]["throughput_rps"]] + [r[f"c{c}"]["throughput_rps"] for c in CONCURRENCY]
        ax.plot(xs, ys, marker="o", label=r["label"])
    ax.set(xlabel="concurrent clients", ylabel="images / s", title="Throughput vs concurrency",
           xticks=[1, *CONCURRENCY])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_concurrency.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    lat = np.sort(np.asarray(result["limit"]["mixed"]["latencies"]) * 1000)
    ax.plot(lat, np.linspace(0, 1, len(lat)), color="black", ls="--", label="in-process limit")
    for r in rows:
        lat = np.sort(np.asarray(r["c1"]["latencies"]) * 1000)
        ax.plot(lat, np.linspace(0, 1, len(lat)), label=r["label"])
    ax.set(xlabel="latency at concurrency 1 (ms)", ylabel="fraction of requests", title="Latency CDF (c=1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png")
    plt.close(fig)

    for r in rows:
        for k in list(r):
            if isinstance(r[k], dict):
                r[k].pop("latencies", None)
    for v in result["limit"].values():
        v.pop("latencies", None)
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")

    lim = result["limit"]
    lines = [f"# Benchmark ({result['machine']})", "",
             f"Command: `{result['command']}`; {result['images']} images; {result['date']}.", "",
             f"In-process limit (decode + model + JSON, {lim['mixed']['threads']} threads): mixed sizes "
             f"{lim['mixed']['throughput_rps']}/s, p50 {lim['mixed']['p50_ms']} ms; same size "
             f"{lim['same']['throughput_rps']}/s, p50 {lim['same']['p50_ms']} ms.", "",
             "| server | images | c=1 p50 / p95 / p99 (ms) | c=1 /s | c=2 /s | c=4 /s | c=8 /s | best / limit |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = lim["same" if r["images"] == "same" else "mixed"]
        best = max(r[f"c{c}"]["throughput_rps"] for c in (1, *CONCURRENCY))
        errs = sum(r[f"c{c}"]["errors"] for c in (1, *CONCURRENCY))
        lines.append(f"| {r['label']} | {r['images']} | {r['c1']['p50_ms']} / {r['c1']['p95_ms']} / "
                     f"{r['c1']['p99_ms']} | {r['c1']['throughput_rps']} | {r['c2']['throughput_rps']} | "
                     f"{r['c4']['throughput_rps']} | {r['c8']['throughput_rps']} | {best / ref['throughput_rps']:.2f}"
                     + (f" ({errs} errors)" if errs else "") + " |")
    lines += ["", "Time inside the handler at c=1 (TorchServe's HandlerTime metric, p50) against the client's p50:"]
    lines += [f"- {r['label']} ({r['images']}): handler {r['c1']['handler_p50_ms']} ms of {r['c1']['p50_ms']} ms"
              for r in rows if "handler_p50_ms" in r["c1"]]
    lines += ["", "## Ratios", ""] + [f"- {k}: {v}" for k, v in result["ratios"].items()]
    if result.get("stock_mixed_batch"):
        lines += ["", f"Stock handler, batch of 4 mixed-size images: {result['stock_mixed_batch']}"]
    lines += ["", "![throughput](throughput_vs_concurrency.png)", "", "![latency](latency_cdf.png)", ""]
    (out / "bench.md").write_text("\n".join(lines))


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    store, build = work / "store", work / "build"
    store.mkdir(parents=True)
    weights, labels = Path(args.weights), Path(args.labels)
    mixed = load_images(Path(args.dataset), args.split, args.images)
    same = load_images(Path(args.dataset), args.split, args.images, size=(320, 320))
    cores = os.cpu_count() or 1
    n_lat, n_load = args.images, args.images * 2

    configs = [("ours 1w x 2t b1", 1, cores, 1, 5), ("ours 2w x 1t b1", 2, max(1, cores // 2), 1, 5),
               ("ours 1w x 2t b4 d10", 1, cores, 4, 10)]
    names = []
    for i, (_, w, t, b, d) in enumerate(configs):
        names.append(f"ours{i}")
        ours_archive(weights, labels, args.arch, store, build, f"ours{i}", w, t, b, d)
    stock_archive(weights, labels, args.arch, store, build, 1)
    stock_archive(weights, labels, args.arch, store, build, 4)
    limit_mar = store / "ours0-1.0.mar"

    result: dict[str, Any] = {"machine": f"{cores} CPU cores, torch threads {cores}", "images": args.images,
                              "date": time.strftime("%Y-%m-%d %H:%M"), "command": "make bench", "rows": []}
    kserve_configs = (0, 2)  # the archives of "ours 1w x 2t b1" and "ours 1w x 2t b4 d10"
    steps = tqdm(total=len(configs) * 2 + 5 + len(kserve_configs), desc="bench", file=sys.stderr)
    result["limit"] = {"mixed": bench_inprocess(limit_mar, mixed, cores),
                       "same": bench_inprocess(limit_mar, same, cores)}
    steps.update(1)

    for i, (label, *_rest) in enumerate(configs):
        ts = start_torchserve(work / f"home{i}", store, f"ours{i}-1.0.mar")
        try:
            send = multipart_sender(f"{ts.inference_url}/predictions/ours{i}", ts.auth("inference"))
            for kind, imgs in (("mixed", mixed), ("same", same)):
                if kind == "same" and i:
                    continue
                already = len(handler_times(ts.home, f"ours{i}"))
                row = {"label": label, "images": kind, **measure_server(send, imgs, n_lat, n_load)}
                c1 = handler_times(ts.home, f"ours{i}")[already + 4: already + 4 + n_lat]  # after the warm-up
                if c1:
                    row["c1"]["handler_p50_ms"] = round(float(np.median(c1)), 1)
                result["rows"].append(row)
                steps.update(1)
        finally:
            ts.stop()
        steps.update(1)

    ts = start_torchserve(work / "home-stock", store, "stock_b1.mar,stock_b4.mar")
    try:
        send = multipart_sender(f"{ts.inference_url}/predictions/stock_b1", ts.auth("inference"))
        result["rows"].append({"label": "stock object_detector 1w b1", "images": "same",
                               **measure_server(send, same, n_lat, n_load)})
        batch_url = f"{ts.inference_url}/predictions/stock_b4"
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda d: requests.post(batch_url, files={"data": ("i.jpg", d, "image/jpeg")},
                                                          headers=ts.auth("inference"), timeout=60).status_code,
                                  mixed[:4]))
        result["stock_mixed_batch"] = f"HTTP {codes} (one batch: torch.stack of different sizes fails)"
    finally:
        ts.stop()
    steps.update(1)

    for i in kserve_configs:
        result["rows"].append({"label": "kserve" + configs[i][0][4:], "images": "mixed",
                               **bench_kserve(store, work / f"kserve{i}", f"ours{i}", mixed, n_lat, n_load)})
        steps.update(1)

    for label, workers, threads in (("litserve 1 worker x 2t", 1, cores), ("litserve 2 workers x 1t", 2, 1)):
        result["rows"].append({"label": label, "images": "mixed",
                               **bench_litserve(limit_mar, workers, threads, int(args.litserve_port) + workers, mixed,
                                                n_lat, n_load)})
        steps.update(1)
    steps.close()

    def best(r: dict) -> float:
        return max(r[f"c{c}"]["throughput_rps"] for c in (1, *CONCURRENCY))

    rows = {(r["label"], r["images"]): r for r in result["rows"]}
    ours_best = max((r for r in result["rows"] if r["label"].startswith("ours") and r["images"] == "mixed"), key=best)
    ours_same = rows[("ours 1w x 2t b1", "same")]
    ours_mixed = rows[("ours 1w x 2t b1", "mixed")]
    stock = rows[("stock object_detector 1w b1", "same")]
    lit = max((r for r in result["rows"] if r["label"].startswith("litserve")), key=best)
    lim = result["limit"]
    result["ratios"] = {
        "served throughput / limit (best config, mixed)": round(best(ours_best) / lim["mixed"]["throughput_rps"], 3),
        "best config": ours_best["label"],
        "served p50 - limit p50 at c=1 (ms, mixed)": round(ours_mixed["c1"]["p50_ms"] - lim["mixed"]["p50_ms"], 1),
        "ours / stock throughput (same-size images)": round(best(ours_same) / best(stock), 3),
        "ours / LitServe throughput (mixed, best layout of each)": round(best(ours_best) / best(lit), 3),
        "best LitServe layout": lit["label"],
        "KServe server / TorchServe throughput (same archive, 1w x 2t b1, mixed)":
            round(best(rows[("kserve 1w x 2t b1", "mixed")]) / best(ours_mixed), 3),
        "KServe server / TorchServe throughput (same archive, b4 d10, mixed)":
            round(best(rows[("kserve 1w x 2t b4 d10", "mixed")]) / best(rows[("ours 1w x 2t b4 d10", "mixed")]), 3),
        "ours mixed-size / same-size throughput": round(best(ours_mixed) / best(ours_same), 3),
    }
    write_outputs(out, result)
    print((out / "bench.md").read_text())
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="weights/shapes.pt")
    p.add_argument("--labels", default="index_to_name/shapes.json")
    p.add_argument("--arch", default="fcos_tiny")
    p.add_argument("--dataset", default="data/shapes")
    p.add_argument("--split", default="test")
    p.add_argument("--images", type=int, default=40, help="images per measurement (load phases send twice as many)")
    p.add_argument("--out", default="reports/bench")
    p.add_argument("--work", default="build/bench", help="archives and server homes")
    p.add_argument("--litserve-port", default="18600")
