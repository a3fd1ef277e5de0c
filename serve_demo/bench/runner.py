"""``make bench``: the model's own limits against the servers, measured in one run, per model.

For each model (the demo's ``fcos_tiny``, a realistic ``fasterrcnn_mobilenet_v3_large_fpn`` and, with
``BENCH_MODELS=...,r50``, the tutorial's ``fasterrcnn_resnet50_fpn``, both at their default 800 px
size with random weights: compute, not accuracy), on the same images:

* **eager in-process**: the archive's eager model, decode + model + JSON back to back, in each
  layout (1 process x all cores' threads, one single-threaded process per core): the old limit;
* **runtime in-process**: the same for each accelerated runtime archive (ONNX Runtime, OpenVINO),
  built through the parity gate: the new limit;
* **ours**: this project's handler on TorchServe with the shipped defaults: the archive ``make
  archive`` builds (``RUNTIME=auto``, workers x threads from the machine), the shipped config and
  log4j2; plus the JVM's CPU per request with the shipped log4j2 and with TorchServe's built-in one;
* **stock**: TorchServe's built-in ``object_detector`` handler on the same weights, eager, 1 and
  ``cores`` workers;
* **litserve**: the eager archive served by LitServe, 1 worker x all threads and one worker per core;
* **kserve** (``--kserve``): the shipped archive on KServe's ``ModelServer``.

Each server is warmed up first (``--warmup-seconds`` of requests at concurrency 4: TorchServe's JVM
compiles its hot paths in its first few hundred requests), then gets latency at concurrency 1
(p50/p95/p99) and throughput at concurrency 1, 2, 4, 8.
Every request is multipart field ``data`` from Python threads on the same machine. The load average
is checked first: a busy machine halves the figures (refused unless ``--allow-busy``). Writes
``bench.json``, ``bench.md`` and two plots per model to ``--out/<model>``. Ratios are the headline.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import multiprocessing
import os
import queue
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import requests
from PIL import Image

from serve_demo.core import defaults

log = logging.getLogger(__name__)

CONCURRENCY = (2, 4, 8)
WARMUP_SECONDS = 15.0  # each server, before it is measured (warm_up)
PHASE_SECONDS = 5.0  # each measurement phase runs at least this long (and at least its number of images)


@dataclass(frozen=True)
class BenchModel:
    """One benchmarked model: an architecture and its weights (None: random, seeded, saved by the run)."""

    key: str
    arch: str
    weights: str | None
    labels: str
    images: int  # per measurement; the load phases send twice as many
    built_by: str = ""  # the make target that builds weights not in the repository

    @property
    def title(self) -> str:
        return f"{self.arch} ({'trained weights' if self.weights else 'random weights'})"

    @property
    def trained(self) -> bool:
        """Trained weights: an mAP to protect, so PRECISION=auto is measured too."""
        return self.weights is not None


MODELS = {
    "demo": BenchModel("demo", "fcos_tiny", "weights/shapes.pt", "index_to_name/shapes.json", 40),
    # the trained two-stage model at its default 320 px input (make train-frcnn; weights/shapes_frcnn.json)
    "trained": BenchModel("trained", "fasterrcnn_mobilenet_v3_large_320_fpn", "weights/shapes_frcnn.pt",
                          "index_to_name/shapes_frcnn.json", 40, built_by="make train-frcnn"),
    "frcnn": BenchModel("frcnn", "fasterrcnn_mobilenet_v3_large_fpn", None, "index_to_name/shapes.json", 16),
    # what users fine-tune (the tutorial's model): ResNet-50 FPN at 800 px; about 2.5 s an image eager on 2 cores
    "r50": BenchModel("r50", "fasterrcnn_resnet50_fpn", None, "index_to_name/shapes.json", 8),
}
DEFAULT_MODELS = "demo,trained,r50"


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


@dataclass(frozen=True)
class Timing:
    """How long each measurement runs: the servers' warm-up, and the shortest phase (a phase of a few hundred
    milliseconds measures the client threads' start and finish more than the server)."""

    warmup_s: float = WARMUP_SECONDS
    phase_s: float = PHASE_SECONDS


def load(send: Callable[[requests.Session, bytes], bool], images: list[bytes], concurrency: int,
         total: int, min_seconds: float = 0.0) -> dict[str, Any]:
    """At least ``total`` requests from ``concurrency`` threads, and for at least ``min_seconds``; throughput,
    latency, errors."""
    lock, counter = threading.Lock(), [0]
    latencies: list[float] = []
    errors = [0]
    deadline = time.monotonic() + min_seconds

    def worker() -> None:
        with requests.Session() as s:
            while True:
                with lock:
                    i = counter[0]
                    counter[0] += 1
                if i >= total and time.monotonic() >= deadline:
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
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors[0],
            "throughput_rps": round(len(latencies) / elapsed, 2), **stats(latencies), "latencies": latencies}


def warm_up(send: Callable[[requests.Session, bytes], bool], images: list[bytes], seconds: float,
            concurrency: int = 4) -> int:
    """Requests at ``concurrency`` for ``seconds`` (at least one per thread): the requests sent (:func:`load`).

    A server is measured as it runs in production, warm: TorchServe's JVM spends its first few hundred
    requests compiling its hot paths (on the demo model the frontend's CPU per request fell from 4.0 to
    1.6-1.9 ms after about 700 requests, and the throughput rose from 121 to 145-151 requests/s)."""
    return load(send, images, concurrency, concurrency, min_seconds=seconds)["requests"]


def measure_server(send, images: list[bytes], n_latency: int, n_load: int,
                   timing: Timing = Timing()) -> dict[str, Any]:
    """Warm up (:func:`warm_up`), then c=1 latency and throughput at each concurrency, each phase at least
    ``timing.phase_s``."""
    warmed = warm_up(send, images, timing.warmup_s)
    log.debug("warmed up with %d requests in %.0f s", warmed, timing.warmup_s)
    result = {"c1": load(send, images, 1, n_latency, timing.phase_s)}
    for c in CONCURRENCY:
        result[f"c{c}"] = load(send, images, c, n_load, timing.phase_s)
    return result


def multipart_sender(url: str, headers: dict[str, str]) -> Callable[[requests.Session, bytes], bool]:
    def send(s: requests.Session, data: bytes) -> bool:
        r = s.post(url, files={"data": ("image.jpg", data, "image/jpeg")}, headers=headers, timeout=120)
        return r.status_code == 200 and isinstance(r.json(), list)
    return send



def _inprocess_worker(mar: str, threads: int, runtime_threads: int | None, images: list[bytes], warm: list[bytes],
                      barrier, results, min_seconds: float = 0.0) -> None:
    """One in-process measurement process: load, warm up, wait for the others, run its share (again, until
    ``min_seconds`` have passed)."""
    import torch

    from serve_demo.core.schema import dumps
    from serve_demo.core.worker import Worker

    logging.disable(logging.WARNING)
    torch.set_num_threads(threads)
    model = Worker.from_archive(mar, threads=threads, runtime_threads=runtime_threads)
    for data in warm:
        model.predict(data, defaults.THRESHOLD, "stock")
    barrier.wait()
    latencies, start = [], time.time()
    while not latencies or time.time() - start < min_seconds:
        for data in images:
            t = time.perf_counter()
            dumps(model.predict(data, defaults.THRESHOLD, "stock"))
            latencies.append(time.perf_counter() - t)
    results.put((start, time.time(), latencies))


def bench_inprocess(mar: Path, images: list[bytes], processes: int, threads: int, total: int,
                    runtime_threads: int | None = None, min_seconds: float = 0.0) -> dict[str, Any]:
    """``processes`` copies of the archive's model, each with ``threads`` threads (``runtime_threads``
    for an accelerated runtime, default the same), sharing ``total`` images back to back (decode +
    model + JSON, no server), each going round its share again until ``min_seconds`` have passed:
    throughput and per-image latency."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    share = [[images[i % len(images)] for i in range(k, total, processes)] for k in range(processes)]
    procs = [ctx.Process(target=_inprocess_worker,
                         args=(str(mar), threads, runtime_threads, share[k], images[:3], barrier, results,
                               min_seconds))
             for k in range(processes)]
    for p in procs:
        p.start()
    got: list[tuple] = []
    while len(got) < processes:
        try:
            got.append(results.get(timeout=5))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"an in-process measurement of {mar.name} died (exit {dead[0].exitcode}): "
                                   f"run Worker.from_archive({str(mar)!r}) to see why") from None
    for p in procs:
        p.join(60)
    start, end = min(g[0] for g in got), max(g[1] for g in got)
    latencies = [x for g in got for x in g[2]]
    rt = f" (runtime {runtime_threads}t)" if runtime_threads and runtime_threads != threads else ""
    return {"layout": f"{processes}p x {threads}t{rt}", "processes": processes, "threads": threads,
            "throughput_rps": round(len(latencies) / (end - start), 2), **stats(latencies), "latencies": latencies}


def random_weights(model: BenchModel, labels: Path, out: Path) -> Path:
    """Seeded random weights for an architecture without committed ones (compute, not accuracy)."""
    import torch

    from serve_demo.core.loader import read_label_map
    from serve_demo.core.models import build_model

    torch.manual_seed(0)
    path = out / f"{model.key}.pt"
    torch.save(build_model(model.arch, len(read_label_map(labels))).state_dict(), path)
    return path


def stock_archive(weights: Path, labels: Path, arch: str, store: Path, build: Path, workers: int) -> Path:
    """An archive of the same weights for TorchServe's built-in ``object_detector`` handler."""
    from serve_demo.archive.builder import run_archiver, stage_extra_files
    from serve_demo.core.loader import read_label_map

    name = f"stock_w{workers}"
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
    config = build / f"{name}-config.yaml"
    config.write_text(f"minWorkers: {workers}\nmaxWorkers: {workers}\nbatchSize: 1\nresponseTimeout: 120\n")
    return run_archiver(name, "1.0", weights.resolve(), "object_detector", stage, config, build / "stock-tmp",
                        store / f"{name}.mar", model_file)


def ours_archive(weights: Path, labels: Path, arch: str, store: Path, build: Path, name: str, runtime: str,
                 parity_data: Path, parity_split: str, precision: str = defaults.PRECISION,
                 fp16: bool = False) -> tuple[Path, str]:
    """An archive as ``make archive`` builds it (defaults: the machine's layout) with ``runtime`` and
    ``precision``; its path and the runtime it names (``auto`` resolves to one: ``openvino-int8``, ...)."""
    import zipfile

    import yaml

    from serve_demo.archive.builder import ArchiveSpec
    from serve_demo.archive.builder import build as build_archive
    from serve_demo.core.config import RuntimeConfig

    mar = build_archive(ArchiveSpec(name=name, weights=str(weights), labels=str(labels), arch=arch, runtime=runtime,
                                    precision=precision, fp16=fp16,
                                    parity_data=str(parity_data) if runtime != "eager" else None,
                                    parity_split=parity_split, export_path=str(store), build_dir=str(build)))
    with zipfile.ZipFile(mar) as z:
        handler = yaml.safe_load(z.read("model-config.yaml")).get("handler", {})
    return mar, RuntimeConfig.from_yaml(handler.get("runtime")).label


def precision_record(mar: Path) -> dict:
    """The ``precision.json`` a ``PRECISION=auto`` archive carries."""
    import zipfile

    from serve_demo.archive.precision import RECORD

    with zipfile.ZipFile(mar) as z:
        return json.loads(z.read(RECORD))


def _split_map_worker(mar: str, dataset: str, split: str, out: str) -> float:
    from serve_demo.evaluate.evaluator import evaluate

    logging.disable(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()):
        result = evaluate(dataset, split, offline=Path(mar), out=Path(out), samples=0)
    return round(result["metrics"]["coco"]["mAP"], 4)


def split_map(mar: Path, dataset: Path, split: str, out: Path) -> float:
    """COCO mAP@[.5:.95] of an archive on ``split``, in-process (the evaluator's offline mode), in a fresh
    process like the in-process measurements (the archive builds leave runtimes' thread pools in this one)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_split_map_worker, (str(mar), str(dataset), split, str(out)))


def start_torchserve(home: Path, store: Path, models: str, metrics_mode: str = "prometheus",
                     overrides: dict[str, str] | None = None, environment: dict[str, str] | None = None):
    """TorchServe with the shipped config (prometheus metrics, shipped log4j2) on free ports."""
    from serve_demo.serve.torchserve import TorchServe

    ts = TorchServe.on_free_ports(home, store, models=models,
                                  environment={"TS_METRICS_MODE": metrics_mode, **(environment or {})},
                                  overrides=overrides or {})
    ts.start()
    ts.wait_ready(240)
    return ts


def jvm_cpu_per_request(ts, send, images: list[bytes], n: int) -> tuple[float, float]:
    """Throughput at concurrency 4 and the JVM frontend's CPU milliseconds per request."""
    import psutil

    jvm = psutil.Process(ts.pid())
    load(send, images, 4, 8)  # warm
    before = sum(jvm.cpu_times()[:2])
    result = load(send, images, 4, n)
    return result["throughput_rps"], round((sum(jvm.cpu_times()[:2]) - before) * 1000 / n, 2)


def server_row(label: str, kind: str, measured: dict[str, Any], **extra) -> dict[str, Any]:
    return {"label": label, "kind": kind, **measured, **extra}


@contextlib.contextmanager
def litserve_server(mar: Path, workers: int, threads: int, port: int):
    """``serve_demo.serve.litserve_app`` running on ``port`` until the block ends (its whole process group)."""
    from serve_demo.serve.process import Background

    server = Background("LitServe", mar.parent / f"litserve-{port}.pid", mar.parent / f"litserve-{port}.log")
    server.start([sys.executable, "-m", "serve_demo.serve.litserve_app", "--mar", str(mar), "--port", str(port),
                  "--threads", str(threads), "--workers", str(workers)])
    try:  # LitServe's API server and workers are child processes: stop() ends the whole group
        server.wait_ready(lambda: requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200,
                          120, interval=0.5)
        yield server
    finally:
        server.stop()


def bench_litserve(mar: Path, workers: int, threads: int, port: int, images: list[bytes], n_lat: int,
                   n_load: int, timing: Timing) -> dict[str, Any]:
    """The same model served by LitServe with this layout."""
    with litserve_server(mar, workers, threads, port):
        return measure_server(multipart_sender(f"http://127.0.0.1:{port}/predict", {}), images, n_lat, n_load,
                              timing)


def bench_kserve(store: Path, home: Path, name: str, images: list[bytes], n_lat: int, n_load: int,
                 timing: Timing) -> dict[str, Any]:
    """The same archive on KServe's ModelServer (TorchServe's /predictions route, multipart)."""
    from serve_demo.serve.kserve_local import KServeServer

    with KServeServer.on_free_ports(home, store, [f"{name}-1.0.mar"]).running(180) as ks:
        send = multipart_sender(f"{ks.url}/predictions/{name}", ks.auth("inference"))  # keys on, as make serve
        return measure_server(send, images, n_lat, n_load, timing)



def best(row: dict) -> float:
    """A server row's highest throughput over the concurrencies."""
    return max(row[f"c{c}"]["throughput_rps"] for c in (1, *CONCURRENCY))


def write_outputs(out: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, inproc = result["rows"], result["inprocess"]
    fig, ax = plt.subplots(figsize=(7.5, 4.4), dpi=110)
    styles = {"eager": ("black", "--"), "runtime": ("tab:green", ":")}
    for r in inproc:
        if r is result["best_eager"] or r is result["best_runtime"]:
            color, ls = styles["eager" if r["runtime"] == "eager" else "runtime"]
            ax.axhline(r["throughput_rps"], color=color, ls=ls, lw=1,
                       label=f"in-process {r['runtime']} {r['layout']} ({r['throughput_rps']:.1f}/s)")
    for r in rows:
        xs = [1, *CONCURRENCY]
        ax.plot(xs, [r[f"c{c}"]["throughput_rps"] for c in xs], marker="o", label=r["label"])
    ax.set(xlabel="concurrent clients", ylabel="images / s", title=f"{result['model']}: throughput vs concurrency",
           xticks=[1, *CONCURRENCY])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_concurrency.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4.4), dpi=110)
    ref = result["eager_reference"]
    lat = np.sort(np.asarray(ref["latencies"]) * 1000)
    ax.plot(lat, np.linspace(0, 1, len(lat)), color="black", ls="--", label=f"in-process eager {ref['layout']}")
    for r in rows:
        lat = np.sort(np.asarray(r["c1"]["latencies"]) * 1000)
        ax.plot(lat, np.linspace(0, 1, len(lat)), label=r["label"])
    ax.set(xlabel="latency at concurrency 1 (ms)", ylabel="fraction of requests",
           title=f"{result['model']}: latency CDF (c=1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png")
    plt.close(fig)

    for r in rows:
        for v in r.values():
            if isinstance(v, dict):
                v.pop("latencies", None)
    for r in inproc:
        r.pop("latencies", None)
    slim = {k: v for k, v in result.items() if k not in ("best_eager", "best_runtime", "eager_reference")}
    (out / "bench.json").write_text(json.dumps(slim, indent=1) + "\n")

    lines = [f"# Benchmark: {result['model']}", "",
             f"{result['machine']}; load average before the run {result['load_before']}; {result['images']} images "
             f"({result['dataset']}); {result['date']}. Command: `{result['command']}`. Each server warmed up for "
             f"{result['timing']['warmup_s']:g} s; each measurement at least {result['timing']['phase_s']:g} s.", "",
             "## In-process (no server): decode + model + JSON, back to back", "",
             "| runtime | layout | images/s | p50 / p95 / p99 (ms) |", "|---|---|---|---|"]
    for r in inproc:
        lines.append(f"| {r['runtime']} | {r['layout']} | {r['throughput_rps']} | {r['p50_ms']} / {r['p95_ms']} / "
                     f"{r['p99_ms']} |")
    lines += ["", "## Served", "",
              "| server | c=1 p50 / p95 / p99 (ms) | c=1 /s | c=2 /s | c=4 /s | c=8 /s | best / eager in-process |",
              "|---|---|---|---|---|---|---|"]
    eager_best = result["best_eager"]["throughput_rps"]
    for r in rows:
        errs = sum(r[f"c{c}"]["errors"] for c in (1, *CONCURRENCY))
        lines.append(f"| {r['label']} | {r['c1']['p50_ms']} / {r['c1']['p95_ms']} / {r['c1']['p99_ms']} | "
                     + " | ".join(str(r[f"c{c}"]["throughput_rps"]) for c in (1, *CONCURRENCY))
                     + f" | {best(r) / eager_best:.2f}" + (f" ({errs} errors)" if errs else "") + " |")
    if result.get("frontend"):
        lines += ["", "## Frontend CPU per request (JVM, concurrency 4)", ""]
        lines += [f"- {k}: {v['jvm_cpu_ms_per_request']} ms CPU per request, {v['throughput_rps']} images/s"
                  for k, v in result["frontend"].items()]
    record = result.get("precision_auto")
    if record:
        lines += ["", f"## PRECISION=auto (archive time, {record['images']} {record['split']} images after the "
                      f"calibration ones; tolerance {record['tolerance']})", "",
                  "| candidate | mAP | median ms / image | within the tolerance |", "|---|---|---|---|"]
        for c in [record["fp32"], *record["candidates"]] if record.get("fp32") else []:
            chosen = " (chosen)" if c["runtime"] == record["chosen"] else ""
            lines.append(f"| {c['runtime']}{chosen} | {', '.join(f'{k} {v:.4f}' for k, v in c['maps'].items())} | "
                         f"{c['median_ms']} | {'yes' if c['passed'] else 'no: ' + c['note']} |")
        if not record.get("fp32"):
            lines.append(f"fp32: {record['reason']}")
        lines += ["", f"{result['accuracy']['split']}-split mAP, in-process: " + ", ".join(
            f"{k} {v:.4f}" for k, v in result["accuracy"].items() if k != "split")]
    lines += ["", "## Ratios", ""] + [f"- {k}: {v}" for k, v in result["ratios"].items()]
    lines += ["", "![throughput](throughput_vs_concurrency.png)", "", "![latency](latency_cdf.png)", ""]
    (out / "bench.md").write_text("\n".join(lines))


def busy(cores: int) -> tuple[bool, tuple[float, float, float]]:
    """Whether the 1-minute load average says something else is running (a quarter of the cores)."""
    loads = os.getloadavg()
    return loads[0] > max(0.5, cores / 4), tuple(round(x, 2) for x in loads)


@dataclass(frozen=True)
class Workspace:
    """One model's folders for a run (emptied first) and the weights it measures."""

    out: Path  # reports
    work: Path
    store: Path
    build: Path
    labels: Path
    weights: Path


def workspace(model: BenchModel, args: argparse.Namespace, suffix: str = "") -> Workspace:
    """``--out/<key>`` and an empty ``--work/<key><suffix>``; seeded random weights where the model has none.

    Raises:
        SystemExit: the model's trained weights are missing (with the target that builds them).
    """
    out, work = Path(args.out) / model.key, Path(args.work).resolve() / f"{model.key}{suffix}"
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    (work / "store").mkdir(parents=True)
    labels = Path(model.labels)
    weights = Path(model.weights) if model.weights else random_weights(model, labels, work)
    if not weights.is_file():
        raise SystemExit(f"{weights} is missing: build it with `{model.built_by or 'make train'}` (resumable), "
                         f"or leave {model.key} out of BENCH_MODELS")
    return Workspace(out, work, work / "store", work / "build", labels, weights)


def bench_model(model: BenchModel, args: argparse.Namespace, cores: int, steps) -> dict[str, Any]:
    """Every measurement of one model; its result (also written to ``--out/<key>``)."""
    from serve_demo.core.layout import cpu_layout

    ws = workspace(model, args)
    out, work, store, build, labels, weights = ws.out, ws.work, ws.store, ws.build, ws.labels, ws.weights
    n = args.images or model.images
    images = load_images(Path(args.dataset), args.split, n)
    n_lat, n_load = n, n * 2
    timing = Timing(args.warmup_seconds, args.phase_seconds)
    shipped = cpu_layout(cores)
    layouts = sorted({(1, cores, None), (cores, 1, None), (shipped.workers, shipped.threads, None)})

    log.info("%s: archives (eager, auto = the shipped default, and the other runtime)", model.title)
    eager_mar, _ = ours_archive(weights, labels, model.arch, store, build, "eager", "eager", Path(args.dataset),
                                args.parity_split)
    shipped_mar, shipped_runtime = ours_archive(weights, labels, model.arch, store, build, "shipped", "auto",
                                                Path(args.dataset), args.parity_split)
    runtime_mars = {}
    for rt in ("onnxruntime", "openvino"):
        runtime_mars[rt] = shipped_mar if rt == shipped_runtime else ours_archive(
            weights, labels, model.arch, store, build, rt, rt, Path(args.dataset), args.parity_split)[0]
    auto_mar, auto_runtime, record, accuracy = None, None, None, {}
    if model.trained:  # PRECISION=auto: the fastest of fp32, bf16 and int8 within GATE_TOLERANCE on the valid split
        auto_mar, auto_runtime = ours_archive(weights, labels, model.arch, store, build, "auto", "auto",
                                              Path(args.dataset), args.parity_split, precision="auto")
        record = precision_record(auto_mar)
        log.info("%s: PRECISION=auto chose %s", model.title, auto_runtime)
        if auto_runtime in (shipped_runtime, "eager"):
            auto_mar = None  # nothing new to measure: the shipped archive already runs it
        accuracy = {"split": args.split, "eager fp32": split_map(eager_mar, Path(args.dataset), args.split,
                                                                 work / "eval-eager")}
        accuracy[f"PRECISION=auto ({auto_runtime})"] = (
            split_map(auto_mar, Path(args.dataset), args.split, work / "eval-auto") if auto_mar
            else accuracy["eager fp32"] if auto_runtime == "eager"
            else split_map(shipped_mar, Path(args.dataset), args.split, work / "eval-shipped"))
    for w in sorted({1, cores}):
        stock_archive(weights, labels, model.arch, store, build, w)
    steps.update(1)

    inproc = []
    for rt, mar in (("eager", eager_mar), *runtime_mars.items(), *([(auto_runtime, auto_mar)] if auto_mar else [])):
        extra = [(shipped.workers, shipped.threads, shipped.runtime_threads)] if (
            rt != "eager" and shipped.runtime_threads != shipped.threads) else []
        for p, t, r in layouts + extra:  # the last: what a served worker of the default layout runs
            row = bench_inprocess(mar, images, p, t, n_load if p > 1 else n_lat, r, timing.phase_s)
            inproc.append({"runtime": rt, **row})
            log.info("in-process %s %s: %.1f images/s, p50 %.1f ms", rt, row["layout"], row["throughput_rps"],
                     row["p50_ms"])
    steps.update(1)

    rows: list[dict[str, Any]] = []
    frontend: dict[str, Any] = {}
    ts = start_torchserve(work / "home-shipped", store, "shipped-1.0.mar")
    try:
        ws = requests.get(f"{ts.management_url}/models/shipped", headers=ts.auth(), timeout=10).json()[0]["workers"]
        send = multipart_sender(f"{ts.inference_url}/predictions/shipped", ts.auth("inference"))
        label = (f"ours, shipped defaults ({shipped_runtime}, {len(ws)} workers x {shipped.threads} threads"
                 + (f", runtime {shipped.runtime_threads}" if shipped_runtime != "eager" else "") + ")")
        rows.append(server_row(label, "ours", measure_server(send, images, n_lat, n_load, timing)))
    finally:
        ts.stop()
    if auto_mar:
        ts = start_torchserve(work / "home-auto", store, "auto-1.0.mar")
        try:
            send = multipart_sender(f"{ts.inference_url}/predictions/auto", ts.auth("inference"))
            rows.append(server_row(f"ours, PRECISION=auto ({auto_runtime}, {len(ws)} workers x {shipped.threads} "
                                   f"threads, runtime {shipped.runtime_threads})", "ours-auto",
                                   measure_server(send, images, n_lat, n_load, timing)))
        finally:
            ts.stop()
    steps.update(1)
    if args.frontend_requests:  # the JVM's CPU per request, shipped log4j2.xml against TorchServe's built-in
        for label, home, logging_config in (("shipped log4j2.xml", work / "home-log-shipped", True),
                                            ("TorchServe's built-in log4j2", work / "home-log-builtin", False)):
            # the same vmargs as the generated config, without -Dlog4j.configurationFile for the built-in one
            vm = f"-Xmx1g -XX:+UseContainerSupport -Djava.io.tmpdir={home / 'tmp'}"
            if logging_config:
                vm += f" -Dlog4j.configurationFile={Path('docker/log4j2.xml').resolve()}"
            ts = start_torchserve(home, store, "shipped-1.0.mar", overrides={"vmargs": vm})
            try:
                send = multipart_sender(f"{ts.inference_url}/predictions/shipped", ts.auth("inference"))
                jvm_cpu_per_request(ts, send, images, args.frontend_requests)  # JIT warm-up
                rate, cpu = jvm_cpu_per_request(ts, send, images, args.frontend_requests)
                frontend[label] = {"throughput_rps": rate, "jvm_cpu_ms_per_request": cpu}
            finally:
                ts.stop()
    steps.update(1)

    for w in sorted({1, cores}):
        ts = start_torchserve(work / f"home-stock{w}", store, f"stock_w{w}.mar")
        try:
            send = multipart_sender(f"{ts.inference_url}/predictions/stock_w{w}", ts.auth("inference"))
            rows.append(server_row(f"stock object_detector, eager, {w} worker{'s' if w > 1 else ''}", "stock",
                                   measure_server(send, images, n_lat, n_load, timing)))
        finally:
            ts.stop()
        steps.update(1)

    for w, t in sorted({(1, cores), (cores, 1)}):
        rows.append(server_row(f"litserve, eager, {w} worker{'s' if w > 1 else ''} x {t} threads", "litserve",
                               bench_litserve(eager_mar, w, t, int(args.litserve_port) + w, images, n_lat,
                                              n_load, timing)))
        steps.update(1)

    if args.kserve:
        rows.append(server_row(f"kserve ModelServer ({shipped_runtime}, one process)", "kserve",
                               bench_kserve(store, work / "kserve", "shipped", images, n_lat, n_load,
                                            timing)))

    best_eager = max((r for r in inproc if r["runtime"] == "eager"), key=lambda r: r["throughput_rps"])
    best_runtime = max(inproc, key=lambda r: r["throughput_rps"])
    eager_ref = next(r for r in inproc if r["runtime"] == "eager" and r["processes"] == 1 and r["threads"] == cores)
    ours = rows[0]
    stock = max((r for r in rows if r["kind"] == "stock"), key=best)
    lit = max((r for r in rows if r["kind"] == "litserve"), key=best)
    result: dict[str, Any] = {
        "model": model.title, "machine": args.machine, "load_before": args.load_before, "images": n,
        "timing": dataclasses.asdict(timing),
        "dataset": f"{args.dataset} {args.split}", "date": time.strftime("%Y-%m-%d %H:%M"), "command": args.command,
        "inprocess": inproc, "rows": rows, "frontend": frontend, "shipped_runtime": shipped_runtime,
        "precision_auto": record, "accuracy": accuracy,
        "best_eager": best_eager, "best_runtime": best_runtime, "eager_reference": eager_ref,
    }
    result["ratios"] = {
        "ours (shipped) / best eager in-process layout (target >= 1.3)":
            f"{best(ours) / best_eager['throughput_rps']:.2f} ({best(ours)} vs {best_eager['throughput_rps']}/s, "
            f"eager {best_eager['layout']})",
        "ours / best LitServe layout (target >= 1.3)":
            f"{best(ours) / best(lit):.2f} ({lit['label']}: {best(lit)}/s)",
        "ours c=1 p50 / eager in-process p50 at 1p x all threads (target <= 1)":
            f"{ours['c1']['p50_ms'] / eager_ref['p50_ms']:.2f} ({ours['c1']['p50_ms']} vs {eager_ref['p50_ms']} ms)",
        "ours / best stock handler layout": f"{best(ours) / best(stock):.2f} ({stock['label']}: {best(stock)}/s)",
        "best in-process runtime / best in-process eager (the new limit over the old)":
            f"{best_runtime['throughput_rps'] / best_eager['throughput_rps']:.2f} ({best_runtime['runtime']} "
            f"{best_runtime['layout']})",
        "ours / best in-process runtime layout (what serving costs)":
            f"{best(ours) / best_runtime['throughput_rps']:.2f}",
    }
    if record is not None:
        fastest = max((r for r in rows if r["kind"].startswith("ours")), key=best)
        auto_map, eager_map = accuracy[f"PRECISION=auto ({auto_runtime})"], accuracy["eager fp32"]
        result["ratios"]["ours with PRECISION=auto / best eager in-process layout (target >= 2.5 on the trained "
                         "two-stage model)"] = (f"{best(fastest) / best_eager['throughput_rps']:.2f} "
                                                f"({auto_runtime}: {best(fastest)}/s)")
        result["ratios"][f"{args.split} mAP, PRECISION=auto - eager fp32 (target >= -{defaults.GATE_TOLERANCE})"] = (
            f"{auto_map - eager_map:+.4f} ({auto_map:.4f} vs {eager_map:.4f})")
    write_outputs(out, result)
    return result


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from serve_demo.core.layout import available_cpus

    cores = available_cpus()
    is_busy, loads = busy(cores)
    deadline = time.monotonic() + 120  # the load average of a job that just ended takes a minute to decay
    while is_busy and time.monotonic() < deadline and not args.allow_busy:
        log.warning("load average %s on %d cores: waiting for it to fall below %.2f", loads, cores, max(0.5, cores / 4))
        time.sleep(15)
        is_busy, loads = busy(cores)
    if is_busy:
        msg = (f"load average {loads} on {cores} cores: something else is running, and the figures would be "
               "a fraction of the machine's (stop it, or pass --allow-busy to measure anyway, marked as busy)")
        if not args.allow_busy:
            print(msg, file=sys.stderr)
            return 2
        log.warning(msg)
    args.load_before = f"{loads}" + (" (BUSY)" if is_busy else " (quiet)")
    args.machine = f"{cores} CPU cores ({platform_cpu()})"
    args.command = "make bench" + (f" BENCH_MODELS={args.models}" if args.models != DEFAULT_MODELS else "")
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        print(f"unknown --models {unknown}: choose from {sorted(MODELS)}", file=sys.stderr)
        return 2
    missing = [f"{MODELS[k].weights} ({MODELS[k].built_by})" for k in keys
               if MODELS[k].weights and not Path(MODELS[k].weights).is_file()]
    if missing:
        print(f"missing weights: {', '.join(missing)}; build them first (resumable), or leave those models out of "
              "BENCH_MODELS", file=sys.stderr)
        return 2
    steps = tqdm(total=len(keys) * 8, desc="bench", file=sys.stderr)
    results = []
    for k in keys:
        results.append(bench_model(MODELS[k], args, cores, steps))
        args.frontend_requests = 0  # the frontend's cost does not depend on the model: measured once
    steps.close()
    for k in keys:
        print((Path(args.out) / k / "bench.md").read_text())
    _, loads_after = busy(cores)
    print(f"load average before {args.load_before}, after {loads_after}")
    return 0 if results else 1


def platform_cpu() -> str:
    """The CPU model name (Linux), for the report."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help=f"comma-separated, from {sorted(MODELS)} (demo: the committed fcos_tiny; trained: "
                        "fasterrcnn_mobilenet_v3_large_320_fpn trained by make train-frcnn; frcnn: "
                        "fasterrcnn_mobilenet_v3_large_fpn at 800 px, random weights; r50: fasterrcnn_resnet50_fpn, "
                        "the tutorial's model, at 800 px, random weights: about 25 min on 2 cores). The trained "
                        f"ones are also archived with PRECISION=auto and scored on --split (default {DEFAULT_MODELS})")
    p.add_argument("--dataset", default=defaults.DEMO_DATA,
                   help="images to send; its --parity-split gates the runtimes")
    p.add_argument("--split", default="test")
    p.add_argument("--parity-split", default="valid")
    p.add_argument("--images", type=int, default=0,
                   help="images per measurement (default per model: demo 40, frcnn 16, r50 8; load phases send twice "
                        "as many)")
    p.add_argument("--out", default="reports/bench")
    p.add_argument("--work", default="build/bench", help="archives and server homes")
    p.add_argument("--litserve-port", default="18600")
    p.add_argument("--phase-seconds", type=float, default=PHASE_SECONDS,
                   help="each measurement (a concurrency, an in-process layout) runs at least this long, and at least "
                        f"its number of images (default {PHASE_SECONDS:g})")
    p.add_argument("--warmup-seconds", type=float, default=WARMUP_SECONDS,
                   help="requests at concurrency 4 each server gets before it is measured, as a server in production "
                        f"is warm (TorchServe's JVM compiles its hot paths in its first few hundred; default "
                        f"{WARMUP_SECONDS:g})")
    p.add_argument("--kserve", action="store_true", help="also KServe's ModelServer on the shipped archive")
    p.add_argument("--frontend-requests", type=int, default=200,
                   help="requests per JVM CPU measurement (shipped vs built-in log4j2), first model only; 0: skip")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cuda: eager fp32 / fp16 and ONNX Runtime's CUDA / TensorRT (fp32, fp16) providers on the "
                        "GPU, each through the mAP gate, then the fastest served (serve_demo/bench/gpu.py)")
    p.add_argument("--allow-busy", action="store_true",
                   help="measure even when the load average says the machine is busy (the report says so)")
