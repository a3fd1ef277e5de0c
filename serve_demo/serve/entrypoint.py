"""The container's entry point: the official TorchServe image's commands, and our supervised server.

PID 1 of the image (``docker/Dockerfile``). Like the official image's ``dockerd-entrypoint.sh``:

- no command, or ``serve`` (or only our flags, ``--drain 10``): TorchServe in the foreground with
  ``/home/model-server/config.properties`` (the shipped file, or the user's own mounted there),
  each model's recorded default version from ``MODEL_STORE/registry.json`` (the record
  ``make register/promote/rollback`` keep, so a restarted container comes back with the same
  versions and defaults), then the other recorded versions. Keys, logs and temp files go to the
  run folder ``/home/model-server/run``.
- ``torchserve --start ...`` / ``torchserve --foreground ...``: run as given from
  ``/home/model-server`` (so ``--model-store model-store`` is the mounted store), and the container
  stays up while TorchServe runs (the official image's ``tail -f /dev/null``, except that here the
  container ends when TorchServe does, so a restart policy applies).
- any other command (``torch-model-archiver ...``, ``bash``, one quoted shell line): run as given
  from ``/home/model-server``; the container exits with its status.

Either way SIGTERM/SIGINT stops new work cleanly: the requests in flight are answered
(``SERVE_DEMO_DRAIN_S`` seconds at most), the JVM gets SIGTERM (SIGKILL after 10 s) and the
container exits 0. Before TorchServe starts, ``run/health.json`` says what *healthy* means
(``docker/healthcheck.py``: the HEALTHCHECK, the readiness probe and ``make docker-run``'s wait).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from serve_demo.core import defaults

from .process import stop_pid
from .torchserve import TorchServe, read_properties
from .versions import Registry, VersionError, finish_from_registry, plan_from_registry

log = logging.getLogger("serve_demo.entrypoint")

IMAGE_HOME = Path(os.environ.get("SERVE_DEMO_IMAGE_HOME", "/home/model-server"))
HEALTH_FILE = "health.json"  # read by docker/healthcheck.py
JVM_MARKER = "org.pytorch.serve.ModelServer"
# where each API listens in the container when neither the environment nor the config says
IMAGE_ADDRESSES = {"inference_address": f"http://0.0.0.0:{defaults.INFERENCE_PORT}",
                   "management_address": f"http://127.0.0.1:{defaults.MANAGEMENT_PORT}",
                   "metrics_address": f"http://127.0.0.1:{defaults.METRICS_PORT}"}


def drain_seconds() -> float:
    return float(os.environ.get("SERVE_DEMO_DRAIN_S", 6))


# ------------------------------------------------------------------------------------ configuration


def envvars_enabled(props: dict[str, str]) -> bool:
    """TorchServe applies ``TS_<KEY>`` variables only when the config says ``enable_envvars_config=true``."""
    value = os.environ.get("TS_ENABLE_ENVVARS_CONFIG") or props.get("enable_envvars_config", "false")
    return value.strip().lower() == "true"


def effective(props: dict[str, str], key: str) -> str | None:
    """``key`` as TorchServe will see it: ``TS_KEY`` when variables are enabled, else the file's value."""
    env = os.environ.get(f"TS_{key.upper()}")
    if env is not None and envvars_enabled(props):
        return env
    return props.get(key)


def addresses(props: dict[str, str]) -> dict[str, str]:
    """The three API addresses (environment, then config, then the image's defaults)."""
    return {key: effective(props, key) or default for key, default in IMAGE_ADDRESSES.items()}


def port_of(url: str, default: int) -> int:
    try:
        return urlsplit(url).port or default
    except ValueError:
        return default


def container_server(home: Path, store: Path, config: Path) -> TorchServe:
    """The supervised TorchServe: ``config`` (the user's own, if mounted) with its addresses kept."""
    props = read_properties(config) if config.is_file() else {}
    urls = addresses(props)
    return TorchServe(home=home, model_store=store, base_config=config,
                      inference_port=port_of(urls["inference_address"], 8080),
                      management_port=port_of(urls["management_address"], 8081),
                      metrics_port=port_of(urls["metrics_address"], 8082), overrides=urls)


def write_health_plan(run: Path, plan: dict) -> None:
    """What ``docker/healthcheck.py`` checks; best effort (a read-only run folder has no plan)."""
    try:
        run.mkdir(parents=True, exist_ok=True)
        tmp = run / f".{HEALTH_FILE}.tmp"
        tmp.write_text(json.dumps(plan, indent=1) + "\n")
        os.replace(tmp, run / HEALTH_FILE)
    except OSError as exc:
        log.warning("cannot write %s (%s): the health check only asks for READY workers", run / HEALTH_FILE, exc)


def registry_plan(ts: TorchServe, registry: Registry) -> dict:
    """Healthy = every recorded version registered, the recorded defaults set, every worker READY."""
    return {"mode": "serve", "management": ts.management_url, "keys": [str(ts.home / "key_file.json")],
            "registry": str(registry.path),
            "expect": {name: {"versions": sorted(e["versions"]), "default": e["default"]}
                       for name, e in registry.models.items()}}


# ---------------------------------------------------------------------------------- process control


def jvm_pids(cwd: Path) -> list[int]:
    """TorchServe frontends started from ``cwd`` (by the JVM's main class and working folder: a
    ``torchserve --start`` JVM is not our child once its launcher returns)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline", "status", "cwd"]):
        cmd = proc.info.get("cmdline") or []
        if (JVM_MARKER in cmd and proc.info.get("status") != psutil.STATUS_ZOMBIE
                and proc.info.get("cwd") == str(cwd)):
            pids.append(proc.info["pid"])
    return pids


def in_flight(pid: int | None, port: int) -> int:
    """Inference connections open to the frontend ``pid`` on ``port`` (a request in flight holds one)."""
    import psutil

    if pid is None:
        return 0
    try:
        proc = psutil.Process(pid)
        conns = (getattr(proc, "net_connections", None) or proc.connections)(kind="tcp")
    except psutil.Error:
        return 0
    return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)


def drain_and_stop(pid: int | None, port: int, drain: float, kill_after: float = 10) -> None:
    """Wait (up to ``drain`` s) for the requests in flight, SIGTERM the JVM, SIGKILL it if it hangs."""
    deadline = time.monotonic() + drain
    while in_flight(pid, port) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid is not None:
        stop_pid(pid, kill_after, what="TorchServe")


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
        self.ts.start_guard()

    def on_signal(self, signum: int, _frame) -> None:
        if not self.stopping.is_set():
            log.info("%s: stopping TorchServe", signal.Signals(signum).name)
            self.stopping.set()
            threading.Thread(target=self.stop, name="stop", daemon=True).start()

    def stop(self) -> None:
        drain_and_stop(self.ts.pid(), self.ts.inference_port, self.drain, self.kill_after)
        self.ts.guard_process.stop(self.kill_after)
        if self.proc is not None:
            try:
                self.proc.wait(self.kill_after)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def wait(self) -> int:
        assert self.proc is not None
        code = self.proc.wait()
        while self.ts.pid() is not None:  # the launcher returns with the JVM; be sure
            time.sleep(0.1)
        return 0 if self.stopping.is_set() else (code or 1)


# ------------------------------------------------------------------------ the official image's commands


@dataclass
class TorchServeCommand:
    """What a user's ``torchserve ...`` command line says (the options the image cares about)."""

    start: bool = False
    foreground: bool = False
    stop: bool = False
    config: str | None = None
    models: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, args: list[str]) -> TorchServeCommand:
        p = argparse.ArgumentParser(add_help=False)
        p.add_argument("--start", action="store_true")
        p.add_argument("--foreground", action="store_true")
        p.add_argument("--stop", action="store_true")
        p.add_argument("--ts-config", "--ts_config")
        p.add_argument("--models", nargs="+", default=[])
        known, _ = p.parse_known_args(args)
        return cls(start=known.start, foreground=known.foreground, stop=known.stop, config=known.ts_config,
                   models=[m for arg in known.models for m in arg.split(",") if m])

    @property
    def serves(self) -> bool:
        return (self.start or self.foreground) and not self.stop

    def model_names(self) -> list[str]:
        """``name=file.mar`` -> ``name``; ``file.mar`` -> ``file``; ``all`` -> nothing to require."""
        names = []
        for m in self.models:
            if m == "all":
                return []
            name = m.split("=", 1)[0] if "=" in m else Path(m.split("?")[0]).name.removesuffix(".mar")
            names.append(name)
        return names

    def properties(self, cwd: Path, env: dict[str, str]) -> dict[str, str]:
        """The config TorchServe will read (its launcher's order): ``TS_CONFIG_FILE``, then ``--ts-config``."""
        path = env.get("TS_CONFIG_FILE") or self.config
        if not path:
            return {}
        full = cwd / path
        return read_properties(full) if full.is_file() else {}


def command_line(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(argv to run, its words)``: one argument holding a whole shell line (``"torchserve --start ..."``,
    what the official image's ``eval "$@"`` accepts) runs through ``sh -c``."""
    if len(argv) == 1 and any(c.isspace() for c in argv[0]):
        return ["/bin/sh", "-c", argv[0]], shlex.split(argv[0])
    return argv, argv


def worker_share(props: dict[str, str]) -> dict[str, str]:
    """Environment for a user's ``torchserve``: workers per model from the machine's layout (as
    ``serve`` does) when the config fixes none and TorchServe reads ``TS_*`` variables, and each
    worker told the count so that it takes its share of the CPUs."""
    from serve_demo.core.layout import WORKERS_ENV

    fixed = (effective(props, "default_workers_per_model") or "").strip()
    if fixed.isdigit() and int(fixed) > 0:
        return {WORKERS_ENV: fixed}
    if not envvars_enabled(props):
        return {}  # TorchServe's own default (one per CPU or GPU); each worker computes the layout itself
    workers = str(TorchServe(home=IMAGE_HOME, model_store=IMAGE_HOME, base_config=Path("/nonexistent")).default_workers)
    return {"TS_DEFAULT_WORKERS_PER_MODEL": workers, WORKERS_ENV: workers}


def run_as_given(argv: list[str], home: Path = IMAGE_HOME, run: Path | None = None) -> int:
    """Run a user's command from ``home``; for TorchServe, stay up while it runs and stop it cleanly."""
    cmd, words = command_line(argv)
    program = Path(words[0]).name if words else ""
    env = dict(os.environ)
    ts_cmd = TorchServeCommand.parse(words[1:]) if program == "torchserve" else None
    inference_port = 8080
    if ts_cmd is not None and ts_cmd.serves:
        if ts_cmd.config is None and "TS_CONFIG_FILE" not in env and (home / "config.properties").is_file():
            env["TS_CONFIG_FILE"] = str(home / "config.properties")  # the image's (or the user's mounted) file
        props = ts_cmd.properties(home, env)
        env.update(worker_share(props))
        urls = addresses(props)
        expect = {name: {"versions": None, "default": None} for name in ts_cmd.model_names()}
        write_health_plan(run or home / "run", {"mode": "torchserve", "management": urls["management_address"],
                                                "keys": [str(home / "key_file.json")], "expect": expect})
        inference_port = port_of(urls["inference_address"], 8080)
    try:
        proc = subprocess.Popen(cmd, cwd=home, env=env)
    except OSError as exc:
        log.error("cannot run %s: %s (the image runs `serve` by default, or any command on its PATH)",
                  shlex.join(argv), exc)
        return 127
    stopping = threading.Event()

    def stop_torchserve() -> None:
        for pid in jvm_pids(home):
            drain_and_stop(pid, inference_port, drain_seconds())
        if proc.poll() is None:  # `torchserve --foreground`: its launcher
            proc.send_signal(signal.SIGTERM)

    def on_signal(signum: int, _frame) -> None:
        if stopping.is_set():
            return
        stopping.set()
        if ts_cmd is not None and ts_cmd.serves:
            log.info("%s: stopping TorchServe", signal.Signals(signum).name)
            threading.Thread(target=stop_torchserve, name="stop", daemon=True).start()
        elif proc.poll() is None:
            proc.send_signal(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = proc.wait()
    if ts_cmd is None or not ts_cmd.serves:
        return code
    if stopping.is_set():
        return 0
    if ts_cmd.foreground or code != 0:  # --foreground: TorchServe has ended; --start: it did not start
        return code
    # `torchserve --start` returned once the JVM was launched: stay up while it runs
    deadline = time.monotonic() + 20
    while not jvm_pids(home) and time.monotonic() < deadline and not stopping.is_set():
        time.sleep(0.2)
    while jvm_pids(home):
        time.sleep(0.5)
    if stopping.is_set():
        return 0
    log.error("TorchServe exited by itself; see its log (logs/ts_log.log under %s)", home)
    return 1


# -------------------------------------------------------------------------------------- supervised


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="docker run IMAGE [serve [OPTIONS] | torchserve ... | COMMAND ...]",
        description="serve (default): TorchServe from the store's registry.json. Any other command "
                    "(torchserve --start ..., torch-model-archiver ...) runs as given from /home/model-server.")
    p.add_argument("--model-store", type=Path, default=IMAGE_HOME / "model-store",
                   help="the archives (a mounted volume) and registry.json")
    p.add_argument("--home", type=Path, default=IMAGE_HOME / "run", help="keys, logs and temp files (writable)")
    p.add_argument("--config", type=Path, default=IMAGE_HOME / "config.properties",
                   help="TorchServe's config.properties (mount your own here)")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for READY workers")
    p.add_argument("--drain", type=float, default=drain_seconds(),
                   help="on SIGTERM, seconds to let requests in flight finish (default 6; SERVE_DEMO_DRAIN_S)")
    return p


def serve(argv: list[str]) -> int:
    """``serve``: the supervised TorchServe from the registry (see the module's note)."""
    args = build_parser().parse_args(argv)
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
    if not args.config.is_file():
        log.error("%s not found: mount your config.properties there, or leave the image's own", args.config)
        return 2
    ts = container_server(args.home, args.model_store, args.config)
    try:
        registry, later = plan_from_registry(ts)
    except VersionError as exc:
        log.error("%s", exc)
        return 2
    write_health_plan(args.home, registry_plan(ts, registry))

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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] == "serve":
        return serve(argv[1:])
    if argv[0].startswith("-"):  # our own flags, as before: `docker run IMAGE --drain 10`
        return serve(argv)
    return run_as_given(argv)


if __name__ == "__main__":
    sys.exit(main())
