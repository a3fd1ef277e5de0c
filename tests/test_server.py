"""Against a real TorchServe (shipped config, free loopback ports, archives from the archiver)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from serve_demo.archive.builder import build
from serve_demo.core import schema
from serve_demo.core.models import build_model
from serve_demo.core.worker import Worker
from tests.conftest import ASSETS, ROOT, archive_args, encode, post, synth_image, worker_log, workers

pytestmark = pytest.mark.server


@pytest.fixture(scope="session")
def pets_mar(tmp_path_factory):
    """The seed's Oxford Pets shape: a 3-class fasterrcnn_resnet50_fpn state_dict + model file."""
    tmp = tmp_path_factory.mktemp("pets")
    torch.manual_seed(0)
    torch.save(build_model("fasterrcnn_resnet50_fpn", 3).state_dict(), tmp / "pets.pt")
    return build(archive_args(name="pets", weights=str(tmp / "pets.pt"), labels=str(ASSETS / "pets_labels.json"),
                              model_file=str(ASSETS / "pets_model.py"), export_path=str(tmp / "store"),
                              build_dir=str(tmp / "build")))


def curl_auth(ts) -> list[str]:
    """curl's -H for the inference key (what a user copies from `make serve`)."""
    return [a for k, v in ts.auth("inference").items() for a in ("-H", f"{k}: {v}")]


def test_stock_format_with_curl(server, tmp_path):
    path = tmp_path / "scene.jpg"
    synth_image(11).save(path)
    headers, body = tmp_path / "headers.txt", tmp_path / "body.json"
    subprocess.run(["curl", "-s", "-D", str(headers), "-o", str(body), "-X", "POST",
                    f"{server.inference_url}/predictions/shapes", "-T", str(path), *curl_auth(server)],
                   check=True, timeout=60)
    head = headers.read_text().lower()
    assert "http/1.1 200" in head and "content-type: application/json" in head, head
    dets = json.loads(body.read_text())
    assert dets and all(len(d) == 2 and d["score"] >= 0.5 for d in dets)
    names = set(json.loads((ROOT / "index_to_name" / "shapes.json").read_text()).values())
    assert {next(k for k in d if k != "score") for d in dets} <= names


def test_detailed_format_and_header_threshold(target):
    img = synth_image(12, (300, 220))
    r = post(target, "shapes", encode(img), {"x-response-format": "detailed", "X-THRESHOLD": "0.2"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    payload = r.json()
    schema.validate_detailed(payload)
    assert payload["image_size"] == [300, 220] and payload["model"] == "shapes"
    assert all(d["score"] >= 0.2 for d in payload["detections"])
    low = post(target, "shapes", encode(img), {"X-Response-Format": "detailed", "X-Threshold": "0.05"}).json()
    assert len(low["detections"]) >= len(payload["detections"])


def test_multipart_threshold_field(target):
    data = encode(synth_image(13), "PNG")
    r = requests.post(f"{target.inference_url}/predictions/shapes", files={"data": ("a.png", data, "image/png")},
                      data={"threshold": "0.9"}, headers=target.auth("inference"), timeout=60)
    assert r.status_code == 200
    assert all(d["score"] >= 0.9 for d in r.json())
    low = requests.post(f"{target.inference_url}/predictions/shapes", files={"data": ("a.png", data, "image/png")},
                        data={"threshold": "0"}, headers=target.auth("inference"), timeout=60)
    assert low.status_code == 200
    assert any(d["score"] < 0.9 for d in low.json()), low.json()  # the field, not the default, decided
    assert len(r.json()) < len(low.json())


def test_batch_of_four_sizes_with_one_bad(target):
    bodies = [encode(synth_image(20 + i, size)) for i, size in
              enumerate([(320, 240), (240, 320), (181, 97), (400, 400)])]
    bodies[2] = b"\xff\xd8\xff\xe0 truncated jpeg"
    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda b: post(target, "shapes_b4", b, {"X-Response-Format": "detailed"}), bodies))
    assert [r.status_code for r in rs[:2] + rs[3:]] == [200, 200, 200] and rs[2].status_code in (400, 415)
    assert [rs[i].json()["image_size"] for i in (0, 1, 3)] == [[320, 240], [240, 320], [400, 400]]
    assert rs[2].json()["type"] in ("not_an_image", "corrupt_image")
    assert "batch of 4 requests (1 refused)" in worker_log(target)


BAD = [
    ("empty body", b"", {}, 400),
    ("text", b"just some text", {}, 415),
    ("garbage", bytes(range(256)) * 4, {}, 415),
    ("truncated png", None, {}, 400),
    ("threshold abc", "ok", {"X-Threshold": "abc"}, 400),
    ("threshold -1", "ok", {"X-Threshold": "-1"}, 400),
    ("threshold 2", "ok", {"X-Threshold": "2"}, 400),
    ("threshold nan", "ok", {"X-Threshold": "nan"}, 400),
    ("unknown format", "ok", {"X-Response-Format": "xml"}, 400),
    ("decompression bomb", "bomb", {}, 413),
]


@pytest.mark.parametrize("name,data,headers,code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_4xx_and_worker_survives(target, name, data, headers, code):
    before = [w["pid"] for w in workers(target, "shapes")]
    if data is None:
        full = encode(synth_image(30), "PNG")
        data = full[: len(full) // 3]
    elif data == "ok":
        data = encode(synth_image(31))
    elif data == "bomb":
        data = encode(Image.new("L", (9000, 9000)), "PNG", optimize=True)
    r = post(target, "shapes", data, headers)
    assert r.status_code == code, r.text
    body = r.json()
    assert body["code"] == code and body["message"] and body["type"]
    assert [w["pid"] for w in workers(target, "shapes")] == before
    assert all(w["status"] == "READY" for w in workers(target, "shapes"))
    assert post(target, "shapes", encode(synth_image(32))).status_code == 200


def test_unknown_label_id_reported_by_number(target):
    r = post(target, "fixed", encode(synth_image(33, (100, 80))), {"X-Threshold": "0.1"})
    assert r.status_code == 200
    assert r.json() == [{"circle": [0.0, 0.0, 50.0, 40.0], "score": 0.9},
                        {"square": [25.0, 20.0, 99.0, 79.0], "score": 0.6},
                        {"7": [1.0, 2.0, 3.0, 4.0], "score": 0.3}]


def test_served_equals_in_process(target, model_store):
    local = Worker.from_archive(model_store / "shapes-1.0.mar")
    for seed in (40, 41, 42):
        data = encode(synth_image(seed))
        served = post(target, "shapes", data, {"X-Response-Format": "detailed", "X-Threshold": "0"}).json()
        mine = local.predict(data, threshold=0.0)
        assert len(served["detections"]) == len(mine["detections"]) > 0
        for a, b in zip(served["detections"], mine["detections"]):
            assert a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-4
            assert np.allclose(a["box"], b["box"], atol=1e-3)


def test_client_cli_draws(server, tmp_path):
    img = tmp_path / "scene.jpg"
    synth_image(50).save(img)
    out = tmp_path / "drawn.png"
    proc = subprocess.run([sys.executable, "-m", "serve_demo", "predict", str(img), "--model", "shapes",
                           "--url", server.inference_url, "--draw", str(out), "--home", str(server.home)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)  # --draw asks for the detailed format (masks, keypoints)
    schema.validate_detailed(answer)
    assert answer["detections"]
    assert Image.open(out).size == Image.open(img).size


def test_demo_model_evaluated_served_and_offline(server, model_store, test_split, tmp_path):
    """`serve_demo evaluate` on the committed demo model (first 60 synthetic test images), through
    the endpoint and in-process from its archive: same mAP, complete report folders."""
    from serve_demo.evaluate.evaluator import evaluate, sha256
    from serve_demo.serve.management import Management

    mar = model_store / "shapes-1.0.mar"
    served = evaluate(test_split, "test", model="shapes", url=server.inference_url,
                      management=Management(server.management_url, home=server.home), store=model_store,
                      concurrency=2, token=server.key("inference"),
                      out=tmp_path / "served")
    offline = evaluate(test_split, "test", offline=mar, out=tmp_path / "offline")
    m, o = served["metrics"]["coco"], offline["metrics"]["coco"]
    print(f"demo model on 60 test images: served mAP {m['mAP']:.4f} (mAP@0.5 {m['mAP_50']:.4f}), "
          f"offline mAP {o['mAP']:.4f}")
    assert m["mAP_50"] >= 0.9 and m["mAP"] >= 0.65
    assert abs(o["mAP"] - m["mAP"]) < 1e-4
    for result, folder in ((served, tmp_path / "served"), (offline, tmp_path / "offline")):
        assert result["failures"] == {} and result["images"] == 60
        assert (result["model"], result["version"]) == ("shapes", "1.0")
        assert result["archive_sha256"] == sha256(mar)
        assert 0 < result["metrics"]["f2"]["f2"] <= result["metrics"]["f2"]["best_f2"] <= 1
        saved = json.loads((folder / "metrics.json").read_text())
        assert saved["metrics"]["coco"]["mAP"] == result["metrics"]["coco"]["mAP"]
        for png in ("pr_curves.png", "f2_threshold.png"):
            assert Image.open(folder / png).size[0] > 500
        samples = sorted((folder / "samples").glob("*.png"))
        assert len(samples) == 6
        report = (folder / "report.md").read_text()
        assert "| mAP |" in report and "![F2 vs threshold](f2_threshold.png)" in report
        assert all(f"samples/{p.name}" in report for p in samples)
    assert served["dataset_sha256"] == offline["dataset_sha256"]


def test_oxford_pets_resnet50_model_file_answers_curl(server, pets_mar, tmp_path):
    """The seed's way: model.py + a 3-class fasterrcnn_resnet50_fpn state_dict, served by a second
    instance from its own store, loaded at start-up."""
    from serve_demo.serve.process import free_ports
    from serve_demo.serve.torchserve import TorchServe

    store = Path(pets_mar).parent
    p = free_ports(5)
    ts = TorchServe(home=tmp_path / "home", model_store=store, inference_port=p[0], management_port=p[1],
                    metrics_port=p[2], grpc_inference_port=p[3], grpc_management_port=p[4],
                    base_config=ROOT / "docker" / "config.properties")
    ts.start()
    try:
        ts.wait_ready(timeout=180, expect=["pets"])
        path = tmp_path / "pet.jpg"
        synth_image(60).save(path)
        t0 = time.time()
        out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "-X", "POST",
                              f"{ts.inference_url}/predictions/pets", "-T", str(path), "-H", "X-Threshold: 0",
                              *curl_auth(ts)],
                             capture_output=True, text=True, check=True).stdout
        body, code = out.rsplit("\n", 1)
        assert code == "200", body
        dets = json.loads(body)
        assert isinstance(dets, list) and dets, body  # threshold 0: every detection the model keeps
        assert {next(k for k in d if k != "score") for d in dets} <= {"cat", "dog"}
        assert all(len(next(v for k, v in d.items() if k != "score")) == 4 for d in dets)
        print(f"pets resnet50: {len(dets)} detections in {time.time() - t0:.1f} s")
    finally:
        ts.stop()


def test_metrics_endpoint_serves_prometheus_text(server):
    """The shipped config's metrics_mode=prometheus: :8082/metrics (what Kubernetes scrapes) has
    the request latency and the handler's own HandlerTime after a prediction."""
    assert post(server, "shapes", encode(synth_image(11))).status_code == 200
    text = requests.get(f"{server.metrics_url}/metrics", timeout=10).text
    assert "# TYPE ts_inference_latency_microseconds counter" in text
    assert 'ts_inference_requests_total{model_name="shapes"' in text
    assert any(line.startswith("HandlerTime{") and 'ModelName="shapes"' in line for line in text.splitlines())
