"""Locust load for a served detector: a realistic mix of images, every answer checked.

    locust -f scripts/locustfile.py --host http://127.0.0.1:8080            # web UI on :8089
    make loadtest USERS=20 DURATION=2m                                       # headless, CSV + HTML
    make soak                                                                # 50 users x 5 min, + bad requests

Environment: ``MODEL`` (default shapes), ``IMAGES`` (a folder of .jpg/.png, default
data/shapes/test; a synthetic set is generated when it is missing), ``BAD_SHARE`` (fraction of
malformed requests, default 0; each must get its 4xx), ``TS_INFERENCE_TOKEN`` (default: the
key in ``SERVER_HOME``/key_file.json, SERVER_HOME defaulting to build/server).
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

from locust import HttpUser, between, events, task
from PIL import Image

MODEL = os.environ.get("MODEL", "shapes")
BAD_SHARE = float(os.environ.get("BAD_SHARE", "0"))
SIZES = [None, (640, 480), (320, 240), (240, 320), (160, 120)]

# (body, expected status, extra headers)
BAD = [
    (b"", 400, {}),
    (b"definitely not an image", 415, {}),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00 truncated", 415, {}),
    ("GOOD", 400, {"X-Threshold": "abc"}),
    ("GOOD", 400, {"X-Response-Format": "xml"}),
]


def _token() -> str | None:
    if os.environ.get("TS_INFERENCE_TOKEN"):
        return os.environ["TS_INFERENCE_TOKEN"]
    path = Path(os.environ.get("SERVER_HOME", "build/server")) / "key_file.json"
    try:
        return json.loads(path.read_text())["inference"]["key"]
    except (OSError, KeyError, ValueError):
        return None


def _load_images(limit: int = 40) -> list[tuple[bytes, str]]:
    """JPEG and PNG encodings of the folder's images at several sizes."""
    folder = Path(os.environ.get("IMAGES", "data/shapes/test"))
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit]
    if files:
        images = [Image.open(p).convert("RGB") for p in files]
    else:
        import numpy as np

        from serve_demo.data.synth import SynthConfig, render_image

        rng = np.random.default_rng(0)
        images = [render_image(rng, SynthConfig())[0] for _ in range(limit)]
    out = []
    for i, img in enumerate(images):
        size = SIZES[i % len(SIZES)]
        if size:
            img = img.resize(size)
        fmt = "PNG" if i % 4 == 0 else "JPEG"
        buf = io.BytesIO()
        img.save(buf, format=fmt, quality=90)
        out.append((buf.getvalue(), f"image/{fmt.lower()}"))
    return out


IMAGES: list[tuple[bytes, str]] = []


@events.init.add_listener
def _on_init(environment, **kwargs) -> None:
    IMAGES.extend(_load_images())


class DetectorUser(HttpUser):
    wait_time = between(0.0, 0.2)

    def on_start(self) -> None:
        token = _token()
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}

    @task
    def predict(self) -> None:
        data, ctype = random.choice(IMAGES)
        if BAD_SHARE and random.random() < BAD_SHARE:
            bad, expect, headers = random.choice(BAD)
            data = data if bad == "GOOD" else bad
            self._post(data, ctype, headers, expect, name=f"/predictions/{MODEL} [bad {expect}]")
        else:
            self._post(data, ctype, {}, 200, name=f"/predictions/{MODEL}")

    def _post(self, data: bytes, ctype: str, headers: dict, expect: int, name: str) -> None:
        with self.client.post(f"/predictions/{MODEL}", data=data, name=name, catch_response=True,
                              headers={"Content-Type": ctype, **self.auth, **headers}) as r:
            if r.status_code != expect:
                r.failure(f"expected {expect}, got {r.status_code}: {r.text[:200]}")
                return
            try:
                body = r.json()
            except ValueError:
                r.failure("answer is not JSON")
                return
            if expect == 200:
                ok = isinstance(body, list) and all(isinstance(d, dict) and "score" in d and len(d) == 2
                                                    for d in body)
            else:
                ok = isinstance(body, dict) and body.get("code") == expect and bool(body.get("message"))
            if ok:
                r.success()
            else:
                r.failure(f"unexpected JSON: {str(body)[:200]}")
