"""Container health: every worker of every registered model is READY.

Runs inside the container (the image's own Python; standard library only), as the Docker
HEALTHCHECK and the Kubernetes readiness probe. Asks the management API on loopback, with the
management key from key_file.json when token authorization is on. Exit 0 healthy, 1 not.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request

HOME = os.environ.get("HEALTHCHECK_HOME", "/home/model-server/run")
PORT = os.environ.get("TS_MANAGEMENT_ADDRESS", "http://127.0.0.1:8081").rsplit(":", 1)[-1]
URL = f"http://127.0.0.1:{PORT}"


def get(path: str, key: str | None):
    req = urllib.request.Request(URL + path, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=4) as resp:
        return json.load(resp)


def main() -> int:
    key = None
    try:
        with open(os.path.join(HOME, "key_file.json")) as f:
            key = json.load(f)["management"]["key"]
    except (OSError, ValueError, KeyError):
        pass
    try:
        models = [m["modelName"] for m in get("/models", key).get("models", [])]
        if not models:
            print("no models registered")
            return 1
        for name in models:
            for version in get(f"/models/{name}/all", key):
                workers = version.get("workers", [])
                ready = [w for w in workers if w.get("status") == "READY"]
                if not workers or len(ready) < len(workers):
                    print(f"{name} {version.get('modelVersion')}: {len(ready)}/{len(workers)} workers READY")
                    return 1
    except Exception as exc:  # noqa: BLE001 - any failure means not healthy
        print(f"management API not answering: {exc}")
        return 1
    print(f"healthy: {', '.join(models)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
