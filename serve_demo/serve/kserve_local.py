"""Start, wait for and stop a local KServe ``ModelServer`` (``serve_demo.serve.kserve_server``).

The twin of :class:`serve_demo.serve.torchserve.TorchServe` for ``make serve SERVER=kserve``
and the tests: a background process serving archives from the model store, its pid and log
in ``HOME`` (``kserve.pid``, ``kserve.log``), its keys in ``HOME/key_file.json`` and TorchServe's
management API for versions on ``management_port`` (loopback), so that
:func:`serve_demo.serve.versions.start_from_registry` and the version commands drive both alike.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests

from serve_demo.core import defaults

from .management import Management, ManagementError, read_key
from .process import Background, free_ports

log = logging.getLogger(__name__)


@dataclass
class KServeServer:
    """One local KServe ``ModelServer`` over archives of a model store."""

    home: Path
    model_store: Path
    archives: list[str] = field(default_factory=list)  # file names in model_store
    http_port: int = defaults.INFERENCE_PORT
    grpc_port: int = defaults.GRPC_INFERENCE_PORT
    management_port: int = defaults.MANAGEMENT_PORT  # versions API, loopback only; 0: none
    host: str = "127.0.0.1"  # where clients reach it
    bind: str = defaults.BIND  # where it listens (HTTP and gRPC)
    auth_on: bool = True  # bearer keys (HOME/key_file.json, TorchServe's format); off behind a gateway
    environment: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.home = Path(self.home).resolve()
        self.model_store = Path(self.model_store).resolve()

    @classmethod
    def on_free_ports(cls, home: Path, model_store: Path, archives: list[str], **kwargs) -> KServeServer:
        """An instance on two free ports (tests, benchmarks)."""
        http, grpc, management = free_ports(3)
        return cls(home, model_store, archives, http_port=http, grpc_port=grpc, management_port=management, **kwargs)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    inference_url = url  # the name clients of TorchServe use

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    @property
    def models(self) -> str:
        """The archives loaded at start, comma-separated (TorchServe's ``load_models``)."""
        return ",".join(self.archives)

    @models.setter
    def models(self, value: str) -> None:
        self.archives = [a for a in value.split(",") if a]

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def key_file(self) -> Path:
        return self.home / "key_file.json"

    def key(self, kind: str = "management") -> str | None:
        """This run's ``management`` or ``inference`` key (None when authorization is off); the same default
        as :meth:`serve_demo.serve.torchserve.TorchServe.key`."""
        return read_key(self.home, kind) if self.auth_on else None

    def auth(self, kind: str = "management") -> dict[str, str]:
        """The headers a request needs (``Authorization: Bearer KEY``, or none when it is off)."""
        key = self.key(kind)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def grpc_metadata(self, kind: str = "inference") -> list[tuple[str, str]]:
        """The same as gRPC call metadata."""
        return [(k.lower(), v) for k, v in self.auth(kind).items()]

    @property
    def pid_file(self) -> Path:
        return self.home / "kserve.pid"

    @property
    def log_file(self) -> Path:
        return self.home / "kserve.log"

    @functools.cached_property
    def process(self) -> Background:
        return Background("KServe server", self.pid_file, self.log_file)

    def pid(self) -> int | None:
        """The server's pid, if it runs."""
        return self.process.pid()

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "serve_demo.serve.kserve_server"]
        for archive in self.archives:
            cmd += ["--archive", str(self.model_store / archive)]
        cmd += ["--bind", self.bind, "--auth", "keys" if self.auth_on else "off", "--key-file", str(self.key_file),
                "--model-store", str(self.model_store)]
        if self.management_port:
            cmd += ["--management-port", str(self.management_port)]
        return cmd + ["--http_port", str(self.http_port), "--grpc_port", str(self.grpc_port)]

    def start(self) -> None:
        """Start in the background (returns at once; see :meth:`wait_ready`)."""
        if not self.archives:
            raise ValueError(f"no archives to serve from {self.model_store}: run `make archive` first")
        self.key_file.unlink(missing_ok=True)  # an earlier run's keys (or TorchServe's) are not this run's
        self.process.start(self.command(), env={**os.environ, **self.environment})

    def models_ready(self) -> dict[str, bool]:
        """``{name: ready}`` from ``GET /v2/models/NAME/ready`` of every served model (its default version)."""
        headers = self.auth("inference")
        names = requests.get(f"{self.url}/v1/models", headers=headers, timeout=5).json().get("models", [])
        return {n: requests.get(f"{self.url}/v2/models/{n}/ready", headers=headers, timeout=5).status_code == 200
                for n in names}

    def models_status(self) -> dict[str, list[dict]]:
        """``{name: [version descriptions]}`` from the management API, as TorchServe's."""
        mgmt = Management(self.management_url, home=self.home, timeout=5)
        return {n: mgmt.versions(n) for n in mgmt.models()}

    def wait_ready(self, timeout: float = 120.0) -> dict[str, list[dict]]:
        """Poll until the server answers ready for every model; ``{name: [version descriptions]}`` (with
        no management API: one description per model, its default version).

        Raises:
            TimeoutError / RuntimeError: with the log tail.
        """
        def ready() -> dict[str, list[dict]] | None:
            status = self.models_ready()
            if not status or not all(status.values()):
                return None
            if not self.management_port:
                return {n: [{"modelName": n, "workers": [{"status": "READY"}]}] for n in status}
            try:
                described = self.models_status()
            except ManagementError as exc:  # its listener opens a moment after the inference one
                if exc.status:
                    raise
                return None
            workers = [w for versions in described.values() for v in versions for w in v["workers"]]
            return described if all(w["status"] == "READY" for w in workers) else None

        return self.process.wait_ready(ready, timeout)

    @contextlib.contextmanager
    def running(self, timeout: float = 120.0) -> Iterator[KServeServer]:
        """Started and ready for the block, stopped after it (tests, benchmarks)."""
        self.start()
        try:
            self.wait_ready(timeout)
            yield self
        finally:
            self.stop()

    def log_tail(self, lines: int = 30) -> str:
        return self.process.tail(lines)

    def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM (KServe drains in-flight requests), wait, SIGKILL its group; True if one was running."""
        return self.process.stop(timeout)
