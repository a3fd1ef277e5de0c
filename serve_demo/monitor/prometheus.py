"""A local Prometheus with the shipped configuration (``make prometheus``, and the tests).

``docker/prometheus/prometheus.yml`` with only the scrape target, the intervals and the rule
file's path changed; data, log and pid file in ``HOME`` (default ``build/prometheus``). It scrapes
``make serve``'s (or ``make docker-run``'s) metrics API and ``make stream``'s page (``--stream-target``),
and evaluates ``alerts.yml``, so
``make drift`` and ``make dashboard`` have something to read without Docker.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import requests
import yaml

from serve_demo.core import defaults
from serve_demo.serve.process import Background

CONFIG_DIR = Path(__file__).resolve().parents[2] / "docker" / "prometheus"


class LocalPrometheus:
    """One Prometheus process scraping ``target``."""

    def __init__(self, home: Path, target: str, port: int = 9090, interval: str = "5s",
                 config_dir: Path = CONFIG_DIR, stream_target: str | None = None) -> None:
        self.home, self.target, self.port, self.interval = Path(home), target, port, interval
        self.stream_target = stream_target  # serve_demo stream's page; None: that job is left out
        self.config_dir = config_dir
        self.url = f"http://127.0.0.1:{port}"
        self.process = Background("Prometheus", self.pid_file, self.home / "prometheus.log")

    @property
    def pid_file(self) -> Path:
        return self.home / "prometheus.pid"

    def write_config(self) -> Path:
        cfg = yaml.safe_load((self.config_dir / "prometheus.yml").read_text())
        cfg["global"].update({"scrape_interval": self.interval, "evaluation_interval": self.interval})
        cfg["rule_files"] = [str(self.config_dir / "alerts.yml")]
        cfg["scrape_configs"][0]["static_configs"][0]["targets"] = [self.target]
        streams = [c for c in cfg["scrape_configs"] if c["job_name"] == "streams"]
        if self.stream_target:
            streams[0]["static_configs"][0]["targets"] = [self.stream_target]
        else:
            cfg["scrape_configs"] = [c for c in cfg["scrape_configs"] if c["job_name"] != "streams"]
        self.home.mkdir(parents=True, exist_ok=True)
        path = self.home / "prometheus.yml"
        path.write_text(f"# generated from {self.config_dir / 'prometheus.yml'}\n" + yaml.safe_dump(cfg))
        return path

    def start(self, timeout: float = 60) -> None:
        """Start it and wait until ``/-/ready`` answers (the log tail when it exits or times out)."""
        exe = shutil.which("prometheus")
        if exe is None:
            raise RuntimeError("prometheus is not installed: `make prometheus-tools` (Debian: apt-get install "
                               "prometheus), or use docker/compose.yaml")
        config = self.write_config()
        self.process.start([exe, f"--config.file={config}", f"--storage.tsdb.path={self.home / 'data'}",
                            f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"])
        self.process.wait_ready(lambda: requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200, timeout)

    def stop(self, timeout: float = 30) -> bool:
        """SIGTERM (SIGKILL after ``timeout`` s); False when none was running."""
        return self.process.stop(timeout)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", default="build/prometheus", help="config, data, log and pid file")
    p.add_argument("--target", default=f"127.0.0.1:{defaults.port('METRICS_PORT')}",
                   help="TorchServe's metrics address (make serve, make docker-run)")
    p.add_argument("--stream-target", default=f"127.0.0.1:{defaults.STREAM_PORT}",
                   help="serve_demo stream's page (make stream); '' leaves that job out")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--interval", default="5s", help="scrape and rule evaluation interval")
    p.add_argument("--stop", action="store_true", help="stop the Prometheus of HOME")


def main(args: argparse.Namespace) -> int:
    prom = LocalPrometheus(Path(args.home), args.target, args.port, args.interval,
                           stream_target=args.stream_target or None)
    if args.stop:
        print("Prometheus stopped" if prom.stop() else f"no Prometheus running from {args.home}")
        return 0
    if prom.pid_file.is_file():
        print(f"a Prometheus of {args.home} already runs (pid {prom.pid_file.read_text()}); "
              "`make prometheus-stop` first", file=sys.stderr)
        return 2
    try:
        prom.start()
    except (RuntimeError, TimeoutError) as exc:
        print(f"prometheus: {exc}", file=sys.stderr)
        return 2
    print(f"Prometheus at {prom.url} scraping {args.target} every {args.interval}, alerts from "
          f"{CONFIG_DIR / 'alerts.yml'}; data in {args.home}. Then: make drift, make dashboard; "
          "make prometheus-stop")
    return 0
