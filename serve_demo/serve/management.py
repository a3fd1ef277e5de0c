"""A small client for TorchServe's management API (loopback), token-aware.

TorchServe writes its API keys to ``key_file.json`` in the folder it was started from (the
server's home, ``build/server`` for ``make serve``). When token authorization is on, the
management key is read from there (or given with ``--token`` / ``TS_MANAGEMENT_TOKEN``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import requests

from serve_demo.core import defaults

DEFAULT_MANAGEMENT_URL = f"http://127.0.0.1:{defaults.port('MANAGEMENT_PORT')}"


class ManagementError(RuntimeError):
    """The management API refused a call; carries the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def read_key(home: str | Path, kind: str = "management") -> str | None:
    """The ``kind`` key (``management`` or ``inference``) from ``HOME/key_file.json``, if any."""
    path = Path(home) / "key_file.json"
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text()).get(kind)
    except (OSError, ValueError):
        return None
    return entry.get("key") if isinstance(entry, dict) else None


class Management:
    """``GET/POST/PUT/DELETE`` on the management API, raising :class:`ManagementError`."""

    def __init__(self, url: str = DEFAULT_MANAGEMENT_URL, token: str | None = None,
                 home: str | Path | None = None, timeout: float = 30) -> None:
        self.url = url.rstrip("/")
        self._token = token or os.environ.get("TS_MANAGEMENT_TOKEN")
        self.home = home
        self.timeout = timeout

    @property
    def token(self) -> str | None:
        """The given token, else the key file's current one (read per call: restarts and rotations)."""
        return self._token or (read_key(self.home) if self.home else None)

    def _call(self, method: str, path: str, timeout: float | None = None, **params: Any) -> Any:
        token = self.token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            resp = requests.request(method, f"{self.url}{path}", params=params or None, headers=headers,
                                    timeout=timeout or self.timeout)
        except requests.ConnectionError:
            raise ManagementError(0, f"no TorchServe management API at {self.url}: start it with "
                                     "`make serve` (or pass --management-url)") from None
        try:
            body = resp.json()
        except ValueError:
            body = {"message": resp.text.strip()}
        if resp.status_code >= 400:
            msg = body.get("message", resp.reason) if isinstance(body, dict) else str(body)
            if "Token Authorization failed" in str(msg):
                msg += " (token authorization is on: pass --token or run from the server's home)"
            raise ManagementError(resp.status_code, msg)
        return body

    def models(self) -> list[str]:
        """Names of the registered models."""
        return [m["modelName"] for m in self._call("GET", "/models", limit=1000).get("models", [])]

    def versions(self, name: str) -> list[dict]:
        """Descriptions of every registered version of ``name`` (404 when unknown)."""
        return self._call("GET", f"/models/{name}/all")

    def describe(self, name: str, version: str | None = None) -> dict:
        """One version's description (the default one without ``version``)."""
        path = f"/models/{name}" + (f"/{version}" if version else "")
        return self._call("GET", path)[0]

    def default_version(self, name: str) -> str:
        return str(self.describe(name)["modelVersion"])

    def register(self, archive: str, workers: int | None = None, timeout: float = 300) -> str:
        """Register an archive of the model store by file name; waits for its workers. ``workers``
        None: TorchServe's choice, the archive's ``minWorkers`` or else ``default_workers_per_model``
        (the machine's layout, :func:`serve_demo.core.layout.cpu_layout`)."""
        extra = {"initial_workers": workers} if workers else {}
        return self._call("POST", "/models", timeout=timeout, url=archive, synchronous="true",
                          **extra).get("status", "")

    def set_default(self, name: str, version: str) -> str:
        return self._call("PUT", f"/models/{name}/{version}/set-default").get("status", "")

    def unregister(self, name: str, version: str) -> str:
        return self._call("DELETE", f"/models/{name}/{version}").get("status", "")
