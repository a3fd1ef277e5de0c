"""Start, wait for and stop a local KServe ``ModelServer`` (``serve_demo.serve.kserve_server``).

The twin of :class:`serve_demo.serve.torchserve.TorchServe` for ``make serve SERVER=kserve``
and the tests: a background process serving archives from the model store, its pid and log
in ``HOME`` (``kserve.pid``, ``kserve.log``).
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

from .management import read_key
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
        http, grpc = free_ports(2)
        return cls(home, model_store, archives, http_port=http, grpc_port=grpc, **kwargs)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    inference_url = url  # the name clients of TorchServe use

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def key_file(self) -> Path:
        return self.home / "key_file.json"

    def key(self, kind: str = "inference") -> str | None:
        """This run's ``inference`` or ``management`` key (None when authorization is off)."""
        return read_key(self.home, kind) if self.auth_on else None

    def auth(self, kind: str = "inference") -> dict[str, str]:
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
        cmd += ["--bind", self.bind, "--auth", "keys" if self.auth_on else "off", "--key-file", str(self.key_file)]
        return cmd + ["--http_port", str(self.http_port), "--grpc_port", str(self.grpc_port)]

    def start(self) -> None:
        """Start in the background (returns at once; see :meth:`wait_ready`)."""
        if not self.archives:
            raise ValueError(f"no archives to serve from {self.model_store}: run `make archive` first")
        self.key_file.unlink(missing_ok=True)  # an earlier run's keys (or TorchServe's) are not this run's
        self.process.start(self.command(), env={**os.environ, **self.environment})

    def models_ready(self) -> dict[str, bool]:
        """``{name: ready}`` from ``GET /v2/models/NAME/ready`` of every served model."""
        headers = self.auth()
        names = requests.get(f"{self.url}/v1/models", headers=headers, timeout=5).json().get("models", [])
        return {n: requests.get(f"{self.url}/v2/models/{n}/ready", headers=headers, timeout=5).status_code == 200
                for n in names}

    def wait_ready(self, timeout: float = 120.0) -> dict[str, bool]:
        """Poll until the server answers ready for every model.

        Raises:
            TimeoutError / RuntimeError: with the log tail.
        """
        def ready() -> dict[str, bool] | None:
            status = self.models_ready()
            return status if status and all(status.values()) else None

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
