"""The local RTSP camera (``scripts/rtsp_server.py``, GStreamer) as a process: ``make bench-streams`` and the
tests start it on a free loopback port, stop it as a camera that goes away, and start it again on that port."""

from __future__ import annotations

import subprocess
from pathlib import Path

from serve_demo.serve.process import free_ports

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "rtsp_server.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # GStreamer's Python bindings are Debian's (python3-gi), not the venv's


class LocalRtspServer:
    """Each ``mounts`` entry (name -> MJPEG-in-Matroska clip) at ``rtsp://127.0.0.1:PORT/NAME``."""

    def __init__(self, mounts: dict[str, Path], port: int | None = None) -> None:
        self.mounts, self.port = mounts, port or free_ports(1)[0]
        self.proc: subprocess.Popen | None = None

    def url(self, name: str) -> str:
        return f"rtsp://127.0.0.1:{self.port}/{name}"

    def start(self) -> None:
        """Start it and wait for its ``ready`` line.

        Raises:
            RuntimeError: it did not start (GStreamer's RTSP server missing, port taken); its output.
        """
        args = [SYSTEM_PYTHON, str(SCRIPT), "--port", str(self.port)]
        for name, path in self.mounts.items():
            args += ["--mount", f"{name}={path}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            rest = self.proc.stdout.read() if self.proc.poll() is not None else ""
            self.stop()
            raise RuntimeError(f"the RTSP server did not start (`make rtsp-server` installs GStreamer's): {line}{rest}")

    def stop(self) -> None:
        """Kill it: a camera that goes away does not say goodbye."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
