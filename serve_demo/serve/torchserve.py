"""Start, wait for and stop a local TorchServe, isolated in its own state folder.

The instance's ``config.properties`` is ``docker/config.properties`` (what the container uses)
with only the addresses, the model store and the temp folder overridden. Its temp folder,
pid file, logs and metrics live under ``HOME`` (default ``build/server``), so two instances
(a user's ``make serve`` and the tests) never collide.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests

from serve_demo.core import defaults
from serve_demo.core.layout import WORKERS_ENV, available_cpus, count_gpus, cpu_layout, gpu_layout

from .process import Background, bearer, executable, free_ports, log_tail, stop_pid, wait_until

log = logging.getLogger(__name__)

BASE_CONFIG = Path("docker/config.properties")


def read_properties(path: Path) -> dict[str, str]:
    """``key=value`` lines of a Java properties file (comments and blanks skipped)."""
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


@dataclass
class TorchServe:
    """One local TorchServe instance."""

    home: Path
    model_store: Path
    inference_port: int = defaults.INFERENCE_PORT
    management_port: int = defaults.MANAGEMENT_PORT
    metrics_port: int = defaults.METRICS_PORT
    grpc_inference_port: int = defaults.GRPC_INFERENCE_PORT
    grpc_management_port: int = defaults.GRPC_MANAGEMENT_PORT
    host: str = "127.0.0.1"  # where clients reach it
    bind: str = defaults.BIND  # where inference (HTTP, gRPC) and metrics listen; management stays on loopback
    models: str = "all"
    base_config: Path = BASE_CONFIG
    overrides: dict[str, str] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)  # e.g. TS_* config overrides
    guard: bool = True  # the management guard (serve/guard.py) answers on the management address
    upstream_management_port: int = 0  # TorchServe's own management listener, private loopback; 0: a free one
    guard_listen: str = field(default="", init=False)  # HOST:PORT the guard listens on (from the config)

    def __post_init__(self) -> None:
        self.home = Path(self.home).resolve()
        self.model_store = Path(self.model_store).resolve()
        self.base_config = Path(self.base_config).resolve()

    @classmethod
    def on_free_ports(cls, home: Path, model_store: Path, **kwargs) -> TorchServe:
        """An instance on five free loopback ports (tests, benchmarks: several side by side)."""
        p = free_ports(5)
        return cls(home=home, model_store=model_store, inference_port=p[0], management_port=p[1],
                   metrics_port=p[2], grpc_inference_port=p[3], grpc_management_port=p[4], **kwargs)

    @property
    def inference_url(self) -> str:
        return f"http://{self.host}:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://{self.host}:{self.management_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}"

    @property
    def tmp(self) -> Path:
        return self.home / "tmp"

    def env(self) -> dict[str, str]:
        """Environment for ``torchserve`` commands of this instance."""
        env = dict(os.environ)
        env.update({"TMPDIR": str(self.tmp), "LOG_LOCATION": str(self.home / "logs"),
                    "METRICS_LOCATION": str(self.home / "logs")})
        env[WORKERS_ENV] = str(self.default_workers)
        env.update(self.environment)
        if self.guard and self.upstream_management_port:  # TS_MANAGEMENT_ADDRESS would beat the config
            env["TS_MANAGEMENT_ADDRESS"] = f"http://127.0.0.1:{self.upstream_management_port}"
        return env

    @functools.cached_property
    def default_workers(self) -> int:
        """Workers per model that does not fix its own: the base config's ``default_workers_per_model``
        if it sets one, else one per GPU, else the CPU layout's (:func:`serve_demo.core.layout.cpu_layout`).
        Workers read it from ``SERVE_DEMO_WORKERS`` to take their share of the CPUs (computed once:
        it may run ``nvidia-smi``)."""
        props = read_properties(self.base_config) if self.base_config.is_file() else {}
        fixed = props.get("default_workers_per_model", "").strip()
        if fixed.isdigit() and int(fixed) > 0:
            return int(fixed)
        gpus = count_gpus()
        return gpu_layout(gpus).workers if gpus else cpu_layout().workers

    def write_config(self) -> Path:
        """The base config with this instance's addresses and folders."""
        props = read_properties(self.base_config)
        props.update({
            "inference_address": f"http://{self.bind}:{self.inference_port}",
            "management_address": self.management_url,
            "metrics_address": f"http://{self.bind}:{self.metrics_port}",
            "grpc_inference_address": self.bind,
            "grpc_inference_port": str(self.grpc_inference_port),
            "grpc_management_port": str(self.grpc_management_port),
            "model_store": str(self.model_store),
            "allowed_urls": f"file://{self.model_store}/.*",
            "load_models": self.models,
            # a user's own JVM options are kept; the temp folder is this instance's
            "vmargs": " ".join([*(w for w in props.get("vmargs", "-Xmx1g -XX:+UseContainerSupport").split()
                                  if not w.startswith("-Djava.io.tmpdir=")), f"-Djava.io.tmpdir={self.tmp}"]),
            "default_workers_per_model": str(self.default_workers),
        })
        metrics = self.base_config.parent / "metrics.yaml"  # beside the config, here and in the image
        if metrics.is_file() and not Path(props.get("metrics_config", "/nonexistent")).is_file():
            props["metrics_config"] = str(metrics)
        logging_config = self.base_config.parent / "log4j2.xml"  # without the per-request lines
        if logging_config.is_file() and "-Dlog4j.configurationFile=" not in props["vmargs"]:
            props["vmargs"] += f" -Dlog4j.configurationFile={logging_config}"
        props.update(self.overrides)
        if self.guard:  # clients reach the guard where they expect the API; TorchServe's own is private
            public = urlsplit(props["management_address"])
            self.guard_listen = f"{public.hostname or '127.0.0.1'}:{public.port or self.management_port}"
            if not self.upstream_management_port:
                self.upstream_management_port = free_ports(1)[0]
            props["management_address"] = f"http://127.0.0.1:{self.upstream_management_port}"
        self.home.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)
        path = self.home / "config.properties"
        path.write_text(f"# generated from {self.base_config}; edit that file instead\n"
                        + "".join(f"{k}={v}\n" for k, v in props.items()))
        return path

    def pid(self) -> int | None:
        """The pid of this instance's JVM (found by its private temp folder), if running."""
        import psutil

        marker = f"-Djava.io.tmpdir={self.tmp}"
        for proc in psutil.process_iter(["pid", "name", "cmdline", "status"]):
            cmd = proc.info.get("cmdline") or []
            if marker in cmd and proc.info.get("status") != psutil.STATUS_ZOMBIE:
                return proc.info["pid"]
        return None

    def start(self) -> None:
        """Start the JVM in the background (returns at once; see :meth:`wait_ready`)."""
        if self.pid():
            raise RuntimeError(f"a TorchServe of {self.home} is already running (pid {self.pid()}); "
                               "stop it first (make stop)")
        exe = executable("torchserve")
        config = self.write_config()
        cmd = [exe, "--start", "--ncs", "--ts-config", str(config), "--model-store", str(self.model_store)]
        log.info("starting TorchServe: %s", " ".join(cmd))
        out = open(self.home / "torchserve.out", "ab")
        subprocess.run(cmd, env=self.env(), cwd=self.home, stdout=out, stderr=subprocess.STDOUT,
                       check=True, stdin=subprocess.DEVNULL)
        self.start_guard()

    @property
    def guard_process(self) -> Background:
        return Background("management guard", self.home / "guard.pid", self.home / "guard.log")

    @functools.cached_property
    def max_workers(self) -> int:
        """The most workers a model may be scaled to here: one per CPU, or four per GPU."""
        return max(available_cpus(), 4 * count_gpus())

    def start_guard(self) -> None:
        """Start the management guard in front of the JVM's management API (after :meth:`write_config`)."""
        if not self.guard:
            return
        self.guard_process.stop()  # one left by a killed server would hold the port
        self.guard_process.start([sys.executable, "-m", "serve_demo.serve.guard", "--listen", self.guard_listen,
                                  "--upstream", f"127.0.0.1:{self.upstream_management_port}",
                                  "--store", str(self.model_store), "--max-workers", str(self.max_workers)],
                                 env=self.env())

    def key(self, kind: str = "management") -> str | None:
        """This instance's ``management`` or ``inference`` key (None when token authorization is off)."""
        from .management import read_key

        return read_key(self.home, kind)

    def auth(self, kind: str = "management") -> dict[str, str]:
        """The ``Authorization`` header for ``kind`` requests, or nothing when tokens are off."""
        return bearer(self.key(kind))

    def models_status(self) -> dict[str, list[dict]]:
        """``{name: [version descriptions]}`` from the management API."""
        h = self.auth()
        names = [m["modelName"] for m in
                 requests.get(f"{self.management_url}/models", headers=h, timeout=5).json().get("models", [])]
        return {n: requests.get(f"{self.management_url}/models/{n}/all", headers=h, timeout=5).json()
                for n in names}

    def wait_ready(self, timeout: float = 120.0, expect: list[str] | None = None) -> dict[str, list[dict]]:
        """Poll until every worker of every model (and each of ``expect``) is READY.

        Raises:
            TimeoutError: with the last status and the log tail.
        """
        started = time.monotonic()

        def ready() -> dict[str, list[dict]] | None:
            status = self.models_status()
            workers = [w for versions in status.values() for v in versions for w in v.get("workers", [])]
            if (status and workers and all(w.get("status") == "READY" for w in workers)
                    and all(n in status for n in (expect or []))
                    and all(v.get("workers") for versions in status.values() for v in versions)):
                return status
            return None

        def running() -> bool:  # the JVM's first seconds: `torchserve --start` has returned, no JVM yet
            return self.pid() is not None or time.monotonic() < started + 20

        return wait_until(ready, timeout, what="TorchServe", interval=0.5, running=running,
                          details=lambda: f"log tail:\n{self.log_tail()}")

    @contextlib.contextmanager
    def running(self, timeout: float = 120.0, expect: list[str] | None = None) -> Iterator[TorchServe]:
        """Started with every worker READY for the block, stopped after it (tests, benchmarks)."""
        self.start()
        try:
            self.wait_ready(timeout, expect)
            yield self
        finally:
            self.stop()

    def log_tail(self, lines: int = 30) -> str:
        path = self.home / "logs" / "ts_log.log"
        return log_tail(path if path.exists() else self.home / "torchserve.out", lines)

    def stop(self, timeout: float = 30.0) -> bool:
        """Ask TorchServe to stop and wait for the JVM to exit (SIGKILL after ``timeout`` s); True if one ran."""
        pid = self.pid()
        if not pid:
            return False
        subprocess.run([executable("torchserve"), "--stop"], env=self.env(), cwd=self.home, capture_output=True)
        stop_pid(pid, timeout, sig=None, what="TorchServe")
        self.guard_process.stop()
        return True
