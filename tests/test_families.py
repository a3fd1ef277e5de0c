"""Every supported architecture, randomly initialised, archived by name and served by a real
TorchServe: the detailed answer follows the schema, masks decode to the image size, keypoints
lie in the image, and the stock answer stays boxes only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from serve_demo.archive.builder import build
from serve_demo.core import masks, schema
from serve_demo.core.models import TORCHVISION_ARCHS, available_archs, build_model, task_of
from serve_demo.core.pipeline import COCO_KEYPOINTS
from serve_demo.serve.management import Management

from .conftest import archive_args, encode, make_server, post, synth_image

SMALL = {"min_size": 320, "max_size": 416}  # faster on CPU; a knob users have too
# random heads score ~0.01 on sigmoid-scored families: lower their score floor so answers have detections
KWARGS = {
    "fasterrcnn_resnet50_fpn": SMALL, "fasterrcnn_resnet50_fpn_v2": SMALL,
    "fasterrcnn_mobilenet_v3_large_fpn": SMALL, "fasterrcnn_mobilenet_v3_large_320_fpn": {},
    "retinanet_resnet50_fpn": {**SMALL, "score_thresh": 0.001},
    "retinanet_resnet50_fpn_v2": {**SMALL, "score_thresh": 0.001},
    "fcos_resnet50_fpn": {**SMALL, "score_thresh": 0.001},
    "ssd300_vgg16": {}, "ssdlite320_mobilenet_v3_large": {},
    "maskrcnn_resnet50_fpn": SMALL, "maskrcnn_resnet50_fpn_v2": SMALL,
    "keypointrcnn_resnet50_fpn": SMALL,
    "fcos_tiny": {"score_thresh": 0.001}, "maskrcnn_tiny": {},
}
LABELS = {"0": "__background__", "1": "cat", "2": "dog"}
PERSON = {"0": "__background__", "1": "person"}
FIRST = "maskrcnn_tiny"  # served from the start; the others are registered one by one


@pytest.mark.integration
def test_every_architecture_is_covered():
    assert set(KWARGS) == set(available_archs())
    assert len(TORCHVISION_ARCHS) == 12


def _archive(arch: str, root, store) -> str:
    labels = PERSON if task_of(arch) == "keypoints" else LABELS
    label_file = root / f"{arch}.json"
    label_file.write_text(json.dumps(labels))
    torch.manual_seed(0)
    weights = root / f"{arch}.pt"
    torch.save(build_model(arch, len(labels), **KWARGS[arch]).state_dict(), weights)
    name = arch.replace("-", "_")
    build(archive_args(name=name, weights=str(weights), labels=str(label_file), arch=arch,
                       model_kwargs=KWARGS[arch] or {},
                       export_path=str(store), build_dir=str(root / "build")))
    weights.unlink()  # the archive holds its own copy; keep the disk use to one model at a time
    return f"{name}-1.0.mar"


@pytest.fixture(scope="module")
def family_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    store = root / "store"
    _archive(FIRST, root, store)
    ts = make_server(root / "home", store)
    with ts.running(180, expect=[FIRST]):
        yield ts, root, store


@pytest.mark.server
@pytest.mark.parametrize("arch", list(KWARGS))
def test_family_archived_and_served(family_server, arch):
    ts, root, store = family_server
    mgmt = Management(ts.management_url, home=ts.home)
    if arch != FIRST:
        mar = _archive(arch, root, store)
        mgmt.register(mar)
    try:
        img = synth_image(7, (320, 240))
        r = post(ts, arch, encode(img), {"X-Response-Format": "detailed", "X-Threshold": "0"})
        assert r.status_code == 200, r.text
        payload = r.json()
        schema.validate_detailed(payload)
        assert payload["image_size"] == [320, 240]
        dets = payload["detections"]
        assert dets, f"{arch}: no detections at threshold 0"
        task = task_of(arch)
        if task == "masks":
            for d in dets:
                m = masks.decode(d["mask"])
                assert m.shape == (240, 320) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
        else:
            assert all("mask" not in d for d in dets)
        if task == "keypoints":
            assert payload["keypoint_names"] == list(COCO_KEYPOINTS)
            for d in dets:
                kps = np.asarray(d["keypoints"])
                assert kps.shape == (17, 3)
                assert (kps[:, 0] >= 0).all() and (kps[:, 0] <= 320).all()
                assert (kps[:, 1] >= 0).all() and (kps[:, 1] <= 240).all()
        else:
            assert "keypoint_names" not in payload and all("keypoints" not in d for d in dets)
        stock = post(ts, arch, encode(img), {"X-Threshold": "0"}).json()
        assert isinstance(stock, list) and len(stock) == len(dets)
        assert all(set(d) == {"score", d_label(d)} for d in stock)
    finally:
        if arch != FIRST:
            mgmt.unregister(arch, "1.0")
            (store / f"{arch}-1.0.mar").unlink(missing_ok=True)


def d_label(d: dict) -> str:
    return next(k for k in d if k != "score")
