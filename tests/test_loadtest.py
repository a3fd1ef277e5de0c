"""A short smoke run of the locust load test (`make loadtest` / `make soak`) against a real
TorchServe: bounded in time, loopback only, every answer checked by the locustfile."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.server  # this file's layer (conftest.py: every test declares one)


def test_locust_smoke(server, test_split, tmp_path):
    env = {**os.environ, "MODEL": "shapes", "IMAGES": str(test_split / "test"), "SERVER_HOME": str(server.home),
           "BAD_SHARE": "0.2"}
    cmd = [str(Path(sys.executable).parent / "locust"), "-f", str(ROOT / "scripts" / "locustfile.py"), "--headless",
           "-u", "4", "-r", "4", "-t", "8s", "--host", server.inference_url, "--csv", str(tmp_path / "smoke"),
           "--only-summary", "--stop-timeout", "20"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    with open(tmp_path / "smoke_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    total = rows["Aggregated"]
    print(f"locust smoke: {total['Request Count']} requests, {total['Failure Count']} failures, "
          f"{float(total['Requests/s']):.1f}/s, median {total['Median Response Time']} ms")
    assert int(total["Request Count"]) >= 20, proc.stderr[-2000:]
    assert int(total["Failure Count"]) == 0, (tmp_path / "smoke_failures.csv").read_text()
    assert any("[bad " in name for name in rows), "malformed requests were sent and checked too"
    assert proc.returncode == 0, proc.stderr[-2000:]
