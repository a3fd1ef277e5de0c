"""Pure logic: decoding, request options, schema, label maps, data generator, metrics."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from serve_demo.core import schema
from serve_demo.core.config import HandlerConfig, parse_threshold
from serve_demo.core.imaging import RequestError, decode_image
from serve_demo.core.models import build_model, load_weights
from serve_demo.core.pipeline import parse_request
from serve_demo.data.coco import CocoDetection, label_map_from_coco
from serve_demo.data.cocometrics import coco_bbox_metrics, f_beta_curve, image_errors, matches_at_iou, pr_curves
from serve_demo.data.synth import SynthConfig, generate_split
from tests.conftest import encode

pytestmark = pytest.mark.unit  # this file's layer (conftest.py: every test declares one)


def rgb(w: int = 40, h: int = 30) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    return Image.fromarray(arr)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "WEBP", "GIF"])
def test_decode_formats(fmt):
    t = decode_image(encode(rgb(), fmt))
    assert t.dtype == torch.uint8 and t.shape == (3, 30, 40)


def test_decode_modes_to_rgb():
    grey = decode_image(encode(Image.new("L", (8, 6), 100), "PNG"))
    assert grey.shape == (3, 6, 8) and int(grey[:, 0, 0].sum()) == 300
    rgba = Image.new("RGBA", (8, 6), (0, 0, 0, 0))
    assert decode_image(encode(rgba, "PNG"))[:, 0, 0].tolist() == [255, 255, 255]  # over white
    cmyk = decode_image(encode(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "JPEG"))
    assert cmyk[0, 3, 3] > 200 and cmyk[1, 3, 3] < 60
    deep = Image.fromarray(np.full((6, 8), 65535, np.uint16))
    assert decode_image(encode(deep, "PNG"))[:, 0, 0].tolist() == [255, 255, 255]


def test_decode_exif_orientation():
    img = rgb(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    t = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert t.shape == (3, 40, 30)


def test_decode_gif_first_frame():
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buf.getvalue())[:, 5, 5].tolist()[0] > 200


@pytest.mark.parametrize("data,code,kind", [
    (b"", 400, "empty_body"),
    (b"hello world, not an image", 415, "not_an_image"),
])
def test_decode_refuses(data, code, kind):
    with pytest.raises(RequestError) as e:
        decode_image(data)
    assert (e.value.code, e.value.kind) == (code, kind)


def test_decode_truncated_and_bomb():
    full = encode(rgb(200, 200), "PNG")
    with pytest.raises(RequestError) as e:
        decode_image(full[: len(full) // 2])
    assert e.value.code == 400
    bomb = encode(Image.new("L", (8000, 8000)), "PNG")
    with pytest.raises(RequestError) as e:
        decode_image(bomb, max_pixels=10_000_000)
    assert e.value.code == 413 and "8000x8000" in e.value.message


@pytest.mark.parametrize("value", ["abc", "-1", "2", "nan", "inf", "", "0.5.1"])
def test_threshold_invalid(value):
    with pytest.raises(RequestError) as e:
        parse_threshold(value)
    assert e.value.code == 400 and "between 0 and 1" in e.value.message


def test_request_options_any_case_and_fields():
    body = encode(rgb(), "PNG")
    cfg = HandlerConfig()
    assert parse_request({"body": body}, {"x-THRESHOLD": "0.25"}, cfg).threshold == 0.25
    req = parse_request({"data": body, "threshold": bytearray(b"0.1"), "response_format": b"detailed"}, {}, cfg)
    assert (req.threshold, req.response_format) == (0.1, "detailed")
    with pytest.raises(RequestError) as e:
        parse_request({"body": body}, {"X-Response-Format": "xml"}, cfg)
    assert e.value.kind == "invalid_response_format"
    with pytest.raises(RequestError) as e:
        parse_request({"other": body}, {}, cfg)
    assert e.value.kind == "missing_image" and "other" in e.value.message


def test_handler_config_validation():
    assert HandlerConfig.from_yaml({"threshold": 0.3}).threshold == 0.3
    with pytest.raises(ValueError, match="unknown keys"):
        HandlerConfig.from_yaml({"treshold": 0.3})
    with pytest.raises(ValueError):
        HandlerConfig.from_yaml({"response_format": "xml"})


def test_schema_formats_roundtrip():
    dets = schema.make_detections([[1, 2, 3, 4], [5, 6, 7, 8]], [0.9, 0.2], [1, 9], {1: "cat"})
    assert [d.label for d in dets] == ["cat", "9"]
    stock = schema.stock_payload(dets)
    assert stock[0] == {"cat": [1.0, 2.0, 3.0, 4.0], "score": 0.9}
    detailed = schema.detailed_payload(dets, (10, 10), "m", "1.0")
    schema.validate_detailed(detailed)
    assert schema.parse_detections(detailed) == dets
    assert schema.parse_detections(stock, {"cat": 1})[0] == dets[0]


def test_label_map_skips_unused_supercategory():
    coco = {"categories": [{"id": 0, "name": "creatures"}, {"id": 1, "name": "fish"}, {"id": 2, "name": "shark"}],
            "annotations": [{"category_id": 1}, {"category_id": 2}]}
    assert label_map_from_coco(coco) == {"0": "__background__", "1": "fish", "2": "shark"}


def test_synth_is_deterministic_and_loads(tmp_path):
    cfg = SynthConfig()
    a = generate_split(tmp_path / "a", "valid", 4, seed=3, cfg=cfg, progress=False)
    b = generate_split(tmp_path / "b", "valid", 4, seed=3, cfg=cfg, progress=False)
    assert a.read_text() == b.read_text()
    assert (a.parent / "valid_00003.jpg").read_bytes() == (b.parent / "valid_00003.jpg").read_bytes()
    coco = json.loads(a.read_text())
    sizes = {(im["width"], im["height"]) for im in coco["images"]}
    assert len(sizes) > 1
    ds = CocoDetection(tmp_path / "a", "valid", label_map_from_coco(coco))
    image, target = ds[0]
    assert image.shape[0] == 3 and target["boxes"].shape[1] == 4
    assert (target["boxes"][:, 2:] > target["boxes"][:, :2]).all()


def test_metrics_perfect_and_f2():
    gt = {"images": [{"id": 1, "width": 100, "height": 100}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30]},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20]}]}
    perfect = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9},
               {"image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20], "score": 0.8}]
    assert coco_bbox_metrics(gt, perfect)["mAP"] == pytest.approx(1.0)
    half = perfect[:1] + [{"image_id": 1, "category_id": 1, "bbox": [0, 80, 10, 10], "score": 0.7}]
    scores, tps, n = matches_at_iou(gt, half)
    _, f2, p, r = f_beta_curve(scores, tps, n, thresholds=np.array([0.5]))
    assert (p[0], r[0]) == (0.5, 0.5) and f2[0] == pytest.approx(0.5)


def test_image_errors_and_pr_curves():
    gt = {"images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30]},
                          {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 20, 20]},
                          {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 5, 40, 40]}]}
    rows = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9},  # found
            {"image_id": 1, "category_id": 1, "bbox": [60, 0, 30, 30], "score": 0.8},  # false positive
            {"image_id": 1, "category_id": 2, "bbox": [50, 50, 20, 20], "score": 0.3},  # found, below 0.5
            {"image_id": 2, "category_id": 1, "bbox": [5, 5, 40, 41], "score": 0.7}]  # found
    assert image_errors(gt, rows, threshold=0.5) == {1: (1, 1), 2: (0, 0)}
    assert image_errors(gt, rows, threshold=0.2) == {1: (1, 0), 2: (0, 0)}
    curves = pr_curves(gt, rows)
    recall, precision = curves[1]
    assert recall[-1] == pytest.approx(1.0) and precision[0] == pytest.approx(1.0)
    assert precision[-1] == pytest.approx(2 / 3)  # the false positive outscores the 2nd object of class 1


def test_load_weights_names_mismatch():
    small = build_model("fcos_tiny", 3)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_weights(small, build_model("fcos_tiny", 6).state_dict())
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("yolo", 3)


def test_coming_from_torchserve_table_names_real_tests():
    """Every row of docs/coming-from-torchserve.md names a test that exists (so each row is exercised)."""
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    table = (root / "docs" / "coming-from-torchserve.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "Tested by" not in line
            and not line.startswith("|---")]
    assert len(rows) >= 12
    for row in rows:
        (ref,) = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", row.rsplit("|", 2)[-2]) or [(None, None)]
        assert ref[0], f"row names no test: {row[:80]}"
        names = {n.name for n in ast.walk(ast.parse((root / ref[0]).read_text())) if isinstance(n, ast.FunctionDef)}
        assert ref[1] in names, f"{ref[0]} has no {ref[1]}"


def test_make_rebuilds_an_archive_when_the_values_that_built_it_change(tmp_path):
    """The Makefile's archive depends on its arguments (a stamp), not only on files: the same words
    leave it alone, a new THRESHOLD rebuilds it."""
    import os
    import subprocess

    from tests.conftest import DEMO_LABELS, DEMO_WEIGHTS, ROOT

    name = f"stamptest{os.getpid()}"
    mar = tmp_path / f"{name}-1.0.mar"
    stamp = ROOT / "build" / "archive-args" / f"{name}-1.0.args"

    def make(threshold: str, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "--no-print-directory", *flags, str(mar), f"NAME={name}",
                               f"MODEL_STORE={tmp_path}", f"WEIGHTS={DEMO_WEIGHTS}", f"LABELS={DEMO_LABELS}",
                               "RUNTIME=eager", f"THRESHOLD={threshold}"], cwd=ROOT, capture_output=True, text=True)

    try:
        assert make("0.5", "-q").returncode != 0  # no archive yet; the stamp is written
        assert "--threshold 0.5" in stamp.read_text()
        old = DEMO_WEIGHTS.stat().st_mtime
        os.utime(stamp, (old, old))  # as if archived long ago, then the archive built
        mar.write_bytes(b"built")
        assert make("0.5", "-q").returncode == 0, "the same values rebuild it"
        assert make("0.3", "-q").returncode == 1, "a new threshold leaves the 0.5 archive in place"
        assert "--threshold 0.3" in stamp.read_text()
        assert "--threshold 0.3" in make("0.3", "-n").stdout
    finally:
        stamp.unlink(missing_ok=True)
