"""What users bring from TorchServe's docs and examples, on the host (the image: test_coming_from_torchserve.py).

- the object-detection tutorial's ``model.py`` (``resnet_fpn_backbone('resnet50', True)``: it asks
  for ImageNet weights while the model is built), a state_dict of the R50-FPN Faster R-CNN at its
  real size (167 MB) and ``index_to_name.json``: ``make archive MODEL_FILE=...`` builds and serves
  offline, or refuses naming the keys only the download would fill;
- a ``.mar`` built with TorchServe's own archiver and the stock ``object_detector`` handler: served,
  registered by its manifest, promoted through the mAP gate (stock answers), rolled back;
- TorchScript and ``torch.export`` detectors as the serialized file: parity-checked and served.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

from serve_demo import cli
from serve_demo.archive.builder import ArchiveError, build
from serve_demo.core.loader import program_kind
from serve_demo.core.offline import ModelFileError, intercept_downloads
from serve_demo.serve.entrypoint import TorchServeCommand, command_line
from serve_demo.serve.management import Management
from serve_demo.serve.versions import start_from_registry
from tests.conftest import ASSETS, DEMO_LABELS, DEMO_WEIGHTS, ROOT, archive_args, encode, make_server, synth_image

TUTORIAL = ASSETS / "tutorial" / "model.py"
STOCK_MODEL = ASSETS / "stock_shapes" / "model.py"
SSD = "ssdlite320_mobilenet_v3_large"  # a fixed-size transform: scripted and eager resize alike
RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"


def tutorial_class():
    sys.path.insert(0, str(TUTORIAL.parent))
    try:
        sys.modules.pop("model", None)
        import model  # the tutorial's file, imported as TorchServe imports it

        return model.FRCNNObjectDetector
    finally:
        sys.path.remove(str(TUTORIAL.parent))
        sys.modules.pop("model", None)


@pytest.fixture(scope="module")
def tutorial_files(tmp_path_factory) -> dict[str, Path]:
    """The tutorial's three files: model.py (as written), a trained-like state_dict, index_to_name.json."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    root = tmp_path_factory.mktemp("tutorial")
    torch.manual_seed(0)
    model = FasterRCNN(resnet_fpn_backbone(backbone_name="resnet50", weights=None), 91)
    torch.save(model.state_dict(), root / "model.pt")
    (root / "index_to_name.json").write_text(json.dumps(
        {str(i): "__background__" if i == 0 else f"class_{i}" for i in range(91)}))
    shutil.copy2(TUTORIAL, root / "model.py")
    return {"model_file": root / "model.py", "weights": root / "model.pt", "labels": root / "index_to_name.json",
            "root": root}


def make(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)


# ------------------------------------------------------------------------------------------- units


@pytest.mark.unit
def test_the_official_images_torchserve_command_lines_are_read():
    cmd = TorchServeCommand.parse(["--start", "--ncs", "--model-store", "model-store",
                                   "--models", "shapes=shapes-1.0.mar", "pets.mar,fixed=fixed-1.0.mar"])
    assert cmd.serves and not cmd.foreground and cmd.config is None
    assert cmd.model_names() == ["shapes", "pets", "fixed"]
    assert TorchServeCommand.parse(["--foreground", "--models", "all"]).model_names() == []
    assert not TorchServeCommand.parse(["--stop"]).serves
    assert TorchServeCommand.parse(["--start", "--ts-config", "my.properties"]).config == "my.properties"
    # one argument holding a whole line runs through a shell, as the official image's `eval "$@"`
    assert command_line(["torchserve --start --models all"]) == (
        ["/bin/sh", "-c", "torchserve --start --models all"], ["torchserve", "--start", "--models", "all"])
    assert command_line(["torchserve", "--start"]) == (["torchserve", "--start"], ["torchserve", "--start"])


@pytest.mark.unit
def test_the_health_rule_drops_versions_the_registry_no_longer_records(tmp_path):
    sys.path.insert(0, str(ROOT / "docker"))
    try:
        import healthcheck
    finally:
        sys.path.remove(str(ROOT / "docker"))
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"models": {"shapes": {"default": "1.0", "versions": {"1.0": "a.mar"}}}}))
    plan = {"registry": str(registry), "expect": {"shapes": {"versions": ["1.0", "2.0"], "default": "2.0"},
                                                 "gone": {"versions": ["1.0"], "default": "1.0"}}}
    assert healthcheck.expected_versions(plan) == {"shapes": {"versions": ["1.0"], "default": "1.0"}}
    plan.pop("registry")
    assert set(healthcheck.expected_versions(plan)) == {"shapes", "gone"}
    assert healthcheck.loopback("http://0.0.0.0:9081") == "http://127.0.0.1:9081"


@pytest.mark.integration
def test_building_the_tutorial_model_downloads_nothing_and_records_the_line():
    cls = tutorial_class()
    with intercept_downloads(TUTORIAL) as downloads:
        model = cls()
    assert [(d.url, d.where) for d in downloads.seen] == [(RESNET50_URL, "model.py:9")]
    filled = downloads.keys_filled(model)
    assert filled and all(k.startswith("backbone.body.") for k in filled)  # the ImageNet ResNet-50 only
    full = model.state_dict()
    downloads.check_covered(model, full, "model.pt")  # covered: no error
    with pytest.raises(ModelFileError, match=r"does not hold 2 of the keys .* backbone\.body\.conv1\.weight"):
        downloads.check_covered(model, {k: v for k, v in full.items() if not k.startswith("backbone.body.conv1.")
                                        and k != "backbone.body.bn1.weight"}, "model.pt")
    # outside the block torch.hub is itself again
    import torch.hub

    assert torch.hub.load_state_dict_from_url.__module__ == "torch.hub"


# ------------------------------------------------------------------------------- archive (make)


@pytest.mark.integration
def test_make_archive_of_the_tutorial_model_builds_offline_and_serves(tutorial_files, tmp_path):
    """`make archive MODEL_FILE=model.py WEIGHTS=model.pt LABELS=index_to_name.json`: R50-FPN at its real size."""
    store = tmp_path / "store"
    t = tutorial_files
    proc = make("archive", "NAME=tutorial", f"MODEL_FILE={t['model_file']}", f"WEIGHTS={t['weights']}",
                f"LABELS={t['labels']}", "RUNTIME=eager", f"MODEL_STORE={store}",
                "WORKERS=1", "THREADS=2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    warnings = [line for line in out.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, warnings  # one warning: the file and line, the URL, the fix
    assert f"model.py:9 downloads {RESNET50_URL}" in warnings[0] and "weights=None" in warnings[0]
    mar = store / "tutorial-1.0.mar"
    assert mar.is_file(), out
    print(f"\ntutorial R50-FPN archive: {mar.stat().st_size / 1e6:.0f} MB")
    ts = make_server(tmp_path / "home", store)
    with ts.running(300, expect=["tutorial"]):
        r = requests.post(f"{ts.inference_url}/predictions/tutorial", data=encode(synth_image(3)),
                          headers={"Content-Type": "image/jpeg", "X-Response-Format": "detailed",
                                   **ts.auth("inference")}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "tutorial" and isinstance(r.json()["detections"], list)
        log = (ts.home / "logs" / "model_log.log").read_text(errors="replace")
        assert "URLError" not in log and "skipped" in log  # the worker built it offline as well


@pytest.mark.integration
def test_a_state_dict_missing_what_the_download_fills_is_refused_by_name(tutorial_files, tmp_path):
    t = tutorial_files
    state = torch.load(t["weights"], weights_only=True)
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith("backbone.body.layer4.")}, partial)
    proc = make("archive", "NAME=tutorial", f"MODEL_FILE={t['model_file']}", f"WEIGHTS={partial}",
                f"LABELS={t['labels']}", "RUNTIME=eager", f"MODEL_STORE={tmp_path / 'store'}")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out
    assert f"model.py:9 downloads {RESNET50_URL}" in out
    assert "partial.pt does not hold 50 of the keys that download would have filled" in out
    assert "backbone.body.layer4.0.conv1.weight" in out and "torch.save(model.state_dict()" in out
    assert not (tmp_path / "store" / "tutorial-1.0.mar").exists()


@pytest.mark.integration
@pytest.mark.parametrize("source, expected", [
    ("import torch\nclass M(torch.nn.Module)\n    pass\n", "bad.py:2: SyntaxError"),
    ("import torch\nclass M(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
     "        self.backbone = build_backbone()\n", "bad.py:5: NameError: name 'build_backbone' is not defined"),
    ("import torch\nimport not_installed_pkg\n", "bad.py:2: ModuleNotFoundError: No module named 'not_installed_pkg'"),
])
def test_mistakes_in_a_model_file_name_the_line_without_a_traceback(tmp_path, source, expected):
    bad = tmp_path / "bad.py"
    bad.write_text(source)
    proc = subprocess.run([sys.executable, "-m", "serve_demo", "archive", "--name", "bad", "--model-file", str(bad),
                           "--weights", str(DEMO_WEIGHTS), "--labels", str(DEMO_LABELS),
                           "--export-path", str(tmp_path / "store"), "--build-dir", str(tmp_path / "b")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert expected in proc.stderr and "fix the model file" in proc.stderr


# ---------------------------------------------------------------------- TorchScript, torch.export


@pytest.fixture(scope="module")
def program_store(tmp_path_factory) -> Path:
    """Serialized detectors archived as TorchServe takes them (the program as the serialized file, no
    model code): SSDlite (random weights) scripted with `torch.jit.script` beside its eager archive, and
    the fixed detector exported with `torch.export` (dynamic height and width)."""
    from serve_demo.core.models import build_model

    sys.path.insert(0, str(ASSETS))
    from fixed_detector import FixedDetector

    sys.path.remove(str(ASSETS))
    root = tmp_path_factory.mktemp("programs")
    store, build_dir = root / "store", root / "build"
    common = dict(export_path=str(store), build_dir=str(build_dir))
    torch.manual_seed(0)
    ssd = build_model(SSD, 6).eval()
    torch.save(ssd.state_dict(), root / "ssd.pt")
    torch.jit.script(ssd).save(root / "ssd_scripted.pt")
    h, w = torch.export.Dim("h", min=16, max=8192), torch.export.Dim("w", min=16, max=8192)
    program = torch.export.export(FixedDetector().eval(), ([torch.rand(3, 240, 320)],),
                                  dynamic_shapes=([{1: h, 2: w}],), strict=False)
    torch.export.save(program, root / "fixed.pt2")
    assert program_kind(root / "ssd_scripted.pt") == "torchscript" and program_kind(root / "fixed.pt2") == "exported"
    assert program_kind(DEMO_WEIGHTS) is None
    # --arch / --model-file name the eager twin: the archive is parity-checked against it
    build(archive_args(name="ssd_scripted", weights=str(root / "ssd_scripted.pt"), labels=str(DEMO_LABELS),
                       arch=SSD, **common))
    build(archive_args(name="ssd_eager", weights=str(root / "ssd.pt"), labels=str(DEMO_LABELS), arch=SSD, **common))
    build(archive_args(name="exported", weights=str(root / "fixed.pt2"), labels=str(ASSETS / "fixed_labels.json"),
                       model_file=str(ASSETS / "fixed_detector.py"), **common))
    return store


@pytest.mark.integration
def test_programs_that_would_answer_differently_are_refused_with_the_reason(tmp_path, test_split):
    from serve_demo.core.models import build_model

    sys.path.insert(0, str(ASSETS))
    from fixed_detector import FixedDetector

    sys.path.remove(str(ASSETS))
    common = dict(export_path=str(tmp_path / "store"), build_dir=str(tmp_path / "build"))
    demo = build_model("fcos_tiny", 6)
    demo.load_state_dict(torch.load(DEMO_WEIGHTS, weights_only=True))
    torch.jit.script(demo.eval()).save(tmp_path / "demo_scripted.pt")
    # torchvision's scripted transform rounds the resize scale in float32: some image sizes differ by a pixel
    with pytest.raises(ArchiveError, match=r"does not answer like fcos_tiny.*max score difference.*float32"):
        build(archive_args(name="demo_scripted", weights=str(tmp_path / "demo_scripted.pt"), labels=str(DEMO_LABELS),
                           arch="fcos_tiny", parity_data=str(test_split), parity_split="test", **common))
    static = torch.export.export(FixedDetector().eval(), ([torch.rand(3, 240, 320)],), strict=False)
    torch.export.save(static, tmp_path / "static.pt2")
    with pytest.raises(ArchiveError, match="exported for one input size.*dynamic_shapes"):
        build(archive_args(name="static", weights=str(tmp_path / "static.pt2"),
                           labels=str(ASSETS / "fixed_labels.json"), **common))
    with pytest.raises(ArchiveError, match="torchscript program: its layers cannot be re-exported to onnxruntime"):
        build(archive_args(name="scripted_ort", weights=str(tmp_path / "demo_scripted.pt"), labels=str(DEMO_LABELS),
                           runtime="onnxruntime", parity_data=str(test_split), **common))
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").glob("*.mar"))


@pytest.mark.integration
def test_scripted_and_exported_detectors_serve_the_eager_answers(program_store, tmp_path):
    """Served side by side: the scripted SSDlite answers like its eager archive, the exported fixed
    detector like the fixed detector's known boxes."""
    ts = make_server(tmp_path / "home", program_store)
    with ts.running(240, expect=["ssd_scripted", "ssd_eager", "exported"]):
        def detections(model: str, data: bytes) -> list[dict]:
            r = requests.post(f"{ts.inference_url}/predictions/{model}", data=data, timeout=60,
                              headers={"Content-Type": "image/jpeg", "X-Response-Format": "detailed",
                                       "X-Threshold": "0.0", **ts.auth("inference")})
            assert r.status_code == 200, r.text
            return r.json()["detections"]

        for seed, size in ((1, None), (2, (640, 480)), (3, (301, 457))):
            data = encode(synth_image(seed, size))
            a, b = detections("ssd_scripted", data), detections("ssd_eager", data)
            assert len(a) == len(b) > 10, (len(a), len(b))
            for x, y in zip(a[:50], b[:50]):
                assert x["label"] == y["label"] and abs(x["score"] - y["score"]) <= 1e-4, (x, y)
                assert max(abs(p - q) for p, q in zip(x["box"], y["box"])) <= 0.01, (x, y)
        img = synth_image(4, (400, 300))
        boxes = [d["box"] for d in detections("exported", encode(img))]
        assert boxes[:2] == [[0.0, 0.0, 200.0, 150.0], [100.0, 75.0, 399.0, 299.0]], boxes


# -------------------------------------------------------------- a stock-handler archive, life cycle


def stock_archive(out_dir: Path, name: str, version: str, work: Path) -> Path:
    """`torch-model-archiver ... --handler object_detector`, as TorchServe's example builds it."""
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "serve_demo" / "core" / "models.py", work / "shapes_layers.py")
    shutil.copy2(DEMO_LABELS, work / "index_to_name.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    archiver = shutil.which("torch-model-archiver") or str(Path(sys.executable).parent / "torch-model-archiver")
    subprocess.run([archiver, "--model-name", name, "--version", version, "--model-file", str(STOCK_MODEL),
                    "--serialized-file", str(DEMO_WEIGHTS), "--handler", "object_detector",
                    "--extra-files", f"{work / 'index_to_name.json'},{work / 'shapes_layers.py'}",
                    "--export-path", str(out_dir), "--force"],
                   check=True, capture_output=True, env={**os.environ, "TMPDIR": str(work)}, cwd=work)
    return out_dir / f"{name}.mar"


@pytest.mark.integration
def test_a_stock_handler_archive_is_served_and_taken_into_the_version_life_cycle(tmp_path, test_split, capsys,
                                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)  # reports/ goes here
    store = tmp_path / "store"
    stock_archive(store, "pets", "1.0", tmp_path / "w1")  # pets.mar: the archiver's own file name
    ts = make_server(tmp_path / "home", store)
    conn = ["--management-url", ts.management_url, "--model-store", str(store), "--home", str(ts.home)]

    def run(*argv: str) -> tuple[int, str]:
        rc = cli.main(list(argv))
        cap = capsys.readouterr()
        return rc, cap.out + cap.err

    start_from_registry(ts, timeout=180)  # what `make serve` does
    try:
        r = requests.post(f"{ts.inference_url}/predictions/pets", data=encode(synth_image(3)),
                          headers={"Content-Type": "image/jpeg", **ts.auth("inference")}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body and all(set(d) - {"score"} <= {"ellipse", "rectangle", "triangle", "star", "cross"}
                            for d in body), body  # the stock format: {label: box, score}
        # a second build of the same model, under the name a user gives it
        shutil.move(stock_archive(tmp_path / "v2", "pets", "2.0", tmp_path / "w2"), store / "pets-v2-stock.mar")
        rc, out = run("register", "--model", "pets", "--version", "2.0", *conn)
        assert rc == 0 and "registered pets 2.0 from pets-v2-stock.mar" in out, out
        rc, out = run("promote", "--model", "pets", "--version", "2.0", "--url", ts.inference_url,
                      "--dataset", str(test_split), "--limit", "20", *conn)
        assert rc == 0 and "PROMOTED" in out, out  # evaluated through the endpoint, stock answers
        maps = [line for line in out.splitlines() if line.startswith("mAP ")]
        print(f"\nstock-handler gate: {maps}")
        assert float(maps[0].split()[1]) > 0.3  # the demo weights behind the stock handler: real detections
        mgmt = Management(ts.management_url, home=ts.home)
        assert mgmt.default_version("pets") == "2.0"
        rc, out = run("versions", "--model", "pets", *conn)
        assert rc == 0 and "pets.mar" in out and "pets-v2-stock.mar" in out and "object_detector handler" in out, out
        assert run("rollback", "--model", "pets", *conn)[0] == 0
        assert mgmt.default_version("pets") == "1.0"
        ts.stop()
        start_from_registry(ts, timeout=180)  # a restart comes back with both, default 1.0
        assert mgmt.default_version("pets") == "1.0"
        assert {str(v["modelVersion"]) for v in mgmt.versions("pets")} == {"1.0", "2.0"}
    finally:
        ts.stop()


# ------------------------------------------------------------------ the entry point, on the host


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["--start", "--foreground"])
def test_the_entry_point_runs_a_users_torchserve_and_stops_it_on_sigterm(tmp_path, model_store, mode):
    """`IMAGE torchserve --start|--foreground ...` as the entry point runs it (here with a temporary home
    instead of /home/model-server): up while TorchServe runs, healthy by the named models, and SIGTERM
    stops that TorchServe (only that one) and exits 0."""
    import signal

    from serve_demo.serve.process import free_ports

    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    p = free_ports(5)
    (home / "config.properties").write_text(
        f"inference_address=http://127.0.0.1:{p[0]}\nmanagement_address=http://127.0.0.1:{p[1]}\n"
        f"metrics_address=http://127.0.0.1:{p[2]}\ngrpc_inference_port={p[3]}\ngrpc_management_port={p[4]}\n"
        f"disable_token_authorization=true\nvmargs=-Djava.io.tmpdir={tmp}\n")
    env = {**os.environ, "SERVE_DEMO_IMAGE_HOME": str(home), "TMPDIR": str(tmp),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}  # as in the image
    proc = subprocess.Popen([sys.executable, "-m", "serve_demo.serve.entrypoint", "torchserve", mode, "--ncs",
                             "--model-store", str(model_store), "--models", "fixed=fixed-1.0.mar"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    health = [sys.executable, str(ROOT / "docker" / "healthcheck.py")]
    henv = {"HEALTHCHECK_HOME": str(home / "run"), "PATH": "/usr/bin:/bin"}
    try:
        deadline = time.monotonic() + 150
        while subprocess.run(health, env=henv, capture_output=True).returncode != 0:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "not healthy in 150 s"
            time.sleep(1)
        r = requests.post(f"http://127.0.0.1:{p[0]}/predictions/fixed", data=encode(synth_image(1)), timeout=60)
        assert r.status_code == 200, r.text
        time.sleep(1)
        assert proc.poll() is None  # `--start` returned long ago: the entry point stays up
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(40) == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{p[0]}/ping", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run([str(Path(sys.executable).parent / "torchserve"), "--stop"], env=env, capture_output=True)
