"""``make ui``: a browser page for the running server, on loopback, with the key kept here.

A static page (``ui/index.html``: drag, paste, pick or photograph an image; model and version
pickers; a threshold slider; the drawn answer beside the JSON; the latency; the API's errors as
given) and a thin proxy in front of the model server. Chosen over Gradio: no extra framework in
the image, one small page users can read, and the proxy keeps TorchServe's inference and
management keys on the server side (the browser never sees them).

Routes: ``GET /`` the page; ``GET /api/models`` models and versions (TorchServe's management
API, or ``/v1/models`` on the KServe server); ``POST /api/predict`` (multipart ``data``,
``model``, ``version``, ``threshold``) -> ``{"status", "latency_ms", "answer", "image"}`` where
``answer`` is the server's JSON (detailed format, or its error) and ``image`` the drawn answer
(PNG, base64), made with the same drawing code as the server's image answers.
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import sys
import time
from pathlib import Path

import requests
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse

from serve_demo.core import defaults

log = logging.getLogger(__name__)

PAGE = Path(__file__).resolve().parent / "ui" / "index.html"


def create_app(url: str, management_url: str | None, home: str | Path | None = None):
    """The page and its proxy for the inference server at ``url`` (keys read from ``home``)."""
    from .management import read_key

    app = FastAPI(title="serve_demo ui", docs_url=None, redoc_url=None)
    session = requests.Session()

    def auth(kind: str) -> dict[str, str]:
        key = read_key(home, kind) if home else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text()

    @app.get("/api/models")
    def models() -> JSONResponse:
        """``{"models": [{"name", "versions": [...], "default"}], "server"}``."""
        try:
            if management_url:
                try:
                    names = session.get(f"{management_url}/models", headers=auth("management"),
                                        timeout=5).json()["models"]
                    out = []
                    for m in names:
                        versions = session.get(f"{management_url}/models/{m['modelName']}/all",
                                               headers=auth("management"), timeout=5).json()
                        default = session.get(f"{management_url}/models/{m['modelName']}",
                                              headers=auth("management"), timeout=5).json()[0]["modelVersion"]
                        out.append({"name": m["modelName"], "versions": [str(v["modelVersion"]) for v in versions],
                                    "default": str(default)})
                    return JSONResponse({"models": out, "server": "torchserve"})
                except (requests.ConnectionError, KeyError, ValueError):
                    pass  # no TorchServe management API there: ask the KServe way
            names = session.get(f"{url}/v1/models", timeout=5).json()["models"]
            return JSONResponse({"models": [{"name": n, "versions": [], "default": None} for n in names],
                                 "server": "kserve"})
        except (requests.RequestException, KeyError, ValueError) as exc:
            return JSONResponse({"error": f"no model server answers at {url}: {exc}. Start one: make serve"},
                                status_code=502)

    @app.post("/api/predict")
    def predict(data: UploadFile = File(...), model: str = Form(...), version: str = Form(""),
                threshold: str = Form(str(defaults.THRESHOLD))) -> JSONResponse:
        from PIL import Image, ImageOps

        from serve_demo.core.draw import draw_detections
        from serve_demo.core.schema import parse_detections

        body = data.file.read()
        path = f"{url}/predictions/{model}" + (f"/{version}" if version else "")
        headers = {"Content-Type": "application/octet-stream", "X-Response-Format": "detailed",
                   "X-Threshold": threshold, **auth("inference")}
        t0 = time.perf_counter()
        try:
            resp = session.post(path, data=body, headers=headers, timeout=120)
        except requests.RequestException as exc:
            return JSONResponse({"status": 502, "answer": {"message": f"no model server at {url}: {exc}"}},
                                status_code=502)
        latency = round((time.perf_counter() - t0) * 1000, 1)
        try:
            answer = resp.json()
        except ValueError:
            answer = {"message": resp.text[:500] or resp.reason}
        result = {"status": resp.status_code, "latency_ms": latency, "answer": answer, "image": None}
        if resp.status_code == 200:
            with Image.open(io.BytesIO(body)) as im:
                upright = ImageOps.exif_transpose(im).convert("RGB")
            buf = io.BytesIO()
            draw_detections(upright, parse_detections(answer)).save(buf, format="PNG")
            result["image"] = base64.b64encode(buf.getvalue()).decode()
        return JSONResponse(result)

    return app


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=8090, help="the page's port on 127.0.0.1 (default 8090)")
    p.add_argument("--url", default=f"http://127.0.0.1:{defaults.port('INFERENCE_PORT')}",
                   help="the model server's inference URL")
    p.add_argument("--management-url", default=f"http://127.0.0.1:{defaults.port('MANAGEMENT_PORT')}",
                   help="TorchServe's management API (models and versions); ignored for the KServe server")
    p.add_argument("--home", default=defaults.HOME, help="the server's folder (its key_file.json)")


def web_server(app, port: int):
    """The page's uvicorn server on 127.0.0.1, cutting slow clients (``serve/deadlines.py``); not yet running."""
    import uvicorn

    from serve_demo.serve import deadlines

    return uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                         http=deadlines.protocol()))


def main(args: argparse.Namespace) -> int:
    app = create_app(args.url.rstrip("/"), args.management_url.rstrip("/"), args.home)
    print(f"serve_demo ui at http://127.0.0.1:{args.port} (model server {args.url}); Ctrl-C stops it",
          file=sys.stderr)
    web_server(app, args.port).run()
    return 0
