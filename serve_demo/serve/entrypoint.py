"""The container's entry point: TorchServe in the foreground, from the versions recorded in the store.

PID 1 of the image (``docker/Dockerfile``). It starts TorchServe with ``docker/config.properties``
(the file the local server and the tests use), loads each model's recorded default version from
``MODEL_STORE/registry.json`` (the record ``make register/promote/rollback`` keep, so a restarted
container comes back with the same versions and defaults), then registers the other recorded
versions. On SIGTERM or SIGINT it stops taking new connections, lets the requests in flight finish
(``--drain`` seconds at most), stops the JVM and exits 0; if TorchServe dies by itself, the
container exits with its status so that the engine's restart policy applies.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .torchserve import TorchServe
from .versions import VersionError, finish_from_registry, plan_from_registry

log = logging.getLogger("serve_demo.entrypoint")

IMAGE_HOME = Path("/home/model-server")


def _port(env: str, default: int) -> int:
    """The port of a ``TS_*_ADDRESS`` override (``http://0.0.0.0:8081``), else ``default``."""
    value = os.environ.get(env, "")
    tail = value.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else default


def container_server(home: Path, store: Path, config: Path) -> TorchServe:
    """The TorchServe of the container: the shared config, addresses from the ``TS_*`` environment."""
    return TorchServe(home=home, model_store=store, base_config=config,
                      inference_port=_port("TS_INFERENCE_ADDRESS", 8080),
                      management_port=_port("TS_MANAGEMENT_ADDRESS", 8081),
                      metrics_port=_port("TS_METRICS_ADDRESS", 8082))


class Supervisor:
    """Runs ``torchserve --foreground`` and stops it once, cleanly, on a signal."""

    def __init__(self, ts: TorchServe, drain: float, kill_after: float) -> None:
        self.ts, self.drain, self.kill_after = ts, drain, kill_after
        self.proc: subprocess.Popen | None = None
        self.stopping = threading.Event()

    def start(self) -> None:
        config = self.ts.write_config()
        (self.ts.home / "key_file.json").unlink(missing_ok=True)  # keys are new at every start
        exe = shutil.which("torchserve") or str(Path(sys.executable).parent / "torchserve")
        cmd = [exe, "--foreground", "--ncs", "--ts-config", str(config), "--model-store", str(self.ts.model_store)]
        log.info("starting TorchServe: %s", " ".join(cmd))
        self.proc = subprocess.Popen(cmd, env=self.ts.env(), cwd=self.ts.home, stdin=subprocess.DEVNULL)

    def on_signal(self, signum: int, _frame) -> None:
        if not self.stopping.is_set():
            log.info("%s: stopping TorchServe", signal.Signals(signum).name)
            self.stopping.set()
            threading.Thread(target=self.stop, name="stop", daemon=True).start()

    def in_flight(self) -> int:
        """Inference connections open to the frontend (a request in flight holds one)."""
        import psutil

        pid = self.ts.pid()
        if pid is None:
            return 0
        try:
            proc = psutil.Process(pid)
            conns = getattr(proc, "net_connections", None) or proc.connections
            conns = conns(kind="tcp")
        except psutil.Error:
            return 0
        return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == self.ts.inference_port)

    def stop(self) -> None:
        """Wait (up to ``drain`` s) for the requests in flight, then SIGTERM the JVM, SIGKILL if it hangs."""
        deadline = time.monotonic() + self.drain
        while self.in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = self.ts.pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
        if self.proc is None:
            return
        try:
            self.proc.wait(self.kill_after)
        except subprocess.TimeoutExpired:
            log.warning("TorchServe did not exit %.0f s after SIGTERM; killing it", self.kill_after)
            pid = self.ts.pid()
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            self.proc.kill()

    def wait(self) -> int:
        assert self.proc is not None
        code = self.proc.wait()
        while self.ts.pid() is not None:  # the launcher returns with the JVM; be sure
            time.sleep(0.1)
        return 0 if self.stopping.is_set() else (code or 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve_demo.serve.entrypoint", description=__doc__.split("\n")[0])
    p.add_argument("--model-store", type=Path, default=IMAGE_HOME / "model-store",
                   help="the archives (a mounted volume) and registry.json")
    p.add_argument("--home", type=Path, default=IMAGE_HOME / "run", help="keys, logs and temp files (writable)")
    p.add_argument("--config", type=Path, default=IMAGE_HOME / "config.properties")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for READY workers")
    p.add_argument("--drain", type=float, default=float(os.environ.get("SERVE_DEMO_DRAIN_S", 6)),
                   help="on SIGTERM, seconds to let requests in flight finish (default 6; SERVE_DEMO_DRAIN_S)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if not args.model_store.is_dir() or not any(args.model_store.glob("*.mar")):
        log.error("no model archives (.mar) in %s: mount your model store there, e.g.\n"
                  "  docker run -v $(pwd)/model-store:%s IMAGE\n"
                  "(make archive or make demo writes model-store/NAME-VERSION.mar)",
                  args.model_store, args.model_store)
        return 2
    args.home.mkdir(parents=True, exist_ok=True)
    if not os.access(args.home, os.W_OK):
        log.error("%s is not writable by uid %d: with --read-only, mount a tmpfs there "
                  "(--tmpfs %s) or a volume the user can write", args.home, os.getuid(), args.home)
        return 2
    ts = container_server(args.home, args.model_store, args.config)
    try:
        registry, later = plan_from_registry(ts)
    except VersionError as exc:
        log.error("%s", exc)
        return 2

    sup = Supervisor(ts, drain=args.drain, kill_after=10)
    signal.signal(signal.SIGTERM, sup.on_signal)
    signal.signal(signal.SIGINT, sup.on_signal)
    sup.start()
    try:
        status = finish_from_registry(ts, registry, later, args.timeout)
        log.info("ready: %s", ", ".join(f"{name} {[v['modelVersion'] for v in versions]}"
                                        for name, versions in status.items()))
    except Exception as exc:  # noqa: BLE001 - any start failure: report, stop, exit non-zero
        if not sup.stopping.is_set():
            log.error("TorchServe did not come up with the recorded versions: %s", exc)
            sup.stopping.set()
            sup.stop()
            sup.wait()
            return 1
    return sup.wait()


if __name__ == "__main__":
    sys.exit(main())
