"""Start, wait for and stop a local TorchServe, isolated in its own state folder.

The instance's ``config.properties`` is ``docker/config.properties`` (what the container uses)
with only the addresses, the model store and the temp folder overridden. Its temp folder,
pid file, logs and metrics live under ``HOME`` (default ``build/server``), so two instances
(a user's ``make serve`` and the tests) never collide.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests

from serve_demo.core import defaults
from serve_demo.core.layout import WORKERS_ENV, count_gpus, cpu_layout, gpu_layout

log = logging.getLogger(__name__)

BASE_CONFIG = Path("docker/config.properties")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on loopback."""
    import socket

    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


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
    host: str = "127.0.0.1"
    models: str = "all"
    base_config: Path = BASE_CONFIG
    overrides: dict[str, str] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)  # e.g. TS_* config overrides

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
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": self.metrics_url,
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
        exe = shutil.which("torchserve") or str(Path(sys.executable).parent / "torchserve")
        config = self.write_config()
        cmd = [exe, "--start", "--ncs", "--ts-config", str(config), "--model-store", str(self.model_store)]
        log.info("starting TorchServe: %s", " ".join(cmd))
        out = open(self.home / "torchserve.out", "ab")
        subprocess.run(cmd, env=self.env(), cwd=self.home, stdout=out, stderr=subprocess.STDOUT,
                       check=True, stdin=subprocess.DEVNULL)

    def key(self, kind: str = "management") -> str | None:
        """This instance's ``management`` or ``inference`` key (None when token authorization is off)."""
        from .management import read_key

        return read_key(self.home, kind)

    def auth(self, kind: str = "management") -> dict[str, str]:
        """The ``Authorization`` header for ``kind`` requests, or nothing when tokens are off."""
        key = self.key(kind)
        return {"Authorization": f"Bearer {key}"} if key else {}

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
        status: dict | str = "no answer yet"
        while time.monotonic() < started + timeout:
            if self.pid() is None and time.monotonic() > started + 20:
                raise RuntimeError(f"TorchServe is not running; log tail:\n{self.log_tail()}")
            try:
                status = self.models_status()
                workers = [w for versions in status.values() for v in versions for w in v.get("workers", [])]
                if (status and all(w.get("status") == "READY" for w in workers) and workers
                        and all(n in status for n in (expect or []))
                        and all(v.get("workers") for versions in status.values() for v in versions)):
                    return status
            except (requests.ConnectionError, requests.Timeout, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"TorchServe not ready after {timeout:.0f} s; status: {status}\n"
                           f"log tail:\n{self.log_tail()}")

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
        if not path.exists():
            path = self.home / "torchserve.out"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, timeout: float = 30.0) -> bool:
        """Ask TorchServe to stop and wait for the JVM to exit; True if one was running."""
        pid = self.pid()
        if not pid:
            return False
        exe = shutil.which("torchserve") or str(Path(sys.executable).parent / "torchserve")
        subprocess.run([exe, "--stop"], env=self.env(), cwd=self.home, capture_output=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.2)
        log.warning("TorchServe pid %d did not exit in %.0f s; killing it", pid, timeout)
        os.kill(pid, signal.SIGKILL)
        return True


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", default=defaults.HOME, help="state folder: config, temp, logs")
    p.add_argument("--model-store", default=defaults.MODEL_STORE)
    p.add_argument("--inference-port", type=int, default=defaults.port("INFERENCE_PORT"),
                   help="TorchServe's inference API; the KServe server's HTTP port")
    p.add_argument("--management-port", type=int, default=defaults.port("MANAGEMENT_PORT"))
    p.add_argument("--metrics-port", type=int, default=defaults.port("METRICS_PORT"))
    p.add_argument("--grpc-ports", type=int, nargs=2, metavar=("INFERENCE", "MANAGEMENT"),
                   default=[defaults.port("GRPC_INFERENCE_PORT"), defaults.port("GRPC_MANAGEMENT_PORT")],
                   help="TorchServe's gRPC ports; the first is the KServe server's OIP v2 gRPC port")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--server", default=defaults.SERVER, choices=defaults.SERVERS,
                   help="torchserve (default) or kserve: KServe's ModelServer over the same archives")
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for READY workers")


def from_args(args: argparse.Namespace) -> TorchServe:
    return TorchServe(home=Path(args.home), model_store=Path(args.model_store),
                      inference_port=args.inference_port, management_port=args.management_port,
                      metrics_port=args.metrics_port, grpc_inference_port=args.grpc_ports[0],
                      grpc_management_port=args.grpc_ports[1])


def kserve_from_args(args: argparse.Namespace):
    """The local KServe server of ``make serve SERVER=kserve`` (serving each model's default version)."""
    from .kserve_local import KServeServer

    return KServeServer(Path(args.home), Path(args.model_store), http_port=args.inference_port,
                        grpc_port=args.grpc_ports[0])


def main_serve_kserve(args: argparse.Namespace) -> int:
    """``make serve SERVER=kserve``: each model's default archive on KServe's ModelServer."""
    from .versions import Registry

    ks = kserve_from_args(args)
    if ks.pid():
        print(f"the KServe server already runs (pid {ks.pid()}); `make stop` to restart it")
    else:
        if from_args(args).pid():
            print(f"TorchServe runs from {args.home}: `make stop` first (both use port {args.inference_port})",
                  file=sys.stderr)
            return 2
        registry = Registry.load(ks.model_store)
        for w in registry.sync(ks.model_store):
            log.warning(w)
        registry.save()
        ks.archives = registry.load_plan()[0]
        if not ks.archives:
            print(f"no archives in {ks.model_store}: run `make archive` (or `make demo`) first", file=sys.stderr)
            return 2
        ks.start()
    try:
        status = ks.wait_ready(args.timeout)
    except (TimeoutError, RuntimeError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"KServe ModelServer ready at {ks.url} (OIP v2 gRPC {ks.grpc_target}, log {ks.log_file}); "
          f"models: {', '.join(status)}")
    first = next(iter(status))
    print(f"try:\n  curl -X POST {ks.url}/predictions/{first} -T IMAGE.jpg\n"
          f"  curl {ks.url}/v2/models/{first}   (OIP v2 metadata; no token: see docs/security.md)")
    return 0


def main_serve(args: argparse.Namespace) -> int:
    """``make serve``: start, wait for READY workers, print models and a curl line."""
    from .management import Management
    from .versions import VersionError, archive_runtime, register_new_models, start_from_registry

    if args.server == "kserve":
        return main_serve_kserve(args)
    ts = from_args(args)
    if kserve_from_args(args).pid():
        print(f"the KServe server runs from {args.home}: `make stop` first", file=sys.stderr)
        return 2
    try:
        if ts.pid():
            print(f"TorchServe already running (pid {ts.pid()}); `make stop` to restart it")
            added = register_new_models(ts, ts.wait_ready(args.timeout))
            if added:
                print(f"registered the new archives {', '.join(added)}")
            status = ts.wait_ready(args.timeout)
        else:
            status = start_from_registry(ts, args.timeout)
    except VersionError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except TimeoutError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"TorchServe ready at {ts.inference_url} (management {ts.management_url}, "
          f"metrics {ts.metrics_url}, logs {ts.home / 'logs'})")
    default_of = {name: Management(ts.management_url, home=ts.home).default_version(name) for name in status}
    for name, versions in status.items():
        for v in versions:
            workers = ", ".join(w["status"] for w in v["workers"])
            default = " (default)" if str(v["modelVersion"]) == default_of[name] else ""
            runtime = archive_runtime(ts.model_store / v["modelUrl"]) if v.get("modelUrl") else "?"
            print(f"  {name} {v['modelVersion']}{default}: {runtime}, batch {v['batchSize']}, workers [{workers}]")
    first = next(iter(status))
    key = ts.key("inference")
    auth = f' -H "Authorization: Bearer {key}"' if key else ""
    print(f"try:\n  curl -X POST {ts.inference_url}/predictions/{first} -T IMAGE.jpg{auth}")
    if key:
        print(f"  (token authorization is on: keys in {ts.home / 'key_file.json'}; `make key` prints the "
              "inference key; serve_demo predict/evaluate read it from there)")
    return 0


def main_stop(args: argparse.Namespace) -> int:
    """``make stop``: the TorchServe and the KServe server of ``HOME``, whichever runs."""
    stopped = [name for name, server in (("TorchServe", from_args(args)), ("KServe server", kserve_from_args(args)))
               if server.stop()]
    print(f"{' and '.join(stopped)} stopped" if stopped else f"no server running from {args.home}")
    return 0
