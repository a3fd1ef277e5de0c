"""Shared fixtures: test images, archives built by torch-model-archiver, a real TorchServe, the image run."""

from __future__ import annotations

import io
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from serve_demo.archive.builder import ArchiveSpec, build
from serve_demo.data.synth import SynthConfig, render_image
from serve_demo.serve import container
from serve_demo.serve.container import Engine, RunSpec
from serve_demo.serve.kserve_local import KServeServer
from serve_demo.serve.process import free_ports, wait_until
from serve_demo.serve.torchserve import TorchServe, read_properties

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_WEIGHTS = ROOT / "weights" / "shapes.pt"
DEMO_LABELS = ROOT / "index_to_name" / "shapes.json"


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def synth_image(seed: int, size: tuple[int, int] | None = None) -> Image.Image:
    """A synthetic scene (optionally resized) from the project's generator."""
    img, _ = render_image(np.random.default_rng(seed), SynthConfig())
    return img.resize(size) if size else img


def archive_args(**kw) -> ArchiveSpec:
    """An archive spec for tests: one worker with one thread (tests share two cores with servers and
    clients; the machine's default layout is tested in test_runtime.py), the repository's handler."""
    return ArchiveSpec(**{"handler": str(ROOT / "handlers" / "detector_handler.py"), "workers": 1, "threads": 1,
                          **kw})


@pytest.fixture(scope="session")
def fixed_weights(tmp_path_factory) -> Path:
    import sys

    import torch
    sys.path.insert(0, str(ASSETS))
    from fixed_detector import FixedDetector

    sys.path.remove(str(ASSETS))
    path = tmp_path_factory.mktemp("fixed") / "fixed.pt"
    torch.save(FixedDetector().state_dict(), path)
    return path


@pytest.fixture(scope="session")
def model_store(tmp_path_factory, fixed_weights) -> Path:
    """Archives of the committed demo model (batch 1 and batch 4) and the fixed detector."""
    store = tmp_path_factory.mktemp("model-store")
    build_dir = tmp_path_factory.mktemp("build")
    common = dict(export_path=str(store), build_dir=str(build_dir))
    build(archive_args(name="shapes", weights=str(DEMO_WEIGHTS), labels=str(DEMO_LABELS),
                       arch="fcos_tiny", **common))
    build(archive_args(name="shapes_b4", weights=str(DEMO_WEIGHTS), labels=str(DEMO_LABELS),
                       arch="fcos_tiny", batch_size=4, max_batch_delay=3000, **common))
    build(archive_args(name="fixed", weights=str(fixed_weights), labels=str(ASSETS / "fixed_labels.json"),
                       model_file=str(ASSETS / "fixed_detector.py"), **common))
    return store


@pytest.fixture(scope="session")
def test_split(tmp_path_factory) -> Path:
    """A COCO dataset root holding the first 60 images of the synthetic test split (seed 0)."""
    from serve_demo.data.synth import generate_split

    root = tmp_path_factory.mktemp("data")
    generate_split(root, "test", 60, seed=0, cfg=SynthConfig(), progress=False)
    return root


def make_server(home: Path, store: Path) -> TorchServe:
    """A TorchServe on free loopback ports with the shipped config (not started)."""
    return TorchServe.on_free_ports(home, store, base_config=ROOT / "docker" / "config.properties")


@pytest.fixture(scope="session")
def server(tmp_path_factory, model_store):
    """A real TorchServe on free loopback ports with the shipped config."""
    with make_server(tmp_path_factory.mktemp("ts-home"), model_store).running(
            180, expect=["shapes", "shapes_b4", "fixed"]) as ts:
        yield ts


@pytest.fixture(scope="session")
def kserve(tmp_path_factory, model_store):
    """KServe's ModelServer over the same archives (shapes, shapes_b4, fixed) on free loopback ports."""
    ks = KServeServer.on_free_ports(tmp_path_factory.mktemp("kserve-home"), model_store,
                                    ["shapes-1.0.mar", "shapes_b4-1.0.mar", "fixed-1.0.mar"])
    with ks.running(180):
        yield ks


@pytest.fixture(scope="session")
def ui(server):
    """The page and its proxy (``make ui``'s server) on a free loopback port, for the test TorchServe (its keys)."""
    from serve_demo.serve.ui import create_app, web_server

    (port,) = free_ports(1)
    web = web_server(create_app(server.inference_url, server.management_url, server.home), port)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    wait_until(lambda: web.started, 30, what="the UI server")
    yield f"http://127.0.0.1:{port}"
    web.should_exit = True
    thread.join(10)


@dataclass
class ContainerServer(TorchServe):
    """The serving image run as ``make docker-run`` runs it, on free loopback ports.

    Its run folder (keys, logs) is ``home``, mounted; so the management key, the logs and the
    management API are reached from the host exactly as for a local TorchServe."""

    engine: Engine | None = None
    name: str = ""
    spec: RunSpec | None = None
    startup_s: float = 0.0

    def pid(self) -> int | None:
        info = self.engine.inspect(self.name) if self.engine else None
        return info["State"].get("Pid") if info and info["State"].get("Running") else None

    def start(self) -> None:
        container.start(self.engine, self.spec)
        self.startup_s = container.wait_healthy(self.engine, self.name, 300)

    def stop(self, timeout: float = 15) -> bool:
        return container.stop(self.engine, self.name, int(timeout))

    def log_tail(self, lines: int = 30) -> str:
        return container.logs(self.engine, self.name, lines)


IMAGE_TAG = os.environ.get("IMAGE_TAG", container.DEFAULT_TAG)


@pytest.fixture(scope="session")
def engine() -> Engine:
    try:
        return container.detect_engine()
    except container.ContainerError as exc:
        pytest.fail(f"{exc} (`make test` installs podman as root)")


@pytest.fixture(scope="session")
def image(engine) -> str:
    if not engine.image_exists(IMAGE_TAG):
        pytest.fail(f"no image {IMAGE_TAG}: `make docker-build` (`make test` builds it first)")
    return IMAGE_TAG


def make_container(engine: Engine, image: str, home: Path | None, store: Path, **spec) -> ContainerServer:
    """A container of ``image`` on free loopback ports (not started); management and metrics published."""
    p = free_ports(3)
    name = f"serve-demo-test-{os.getpid()}-{p[0]}"
    run = RunSpec(image=image, name=name, store=store, home=home, inference_port=p[0], management_port=p[1],
                  metrics_port=p[2], gpus="none", **spec)
    # without a mounted home (a tmpfs run folder), keys are read with `exec` (container.container_key)
    return ContainerServer(home=home or Path("/nonexistent/run"), model_store=store, inference_port=p[0],
                           management_port=p[1], metrics_port=p[2], engine=engine, name=name, spec=run)


@pytest.fixture(scope="session")
def container_tmp() -> Path:
    """Folders the container's user (uid 1000) can reach: pytest's own temp root is private (0700)."""
    root = ROOT / "build" / "container-tests" / str(os.getpid())
    root.mkdir(parents=True, exist_ok=True)
    for p in (root, root.parent, root.parent.parent):
        p.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def container_dir(container_tmp: Path, name: str) -> Path:
    path = container_tmp / name
    path.mkdir(mode=0o755)
    return path


@pytest.fixture(scope="session")
def container_store(container_tmp, model_store) -> Path:
    """The archives of ``model_store`` (byte for byte), where the container can read them."""
    store = container_dir(container_tmp, "store")
    for mar in model_store.glob("*.mar"):
        shutil.copy2(mar, store / mar.name)
    return store


@pytest.fixture(scope="session")
def served_container(container_tmp, engine, image, container_store):
    """The image serving the same archives as ``server`` (make docker-run's command)."""
    c = make_container(engine, image, container_dir(container_tmp, "served-home"), container_store)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(params=["torchserve", "kserve", "container"])
def target(request):
    """Each server in turn, serving the same archives: the behavioural suite runs against the local
    TorchServe, the KServe server and the container image."""
    return request.getfixturevalue({"torchserve": "server", "kserve": "kserve",
                                    "container": "served_container"}[request.param])


def workers(ts: TorchServe | KServeServer, model: str = "shapes") -> list[dict]:
    """The default version's workers of ``model``, from the management API (TorchServe's, or the KServe
    server's: one worker, the server's own process)."""
    return requests.get(f"{ts.management_url}/models/{model}", headers=ts.auth(), timeout=10).json()[0]["workers"]


def worker_log(ts: TorchServe | KServeServer) -> str:
    """What the workers logged (TorchServe's model_log.log; the KServe server's own log)."""
    path = ts.log_file if isinstance(ts, KServeServer) else ts.home / "logs" / "model_log.log"
    return path.read_text(errors="replace")


def read_properties_of(ts: TorchServe) -> dict[str, str]:
    """The config.properties this instance was started with."""
    return read_properties(ts.home / "config.properties")


def post(ts: TorchServe | KServeServer, model: str, data: bytes, headers: dict | None = None,
         **kw) -> requests.Response:
    headers = {"Content-Type": "application/octet-stream", **ts.auth("inference"), **(headers or {})}
    return requests.post(f"{ts.inference_url}/predictions/{model}", data=data, headers=headers, timeout=120, **kw)


# Test layers (make test-unit runs the first), declared on each test or file, never guessed:
# unit: pure logic, no archive, server or training; integration: builds archives, trains, or runs
# the handler in-process; server: talks to a real TorchServe, KServe server or container.
LAYERS = ("unit", "integration", "server")


def pytest_collection_modifyitems(items) -> None:
    undeclared = []
    for item in items:
        declared = {m.name for m in item.iter_markers() if m.name in LAYERS}
        if len(declared) != 1:
            undeclared.append(f"{item.nodeid}: {sorted(declared) or 'none'}")
    if undeclared:
        raise pytest.UsageError("every test declares exactly one layer (@pytest.mark.unit / integration / server, "
                                "or a file's pytestmark):\n  " + "\n  ".join(undeclared))
