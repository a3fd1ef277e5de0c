"""Detection metrics through a real TorchServe and a real Prometheus; alerts by promtool; drift on
shifted and unshifted traffic; opt-in capture and `make collect`; the KServe server's metrics."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from serve_demo import cli
from serve_demo.archive.builder import build
from serve_demo.core import observe
from serve_demo.core.capture import CaptureConfig, Capturer, uncertainty
from serve_demo.data.synth import SynthConfig, generate_split
from serve_demo.evaluate.evaluator import evaluate
from serve_demo.monitor import dashboard, drift
from serve_demo.monitor.prometheus import LocalPrometheus
from serve_demo.serve.process import free_ports, wait_until
from tests.conftest import ASSETS, DEMO_LABELS, DEMO_WEIGHTS, ROOT, archive_args, encode, make_server, synth_image

PROM_DIR = ROOT / "docker" / "prometheus"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


# ------------------------------------------------------------------------------------------- pure units


@pytest.mark.unit
def test_samples_of_a_batch():
    stats = observe.BatchStats(requests=3, refused=["not_an_image"], decode_s=0.01, model_s=0.02, encode_s=0.003)
    stats.images = [observe.ImageStats(640, 480, 0.42, ["star", "cross"], [0.91, 0.55]),
                    observe.ImageStats(100, 100, 0.05, [], [])]
    got: dict[tuple, float] = {}
    for name, dims, value in observe.samples(stats):
        got[(name, dims)] = got.get((name, dims), 0) + value
    assert got[("BatchSize", ())] == 3 and got[("RequestsRefused", ("not_an_image",))] == 1
    assert got[("DetectionsPerClass", ("star",))] == 1 and got[("DetectionsPerClass", ("cross",))] == 1
    assert got[("DetectionScoreBand", ("0.9-1.0",))] == 1 and got[("DetectionScoreBand", ("0.5-0.6",))] == 1
    assert got[("ImageBrightnessBand", ("0.4-0.5",))] == 1 and got[("ImageBrightnessBand", ("0.0-0.1",))] == 1
    assert got[("DetectionsPerImage", ())] == 2  # 2 + 0 observations
    assert got[("ImageMegapixels", ())] == pytest.approx(0.3072 + 0.01)
    assert got[("StageSeconds", ("model",))] == 0.02 and got[("HandlerSeconds", ())] == pytest.approx(0.033)
    assert observe.band(1.0) == "0.9-1.0" and observe.band(0.0) == "0.0-0.1"
    assert observe.bucket_index(0) == 0 and observe.bucket_index(3) == 11 and observe.bucket_index(11) == 14


@pytest.mark.unit
def test_every_metric_is_declared_for_torchserve():
    declared = yaml.safe_load((ROOT / "docker" / "metrics.yaml").read_text())["model_metrics"]
    for spec in observe.METRICS:
        (entry,) = [m for m in declared[spec.kind] if m["name"] == spec.name]
        assert entry["unit"] == spec.unit and tuple(entry["dimensions"]) == spec.dims, spec.name


@pytest.mark.unit
def test_a_failing_sink_never_raises(caplog):
    def broken(*_):
        raise RuntimeError("metrics backend down")

    observe.emit(observe.BatchStats(requests=1), "m", "1.0", broken)
    assert "metrics not emitted" in caplog.text


@pytest.mark.unit
def test_psi_and_levels():
    same = {"a": 50.0, "b": 50.0}
    assert drift.psi(same, {"a": 500.0, "b": 500.0}) == pytest.approx(0.0)
    assert drift.psi(same, {"a": 90.0, "b": 10.0}) == pytest.approx(0.4 * np.log(0.9 / 0.5) - 0.4 * np.log(0.1 / 0.5))
    assert drift.level_of(0.05) == "stable" and drift.level_of(0.2) == "shift" and drift.level_of(0.3) == "drift"
    counts = drift.baseline_counts([(640, 480, 0.5), (320, 240, 0.15)], [[("star", 0.9), ("cross", 0.3)], []],
                                   0.5, ["star", "cross"])
    assert counts["class"] == {"star": 1.0, "cross": 0.0} and counts["score"]["0.9-1.0"] == 1
    assert counts["detections"]["<=0.005"] == 1 and counts["detections"]["0.75-1"] == 1
    assert sum(counts["size"].values()) == 2 and counts["brightness"]["0.5-0.6"] == 1
    with pytest.raises(Exception, match="duration"):
        drift.parse_duration("ten minutes")
    assert drift.parse_duration("2h") == 7200


@pytest.mark.unit
def test_capture_config_and_uncertainty():
    assert CaptureConfig.from_yaml(None).enabled is False
    with pytest.raises(ValueError, match="unknown keys"):
        CaptureConfig.from_yaml({"enabled": True, "share": 0.1})
    with pytest.raises(ValueError, match="low < high"):
        CaptureConfig.from_yaml({"low": 0.8, "high": 0.2})
    assert uncertainty([0.95, 0.9], 0.5, 0.3, 0.7) is None  # sure
    assert uncertainty([0.95, 0.5], 0.5, 0.3, 0.7) == 1.0  # a score on the threshold
    assert uncertainty([0.1], 0.5, 0.3, 0.7) == 0.5  # nothing found


@pytest.mark.unit
def test_capture_drops_instead_of_blocking_when_the_writer_lags(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("SERVE_DEMO_CAPTURE_DIR", str(tmp_path))
    gate = threading.Event()

    class Stalled(Capturer):
        def _write_loop(self) -> None:
            gate.wait()
            super()._write_loop()

    cap = Stalled(CaptureConfig(enabled=True, rate=1.0, queue=2), "m", "1.0", {0: "__background__", 1: "a"})
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    out = {"boxes": torch.tensor([[1.0, 2.0, 10.0, 20.0]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.5])}
    outcomes: list[str | None] = []
    offering = threading.Thread(target=lambda: outcomes.extend(cap.offer(image, out, 0.5) for _ in range(5)))
    offering.start()
    offering.join(30)  # the writer stays stalled until gate.set(): an offer that waited on it never returns
    assert not offering.is_alive(), "offer() waited for the stalled writer"
    assert outcomes == ["saved", "saved", "queue_full", "queue_full", "queue_full"]
    gate.set()
    cap.flush()
    lines = [json.loads(x) for x in (cap.root / f"predictions-{os.getpid()}.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["detections"][0] == {"category_id": 1, "label": "a",
                                                            "bbox": [1.0, 2.0, 9.0, 18.0], "score": 0.5}
    assert len(list((cap.root / "images").glob("*.jpg"))) == 2


@pytest.mark.unit
def test_grafana_dashboard_is_current():
    committed = json.loads(dashboard.GRAFANA_JSON.read_text() if dashboard.GRAFANA_JSON.is_absolute()
                           else (ROOT / dashboard.GRAFANA_JSON).read_text())
    assert committed == dashboard.grafana_json(), "run `python -m serve_demo dashboard --grafana`"
    titles = [p["title"] for p in committed["panels"]]
    for wanted in ("Throughput", "Latency", "Errors by type", "Detections per class", "Score distribution",
                   "Time per stage"):
        assert any(t.startswith(wanted) for t in titles), wanted


@pytest.mark.unit
def test_compose_provisions_prometheus_and_grafana():
    services = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]
    assert {"serve-demo", "prometheus", "grafana"} <= set(services)
    prom = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == ["serve-demo:8082"]
    mounts = " ".join(services["grafana"]["volumes"])
    assert "provisioning" in mounts and "dashboards" in mounts
    for p in (ROOT / "docker" / "grafana" / "provisioning").rglob("*.yml"):
        yaml.safe_load(p.read_text())


# ------------------------------------------------------------------------------------------- promtool


@pytest.mark.unit
def test_promtool_checks_config_rules_and_alert_unit_tests():
    assert PROMTOOL, "promtool is missing: `make prometheus-tools` (make test installs it as root)"
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                 ["test", "rules", "alerts_test.yml"]):
        proc = subprocess.run([PROMTOOL, *args], cwd=PROM_DIR, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------- real server + Prometheus


class PrometheusServer(LocalPrometheus):
    """``make prometheus``'s Prometheus (the shipped config) on a free port, scraping every second."""

    def __init__(self, home: Path, target: str) -> None:
        assert PROMETHEUS, "prometheus is missing: `make prometheus-tools` (make test installs it as root)"
        super().__init__(home, target, free_ports(1)[0], "1s")
        self.start()

    def value(self, expr: str, at: float | None = None) -> float | None:
        params = {"query": expr, **({"time": at} if at else {})}
        result = requests.get(f"{self.url}/api/v1/query", params=params, timeout=10).json()["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, expected: float, timeout: float = 60) -> float:
        """``expr``'s value once it reaches ``expected`` (TimeoutError naming the last value)."""
        def reached() -> float | None:
            value = self.value(expr)
            return value if value is not None and abs(value - expected) < 1e-6 else None

        return wait_until(reached, timeout, what=f"{expr} == {expected}", interval=0.5)


@pytest.fixture(scope="module")
def mon(tmp_path_factory, fixed_weights):
    """A TorchServe (shapes, fixed, and fixedcap with capture on) scraped by a real Prometheus."""
    store = tmp_path_factory.mktemp("mon-store")
    build_dir = tmp_path_factory.mktemp("mon-build")
    common = dict(export_path=str(store), build_dir=str(build_dir))
    build(archive_args(name="shapes", weights=str(DEMO_WEIGHTS), labels=str(DEMO_LABELS), arch="fcos_tiny", **common))
    for name, rate in (("fixed", 0.0), ("fixedcap", 1.0)):
        build(archive_args(name=name, weights=str(fixed_weights), labels=str(ASSETS / "fixed_labels.json"),
                           model_file=str(ASSETS / "fixed_detector.py"), capture_rate=rate, **common))
    ts = make_server(tmp_path_factory.mktemp("mon-home"), store)
    with ts.running(180, expect=["shapes", "fixed", "fixedcap"]):
        prom = PrometheusServer(tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{ts.metrics_port}")
        try:
            yield ts, prom
        finally:
            prom.stop()


def post(ts, model: str, data: bytes, **headers) -> requests.Response:
    return requests.post(f"{ts.inference_url}/predictions/{model}", data=data, timeout=60,
                         headers={"Content-Type": "application/octet-stream", **ts.auth("inference"), **headers})


@pytest.mark.server
def test_detection_metrics_reach_prometheus_with_the_right_values(mon):
    ts, prom = mon
    sizes = [(320, 240), (640, 480), (100, 80), (256, 256), (500, 300)]
    for i, size in enumerate(sizes):
        assert post(ts, "fixed", encode(synth_image(i, size))).status_code == 200
    for body in (b"not an image", b"", b"\x89PNG\r\n\x1a\n broken"):
        assert post(ts, "fixed", body).status_code in (400, 415)
    sel = 'ModelName="fixed",ModelVersion="1.0"'
    n = len(sizes)
    assert prom.wait_for(f'DetectionsPerClass{{{sel},Class="circle"}}', n) == n  # scores 0.9, 0.6 (0.3 < 0.5)
    assert prom.value(f'DetectionsPerClass{{{sel},Class="square"}}') == n
    assert prom.value(f'DetectionScoreBand{{{sel},Band="0.9-1.0"}}') == n
    assert prom.value(f'DetectionScoreBand{{{sel},Band="0.6-0.7"}}') == n
    assert prom.value(f'DetectionsPerImage_count{{{sel}}}') == n
    assert prom.value(f'DetectionsPerImage_sum{{{sel}}}') == 2 * n
    assert prom.value(f'ImageMegapixels_sum{{{sel}}}') == pytest.approx(sum(w * h for w, h in sizes) / 1e6)
    assert prom.value(f'DetectionScore_sum{{{sel}}}') == pytest.approx(1.5 * n)
    assert prom.value(f'sum(RequestsRefused{{{sel}}})') == 3
    assert prom.value(f'StageSeconds_count{{{sel},Stage="model"}}') == n
    assert prom.value(f'BatchSize_count{{{sel}}}') == n + 3 and prom.value(f'WorkerStarts{{{sel}}}') == 1
    # TorchServe's own request and latency metrics arrived beside them
    assert prom.value('ts_inference_requests_total{model_name="fixed"}') == n + 3
    assert prom.value('ts_inference_latency_microseconds{model_name="fixed"}') > 0
    assert prom.value('sum(Requests4XX)') >= 3
    # and curl :8082/metrics shows them directly
    text = requests.get(f"{ts.metrics_url}/metrics", timeout=10).text
    assert 'DetectionsPerClass{ModelName="fixed",ModelVersion="1.0",Class="circle"' in text
    # the alert rules are loaded and healthy
    groups = requests.get(f"{prom.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 5 and all(r["health"] == "ok" for r in rules), rules


@pytest.mark.server
def test_every_dashboard_query_runs_and_the_png_is_drawn(mon, tmp_path):
    ts, prom = mon
    for panel in dashboard.PANELS:
        for q in panel.queries:
            body = requests.get(f"{prom.url}/api/v1/query", params={"query": q.expr}, timeout=10).json()
            assert body["status"] == "success", (panel.title, q.expr, body)
    rates = wait_until(lambda: requests.get(f"{prom.url}/api/v1/query", timeout=10, params={  # two scrapes
        "query": "sum by (Class) (rate(DetectionsPerClass[1m]))"}).json()["data"]["result"], 60,
        what="a rate of DetectionsPerClass", interval=0.5)
    assert {r["metric"]["Class"] for r in rates} >= {"circle", "square"}
    png = dashboard.render(prom.url, tmp_path / "dashboard.png", minutes=2, step=2)
    assert png.stat().st_size > 20_000


def darker_smaller(data: bytes) -> bytes:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    im = im.resize((im.width // 2, im.height // 2))
    arr = (np.asarray(im, dtype=np.float32) * 0.35).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def send_all(ts, bodies: list[bytes]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda b: post(ts, "shapes", b).status_code, bodies))
    assert codes == [200] * len(bodies)


@pytest.mark.server
def test_drift_flags_shifted_traffic_and_passes_unshifted(mon, tmp_path):
    ts, prom = mon
    data = tmp_path / "data"
    cfg = SynthConfig()
    generate_split(data, "test", 150, seed=11, cfg=cfg, progress=False)  # the evaluation split
    generate_split(data, "valid", 150, seed=12, cfg=cfg, progress=False)  # live, like it
    generate_split(data, "train", 400, seed=13, cfg=cfg, progress=False)  # live, shifted
    report = tmp_path / "eval"
    evaluate(data, "test", offline=ts.model_store / "shapes-1.0.mar", out=report, samples=0)
    baseline = report / drift.BASELINE_FILE
    assert json.loads(baseline.read_text())["images"] == 150

    def counted() -> float:
        return prom.value('DetectionsPerImage_count{ModelName="shapes",ModelVersion="1.0"}') or 0.0

    def window(bodies: list[bytes]) -> tuple[float, float]:
        before = counted()
        start = time.time()
        wait_until(lambda: (prom.value("max(timestamp(up))") or 0) > start, 30, what="a scrape after the "
                   "window's start")  # so the window's first sample precedes its first request
        send_all(ts, bodies)
        assert prom.wait_for('DetectionsPerImage_count{ModelName="shapes",ModelVersion="1.0"}',
                             before + len(bodies)) == before + len(bodies)
        return start, time.time()

    like = [p.read_bytes() for p in sorted((data / "valid").glob("*.jpg"))]
    start, end = window(like)
    code, drifts, path = drift.run(prom.url, "shapes", "1.0", baseline, start, end, tmp_path / "drift-a")
    levels = {d.feature: (d.psi, d.level) for d in drifts}
    print(f"\nunshifted: {levels}")
    assert code == 0 and all(level != "drift" for _, level in levels.values()), levels

    coco = json.loads((data / "train" / "_annotations.coco.json").read_text())
    star = next(c["id"] for c in coco["categories"] if c["name"] == "star")
    with_star = {a["image_id"] for a in coco["annotations"] if a["category_id"] == star}
    starless = [im["file_name"] for im in coco["images"] if im["id"] not in with_star][:120]
    shifted = [darker_smaller((data / "train" / f).read_bytes()) for f in starless]
    start, end = window(shifted)
    rc = cli.main(["drift", "--model", "shapes", "--version", "1.0", "--prometheus", prom.url, "--baseline",
                   str(baseline), "--end", f"{end:.3f}", "--window", f"{end - start:.0f}s", "--out",
                   str(tmp_path / "drift-b"), "--min-images", "100"])
    result = json.loads((tmp_path / "drift-b" / "drift.json").read_text())
    levels = {f["feature"]: (f["psi"], f["level"]) for f in result["features"]}
    print(f"shifted: {levels}")
    assert rc == 1
    assert levels["brightness"][1] == "drift" and levels["size"][1] == "drift"
    assert levels["class"][0] > drift.WARN  # stars gone from the mix
    assert (tmp_path / "drift-b" / "drift.png").stat().st_size > 10_000
    assert "| brightness |" in (tmp_path / "drift-b" / "report.md").read_text()
    # too little traffic is its own answer (exit 2), not a verdict
    assert cli.main(["drift", "--model", "shapes", "--prometheus", prom.url, "--baseline", str(baseline),
                     "--end", f"{start - 3600:.0f}", "--window", "10s", "--out", str(tmp_path / "drift-c")]) == 2


@pytest.mark.server
def test_capture_keeps_uncertain_images_and_collect_makes_a_dataset(mon, tmp_path):
    from serve_demo.data.coco import CocoDetection

    ts, prom = mon
    for i in range(6):
        assert post(ts, "fixedcap", encode(synth_image(i, (200 + 10 * i, 150)))).status_code == 200
    root = ts.home / "capture" / "fixedcap-1.0"

    def written() -> list[dict]:  # the writer thread appends a line after it wrote the image
        return [json.loads(x) for f in root.glob("predictions-*.jsonl") for x in f.read_text().splitlines()]

    wait_until(lambda: len(written()) >= 6, 60, what="6 captured predictions written", interval=0.2)
    assert len(list((root / "images").glob("*.jpg"))) == 6
    lines = written()
    assert len(lines) == 6 and {d["label"] for d in lines[0]["detections"]} == {"circle", "square", "7"}
    assert prom.wait_for('CaptureSaved{ModelName="fixedcap",ModelVersion="1.0"}', 6) == 6
    assert not (ts.home / "capture" / "fixed-1.0").exists()  # off unless the archive says so

    out = tmp_path / "collected"
    assert cli.main(["collect", "--capture", str(ts.home / "capture"), "--out", str(out)]) == 0
    labels = json.loads((ASSETS / "fixed_labels.json").read_text())
    train, valid = CocoDetection(out, "train", labels), CocoDetection(out, "valid", labels)
    assert len(train) + len(valid) == 6 and len(valid) >= 1
    image, target = train[0]
    assert image.shape[0] == 3 and len(target["boxes"]) >= 2  # circle and square (7 is not in the label map)
    coco = json.loads((out / "train" / "_annotations.coco.json").read_text())
    assert all(a["pre_annotation"] for a in coco["annotations"])
    assert cli.main(["collect", "--capture", str(ts.home / "capture"), "--out", str(out)]) == 2  # not empty


@pytest.mark.server
def test_kserve_server_exposes_the_same_metric_names(kserve):
    r = requests.post(f"{kserve.inference_url}/predictions/fixed", data=encode(synth_image(1)),
                      headers={"Content-Type": "image/jpeg", **kserve.auth("inference")}, timeout=60)
    assert r.status_code == 200
    text = requests.get(f"{kserve.url}/metrics", timeout=10).text
    for name in ("DetectionsPerClass{", "DetectionScoreBand{", "DetectionsPerImage_bucket{", "StageSeconds_count{",
                 "WorkerStarts{"):
        assert name in text, name
    assert 'ModelName="fixed"' in text and 'Class="circle"' in text
