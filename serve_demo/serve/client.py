"""HTTP client for a served detector: ``python -m serve_demo predict IMAGE... [--draw OUT]``."""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import sys
from pathlib import Path
from typing import Any

import requests

from serve_demo.core import defaults
from serve_demo.core.schema import parse_detections

DEFAULT_URL = f"http://127.0.0.1:{defaults.port('INFERENCE_PORT')}"


class PredictionError(RuntimeError):
    """The server refused or failed a request; carries the HTTP status and JSON error."""

    def __init__(self, status: int, body: Any) -> None:
        msg = body.get("message") if isinstance(body, dict) else str(body)
        super().__init__(f"HTTP {status}: {msg}")
        self.status = status
        self.body = body


def predict_bytes(data: bytes, model: str, url: str = DEFAULT_URL, version: str | None = None,
                  threshold: float | None = None, response_format: str | None = None,
                  token: str | None = None, content_type: str = "application/octet-stream",
                  session: requests.Session | None = None, timeout: float = 60) -> Any:
    """POST one image; return the parsed JSON answer.

    Raises:
        PredictionError: any non-200 answer.
    """
    headers = {"Content-Type": content_type}
    if threshold is not None:
        headers["X-Threshold"] = str(threshold)
    if response_format:
        headers["X-Response-Format"] = response_format
    if token:
        headers["Authorization"] = f"Bearer {token}"
    path = f"{url.rstrip('/')}/predictions/{model}" + (f"/{version}" if version else "")
    resp = (session or requests).post(path, data=data, headers=headers, timeout=timeout)
    try:
        body = resp.json()
    except ValueError:
        body = resp.text
    if resp.status_code != 200:
        if isinstance(body, dict) and body.get("type") == "InvalidKeyException":
            body = {**body, "message": f"{body.get('message')} (token authorization is on: pass --token, or "
                                       "--home pointing at the server's folder with key_file.json)"}
        raise PredictionError(resp.status_code, body)
    return body


def predict_file(path: str | Path, model: str, **kwargs) -> Any:
    """POST an image file (content type from its extension)."""
    path = Path(path)
    ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return predict_bytes(path.read_bytes(), model, content_type=ctype, **kwargs)


def format_json(body: Any) -> str:
    """Readable JSON: one detection per line."""
    if isinstance(body, list):
        return "[\n" + ",\n".join("  " + json.dumps(d) for d in body) + "\n]" if body else "[]"
    if isinstance(body, dict) and isinstance(body.get("detections"), list):
        head = {k: v for k, v in body.items() if k != "detections"}
        dets = ",\n".join("    " + json.dumps(d) for d in body["detections"])
        return ("{\n  \"detections\": [\n" + dets + "\n  ],\n"
                + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in head.items()) + "\n}")
    return json.dumps(body, indent=2)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files to send")
    p.add_argument("--model", default=os.environ.get("MODEL", defaults.DEMO_NAME), help="model name")
    p.add_argument("--version", default=None, help="model version (default: the server's default)")
    p.add_argument("--url", default=DEFAULT_URL, help="inference API base URL")
    p.add_argument("--threshold", type=float, default=None, help="score threshold for this request")
    p.add_argument("--format", dest="response_format", choices=("stock", "detailed"), default=None,
                   help="response format (default: the model's; detailed with --draw, for masks and keypoints)")
    p.add_argument("--token", default=os.environ.get("TS_INFERENCE_TOKEN"),
                   help="inference token when token authorization is on (env TS_INFERENCE_TOKEN; "
                        "default: the key in HOME/key_file.json)")
    p.add_argument("--home", default=defaults.HOME, help="the local server's folder (its key_file.json)")
    p.add_argument("--draw", default=None,
                   help="save the image with boxes, masks and keypoints drawn: a file for one image, "
                        "a folder for several")


def main(args: argparse.Namespace) -> int:
    """Print each image's JSON answer; exit 1 if any request failed."""
    from serve_demo.core.draw import save_drawing

    from .management import read_key

    token = args.token or read_key(args.home, "inference")
    fmt = args.response_format or ("detailed" if args.draw else None)
    failed = 0
    for image in args.images:
        try:
            body = predict_file(image, args.model, url=args.url, version=args.version,
                                threshold=args.threshold, response_format=fmt, token=token)
        except (PredictionError, requests.ConnectionError, OSError) as exc:
            print(f"{image}: {exc}", file=sys.stderr)
            failed += 1
            continue
        if len(args.images) > 1:
            print(f"# {image}")
        print(format_json(body))
        if args.draw:
            out = Path(args.draw)
            if len(args.images) > 1 or out.is_dir():
                out = out / f"{Path(image).stem}_detections.png"
            print(f"drawn: {save_drawing(image, parse_detections(body), out)}", file=sys.stderr)
    return 1 if failed else 0
