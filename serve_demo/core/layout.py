"""Workers x threads for CPU serving, derived from the CPUs this process may use.

Measured on 2 cores (docs/performance.md): two single-threaded worker processes serve more than one
process with two threads (the model's small convolutions and its Python pre/post-processing do
not scale across threads; processes do). So on small machines every CPU gets its own worker; on
larger ones threads grow so that no more than :data:`MAX_CPU_WORKERS` model copies are loaded.
The frontend (``default_workers_per_model``) and each worker (torch, ONNX Runtime and OpenVINO
threads) compute the same layout from the same function, so they agree without talking.

An accelerated runtime's threads (ONNX Runtime, OpenVINO, which do not spin or pin here) are twice a
worker's share, up to the machine's CPUs: a lone request then uses the cores its idle neighbours
leave, and under load the oversubscription costs little. Measured on 2 cores, demo model, ONNX
Runtime in-process: 1 worker with 2 runtime threads 52.2 img/s, p50 18.5 ms (1 thread: 35.7 img/s,
26.7 ms); 2 workers 66.6 img/s (1 runtime thread each: 70.0).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

MAX_CPU_WORKERS = 16  # model copies per machine before threads per worker grow
WORKERS_ENV = "SERVE_DEMO_WORKERS"  # set by the server starter: workers per model, for each worker's share


@dataclass(frozen=True)
class Layout:
    workers: int
    threads: int  # torch intra-op threads per worker

    @property
    def runtime_threads(self) -> int:
        """An accelerated runtime's threads per worker (see the module's note)."""
        return runtime_threads(self.threads, self.workers)

    def __str__(self) -> str:
        return f"{self.workers} workers x {self.threads} threads"


def runtime_threads(threads: int, workers: int, cpus: int | None = None) -> int:
    """ONNX Runtime / OpenVINO threads of a worker with ``threads`` torch threads among ``workers``."""
    if workers <= 1:
        return threads
    return max(threads, min(cpus or available_cpus(), 2 * threads))


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota(root: Path) -> float | None:
    """CPUs allowed by cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``; None when unlimited."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = root / "cpu" / "cpu.cfs_quota_us"
        if v1.is_file():
            quota = int(v1.read_text())
            period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None
    return None


def cpu_layout(cpus: int | None = None, workers: int = 0) -> Layout:
    """The layout for ``cpus`` (default: :func:`available_cpus`); ``workers`` > 0 fixes the worker
    count and the threads follow (CPUs shared among them, at least one each)."""
    cpus = cpus or available_cpus()
    if workers > 0:
        return Layout(workers, max(1, cpus // workers))
    threads = max(1, math.ceil(cpus / MAX_CPU_WORKERS))
    return Layout(max(1, cpus // threads), threads)


def gpu_layout(gpus: int, workers_per_gpu: int = 1) -> Layout:
    """GPU serving: ``workers_per_gpu`` workers on each device, one CPU thread each for pre/post work."""
    return Layout(max(1, gpus) * max(1, workers_per_gpu), 1)


def count_gpus() -> int:
    """NVIDIA GPUs visible here (``nvidia-smi -L``), without importing torch; 0 when none."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    found = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    if visible is not None:
        found = min(found, len([v for v in visible.split(",") if v.strip()]))
    return found


def worker_layout(min_workers: int = 0, threads: int = 0) -> Layout:
    """A CPU worker's layout: ``min_workers`` (else the server's ``SERVE_DEMO_WORKERS``, else the default
    layout's) workers, each with ``threads`` (an archive's ``handler.threads``) or else its share of the CPUs."""
    workers = min_workers
    if workers <= 0:
        raw = os.environ.get(WORKERS_ENV, "")
        workers = int(raw) if raw.isdigit() else 0
    layout = cpu_layout(workers=workers)
    return Layout(layout.workers, threads) if threads > 0 else layout
