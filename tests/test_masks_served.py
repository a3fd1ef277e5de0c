"""The committed small Mask R-CNN (weights/shapes_masks.pt) served by each real server (TorchServe,
KServe): segm AP through the endpoint agrees with the in-process evaluation, masks are drawn."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from serve_demo.archive.builder import build
from serve_demo.core import masks, schema
from serve_demo.data.synth import SynthConfig, generate_split
from serve_demo.evaluate.evaluator import evaluate
from serve_demo.serve.kserve_local import KServeServer
from serve_demo.serve.management import Management
from serve_demo.serve.torchserve import TorchServe

from .conftest import ROOT, archive_args, make_server, post

pytestmark = pytest.mark.server  # this file's layer (conftest.py: every test declares one)

WEIGHTS = ROOT / "weights" / "shapes_masks.pt"
LABELS = ROOT / "index_to_name" / "shapes_masks.json"
IMAGES = 40


@pytest.fixture(scope="module")
def mask_split(tmp_path_factory):
    """The first images of the synthetic mask test split (seed 0: the committed model's test data)."""
    root = tmp_path_factory.mktemp("mask-data")
    generate_split(root, "test", IMAGES, seed=0, cfg=SynthConfig(), progress=False, masks=True)
    return root


@pytest.fixture(scope="module")
def mask_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mask-store")
    store = root / "store"
    build(archive_args(name="shapes_masks", weights=str(WEIGHTS), labels=str(LABELS), arch="maskrcnn_tiny",
                       export_path=str(store), build_dir=str(root / "build")))
    return store


@pytest.fixture(scope="module", params=["torchserve", "kserve"])
def mask_server(request, tmp_path_factory, mask_store):
    home = tmp_path_factory.mktemp(f"mask-{request.param}")
    if request.param == "torchserve":
        running = make_server(home, mask_store).running(180, expect=["shapes_masks"])
    else:
        running = KServeServer.on_free_ports(home, mask_store, ["shapes_masks-1.0.mar"]).running(180)
    with running as server:
        yield server, mask_store


def test_segm_ap_served_equals_offline(mask_server, mask_split, tmp_path):
    ts, store = mask_server
    mgmt = Management(ts.management_url, home=ts.home) if isinstance(ts, TorchServe) else None
    served = evaluate(mask_split, "test", model="shapes_masks", url=ts.inference_url, management=mgmt,
                      store=store, out=tmp_path / "served", samples=2, token=ts.key("inference"))
    offline = evaluate(mask_split, "test", offline=store / "shapes_masks-1.0.mar", out=tmp_path / "offline",
                       samples=0)
    assert not served["failures"]
    for kind in ("coco", "coco_segm"):
        for k in ("mAP", "mAP_50", "mAP_75"):
            assert served["metrics"][kind][k] == pytest.approx(offline["metrics"][kind][k], abs=1e-4), (kind, k)
    assert served["metrics"]["coco_segm"]["mAP_50"] >= 0.7  # a trained model, not noise
    report = (tmp_path / "served" / "report.md").read_text()
    assert "COCO segm (instance masks) metrics" in report and "segm AP" in report
    assert all("segm_AP" in v for v in served["metrics"]["per_class"].values())


def test_mask_answers_decode_and_client_draws_them(mask_server, mask_split, tmp_path):
    ts, _ = mask_server
    image = mask_split / "test" / "test_00000.jpg"
    r = post(ts, "shapes_masks", image.read_bytes(), {"X-Response-Format": "detailed"})
    assert r.status_code == 200, r.text
    payload = r.json()
    schema.validate_detailed(payload)
    assert payload["detections"] and all("mask" in d for d in payload["detections"])
    gt = json.loads((mask_split / "test" / "_annotations.coco.json").read_text())
    truth = [masks.decode(a["segmentation"]) for a in gt["annotations"] if a["image_id"] == 1]
    # every confident mask overlaps one ground-truth mask well
    for d in payload["detections"]:
        m = masks.decode(d["mask"]).astype(bool)
        best = max((m & t.astype(bool)).sum() / max(1, (m | t.astype(bool)).sum()) for t in truth)
        assert best > 0.5, d["label"]
    out = tmp_path / "drawn.png"
    proc = subprocess.run([sys.executable, "-m", "serve_demo", "predict", str(image), "--model", "shapes_masks",
                           "--url", ts.inference_url, "--draw", str(out), "--home", str(ts.home)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    drawn, plain = np.asarray(Image.open(out).convert("RGB")), np.asarray(Image.open(image).convert("RGB"))
    inside = masks.decode(payload["detections"][0]["mask"]).astype(bool)
    assert np.abs(drawn[inside].astype(int) - plain[inside]).mean() > 10  # the mask is painted over


def test_bad_mask_threshold_is_a_400_and_the_worker_stays(mask_server, mask_split):
    ts, _ = mask_server
    data = (mask_split / "test" / "test_00001.jpg").read_bytes()
    r = post(ts, "shapes_masks", data, {"X-Mask-Threshold": "high"})
    assert r.status_code == 400 and r.json()["type"] == "invalid_threshold"
    loose = post(ts, "shapes_masks", data, {"X-Response-Format": "detailed", "X-Mask-Threshold": "0.05"}).json()
    tight = post(ts, "shapes_masks", data, {"X-Response-Format": "detailed", "X-Mask-Threshold": "0.95"}).json()
    assert len(loose["detections"]) == len(tight["detections"]) > 0
    assert all(masks.area(a["mask"]) >= masks.area(b["mask"])
               for a, b in zip(loose["detections"], tight["detections"]))


def test_image_answer_paints_the_masks(mask_server, mask_split):
    """The drawn answer of a mask model (PNG) blends each mask in its label's colour."""
    import io

    from serve_demo.core.draw import color_for

    ts, _ = mask_server
    data = (mask_split / "test" / "test_00002.jpg").read_bytes()
    detailed = post(ts, "shapes_masks", data, {"X-Response-Format": "detailed"}).json()
    r = post(ts, "shapes_masks", data, {"X-Response-Format": "image", "Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    drawn = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(float)
    plain = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(float)
    d = detailed["detections"][0]
    inside = masks.decode(d["mask"]).astype(bool)
    c = np.array(color_for(d["label"]), float)
    # every masked pixel moved towards the label colour (alpha 0.45, other masks may overlap)
    assert np.abs(drawn[inside] - c).mean() < 0.75 * np.abs(plain[inside] - c).mean()
