"""Every default the project writes once: folders, ports, thresholds, formats.

Read by argparse (``serve_demo``'s commands), by the worker core and, through
``python3 serve_demo/core/defaults.py --make`` (no third-party imports), by the Makefile.
Ports can be moved with the environment variables of the same names.
"""

from __future__ import annotations

import os
import sys

HOME = "build/server"  # a local server's state: config, temp, logs, key_file.json
MODEL_STORE = "model-store"
VERSION = "1.0"

INFERENCE_PORT = 8080  # TorchServe inference API; the KServe server's HTTP port
MANAGEMENT_PORT = 8081
METRICS_PORT = 8082
GRPC_INFERENCE_PORT = 7070  # TorchServe's gRPC inference API; the KServe server's OIP v2 gRPC port
GRPC_MANAGEMENT_PORT = 7071

BIND = "127.0.0.1"  # where local servers listen (make serve PUBLISH=0.0.0.0 publishes inference and metrics)

SERVERS = ("torchserve", "kserve")
SERVER = "torchserve"

THRESHOLD = 0.5  # score threshold: a detection is answered when its score is at least this
MASK_THRESHOLD = 0.5  # mask models: pixel probability kept in the mask
FORMATS = ("stock", "detailed")  # JSON formats: an archive's default is one of these
IMAGE_FORMAT = "image"  # per request: the uploaded image with the detections drawn (JPEG, or PNG by Accept)
RESPONSE_FORMAT = "stock"
MAX_IMAGE_PIXELS = 40_000_000  # decompression-bomb limit per image
MAX_INSTANCES = 64  # images in one KServe v1/v2 request
MAX_REQUEST_SIZE = 16 << 20  # bytes of one request body (TorchServe's max_request_size, docker/config.properties)
MAX_RESPONSE_SIZE = 16 << 20  # bytes of one answer (TorchServe's max_response_size): larger image answers get 413
RUNTIME = "auto"  # an archive's dense layers: the fastest runtime that passes the parity gate (eager without one)
PRECISION = "fp32"
DEMO_NAME = "shapes"  # the embedded demo: its model name, dataset and label map
DEMO_DATA = "data/shapes"
PROMETHEUS_URL = "http://127.0.0.1:9090"
HEADER_TIMEOUT_S = 10.0  # listeners we own (KServe server, UI, guard): seconds to send a request's line and headers
BODY_IDLE_TIMEOUT_S = 10.0  # ... and the longest pause while sending its body; then the connection is closed
GATE_TOLERANCE = 0.005  # largest mAP@[.5:.95] drop a promotion accepts
STREAM_PORT = 8095  # serve_demo stream: its live MJPEG page, /status and /metrics (Prometheus), on loopback
STREAM_INFLIGHT = 4  # serve_demo stream: requests in flight across all its sources (the server's capacity)

_PORTS = ("INFERENCE_PORT", "MANAGEMENT_PORT", "METRICS_PORT", "GRPC_INFERENCE_PORT", "GRPC_MANAGEMENT_PORT")


def port(name: str) -> int:
    """A port by its name (``"INFERENCE_PORT"``), from the environment if set there."""
    if name not in _PORTS:
        raise KeyError(f"unknown port {name!r}; known: {', '.join(_PORTS)}")
    raw = os.environ.get(name)
    if raw is None:
        return int(globals()[name])
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"{name}={raw!r} is not a port number (1-65535)")
    return int(raw)


def make_variables() -> str:
    """The defaults as Makefile ``?=`` assignments (``include``d by the Makefile)."""
    values = {"HOME_DIR": HOME, "MODEL_STORE": MODEL_STORE, "VERSION": VERSION, "SERVER": SERVER,
              "THRESHOLD": THRESHOLD, "GATE_TOLERANCE": GATE_TOLERANCE, "RUNTIME": RUNTIME, "PRECISION": PRECISION,
              "NAME": DEMO_NAME, "DATA": DEMO_DATA, "PROMETHEUS_URL": PROMETHEUS_URL, "PUBLISH": BIND,
              **{name: globals()[name] for name in _PORTS}}
    return "".join(f"{k} ?= {v}\n" for k, v in values.items())


if __name__ == "__main__":
    if sys.argv[1:] != ["--make"]:
        sys.exit("usage: python3 serve_demo/core/defaults.py --make")
    sys.stdout.write(make_variables())
