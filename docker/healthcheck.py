"""Container health: every expected model version registered, defaults set, every worker READY.

Runs inside the container (the image's own Python; standard library only) as the Docker
HEALTHCHECK, the Kubernetes readiness probe and ``make docker-run``'s wait: one rule for all three.

The entry point writes what to expect into ``RUN/health.json`` before it starts TorchServe:

- ``serve`` (the default command): every version recorded in the store's ``registry.json`` and
  its default. A container still registering the recorded non-default versions is *not* healthy
  (so a readiness probe sends no traffic to a replica that would answer 404 for
  ``/predictions/NAME/VERSION``). Versions removed from the registry since the start are not
  required any more.
- ``torchserve --start --models a=a.mar,b.mar``: the models named there (any version).

Then every worker of every registered version must be READY. Without ``health.json`` (a command
run by hand) at least one model with all workers READY is healthy. The management API is asked on
loopback with the management key when token authorization is on. Exit 0 healthy, 1 not, with one
line saying why.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

RUN = os.environ.get("HEALTHCHECK_HOME", "/home/model-server/run")
HEALTH_FILE = "health.json"
DEFAULT_MANAGEMENT = "http://127.0.0.1:8081"


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def loopback(url: str) -> str:
    """``http://0.0.0.0:8081`` -> ``http://127.0.0.1:8081`` (the probe runs inside the container)."""
    scheme, _, rest = url.partition("://")
    port = rest.rsplit(":", 1)[-1].strip("/") if ":" in rest else "8081"
    return f"{scheme or 'http'}://127.0.0.1:{port}"


class Api:
    def __init__(self, url: str, key: str | None) -> None:
        self.url, self.key = url, key
        self.models: list[str] = []

    def get(self, path: str):
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers), timeout=4) as resp:
            return json.load(resp)


def expected_versions(plan: dict) -> dict[str, dict]:
    """``{name: {"versions": [...] or None, "default": v or None}}``: the plan, less what the store's
    registry no longer records (a version removed while running)."""
    expect = {name: dict(e or {}) for name, e in (plan.get("expect") or {}).items()}
    registry = read_json(plan["registry"]) if plan.get("registry") else None
    if registry is not None:
        recorded = registry.get("models", {})
        for name, e in list(expect.items()):
            now = recorded.get(name)
            if now is None:
                del expect[name]
                continue
            if e.get("versions") is not None:
                e["versions"] = [v for v in e["versions"] if v in now.get("versions", {})]
            e["default"] = now.get("default")
    return expect


def check(api: Api, expect: dict[str, dict]) -> str | None:
    """None when healthy, else the reason (``api.models`` lists what was found)."""
    try:
        models = [m["modelName"] for m in api.get("/models").get("models", [])]
    except (OSError, ValueError, urllib.error.URLError) as exc:
        return f"management API not answering at {api.url}: {exc}"
    api.models = models
    if not models:
        return "no models registered"
    for name in expect:
        if name not in models:
            return f"{name}: not registered yet"
    for name in models:
        try:
            versions = api.get(f"/models/{name}/all")
        except (OSError, ValueError, urllib.error.URLError) as exc:
            return f"{name}: {exc}"
        served = {str(v.get("modelVersion")) for v in versions}
        e = expect.get(name) or {}
        missing = sorted(set(e.get("versions") or []) - served)
        if missing:
            return f"{name}: recorded versions {', '.join(missing)} not registered yet"
        for version in versions:
            workers = version.get("workers", [])
            ready = [w for w in workers if w.get("status") == "READY"]
            if not workers or len(ready) < len(workers):
                return f"{name} {version.get('modelVersion')}: {len(ready)}/{len(workers)} workers READY"
        if e.get("default") and e["default"] in served:
            try:
                default = str(api.get(f"/models/{name}")[0].get("modelVersion"))
            except (OSError, ValueError, IndexError, urllib.error.URLError) as exc:
                return f"{name}: {exc}"
            if default != e["default"]:
                return f"{name}: default is {default}, recorded {e['default']} (not set yet)"
    return None


def main() -> int:
    plan = read_json(os.path.join(RUN, HEALTH_FILE)) or {}
    url = loopback(plan.get("management") or os.environ.get("TS_MANAGEMENT_ADDRESS") or DEFAULT_MANAGEMENT)
    key = None
    for path in plan.get("keys") or [os.path.join(RUN, "key_file.json"), "/home/model-server/key_file.json"]:
        keys = read_json(path)
        if keys and isinstance(keys.get("management"), dict):
            key = keys["management"].get("key")
            break
    api = Api(url, key)
    reason = check(api, expected_versions(plan))
    if reason:
        print(reason)
        return 1
    print(f"healthy: {', '.join(api.models)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
