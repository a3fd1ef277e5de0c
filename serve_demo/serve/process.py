"""The one process manager: start in the background, wait until ready, stop with a kill fallback.

Every server this project starts goes through it: TorchServe's JVM (:mod:`.torchserve`), the KServe
``ModelServer`` (:mod:`.kserve_local`), LitServe and the stock archives of the benchmark, the
container's entry point (:mod:`.entrypoint`), Prometheus (:mod:`serve_demo.monitor.prometheus`) and
the container helper's health wait (:mod:`.container`). Free ports and the ``Authorization``
header live here too, so tests and tools start servers side by side the same way. Standard library only
(psutil and requests when present): the container helper runs on the system's Python.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

try:  # the container helper runs on the system's Python, where requests may be missing
    from requests import RequestException

    _NOT_YET: tuple[type[Exception], ...] = (OSError, ValueError, RequestException)
except ImportError:
    _NOT_YET = (OSError, ValueError)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on loopback."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def executable(name: str) -> str:
    """A command on ``PATH``, else the one installed beside this Python (a venv not activated)."""
    return shutil.which(name) or str(Path(sys.executable).parent / name)


def bearer(key: str | None) -> dict[str, str]:
    """The ``Authorization`` header of a token, or no header when there is none (auth off)."""
    return {"Authorization": f"Bearer {key}"} if key else {}


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        import psutil
    except ImportError:
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:  # gone meanwhile
        return False


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``pid`` to exit; True when it did."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def stop_pid(pid: int, timeout: float = 30.0, *, sig: signal.Signals | None = signal.SIGTERM,
             group: bool = False, what: str = "process") -> bool:
    """Send ``sig`` (None: the caller already asked it to stop), wait ``timeout`` s, then SIGKILL.

    ``group``: signal the whole process group ``pid`` leads (servers that fork workers).
    Returns False when ``pid`` was not running.
    """
    kill = os.killpg if group else os.kill
    if not alive(pid):
        return False
    if sig is not None:
        try:
            kill(pid, sig)
        except ProcessLookupError:
            return False
    if not wait_exit(pid, timeout):
        log.warning("%s pid %d did not exit in %.0f s; killing it", what, pid, timeout)
        try:
            kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_exit(pid, 10)
    return True


def wait_until(probe: Callable[[], T | None], timeout: float, *, what: str, interval: float = 0.3,
               running: Callable[[], bool] | None = None, details: Callable[[], str] | None = None) -> T:
    """Call ``probe`` until it returns something truthy, and return that.

    ``probe`` may raise ``OSError`` / ``requests`` connection errors while the server comes up;
    they count as "not yet". ``running`` (when given) is asked each round: once it answers False,
    waiting stops with a ``RuntimeError``. ``details`` adds context (a log tail) to the error.

    Raises:
        RuntimeError: the process exited first.
        TimeoutError: ``timeout`` s passed.
    """
    deadline = time.monotonic() + timeout
    last: object = "no answer yet"
    while True:
        try:
            result = probe()
            if result:
                return result
            last = result
        except _NOT_YET as exc:
            last = exc
        if running is not None and not running():
            raise RuntimeError(f"{what} exited" + (f"; {details()}" if details else ""))
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s (last: {str(last)[:300]})"
                               + (f"\n{details()}" if details else ""))
        time.sleep(interval)


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` of a log file ('' when there is none)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Background:
    """One detached server process: its own session (so its workers are stopped with it), its output in
    ``log_file``, its pid in ``pid_file`` (so ``make stop`` in another shell finds it)."""

    name: str  # for messages: "KServe server", "Prometheus"
    pid_file: Path
    log_file: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def pid(self) -> int | None:
        """The pid, if it runs."""
        if self.proc is not None:
            return self.proc.pid if self.proc.poll() is None else None
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) else None

    def start(self, cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        """Start ``cmd``; refuses when this one already runs. Returns the pid."""
        if self.pid():
            raise RuntimeError(f"a {self.name} of {self.pid_file.parent} is already running (pid {self.pid()}); "
                               "stop it first (make stop)")
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting %s: %s", self.name, " ".join(cmd))
        with open(self.log_file, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=cwd, start_new_session=True)
        self.pid_file.write_text(str(self.proc.pid))
        return self.proc.pid

    def running(self) -> bool:
        return self.pid() is not None

    def tail(self, lines: int = 30) -> str:
        return log_tail(self.log_file, lines)

    def wait_ready(self, probe: Callable[[], T | None], timeout: float, interval: float = 0.3) -> T:
        """:func:`wait_until` ``probe`` answers, while this process runs (its log tail on failure)."""
        return wait_until(probe, timeout, what=self.name, interval=interval, running=self.running,
                          details=lambda: f"log tail ({self.log_file}):\n{self.tail()}")

    def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM its process group, SIGKILL after ``timeout`` s; False when it was not running."""
        pid = self.pid()
        self.pid_file.unlink(missing_ok=True)
        if pid is None:
            return False
        stop_pid(pid, timeout, group=True, what=self.name)
        if self.proc is not None:
            self.proc.wait()
        return True
