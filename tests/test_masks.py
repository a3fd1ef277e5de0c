"""Masks and keypoints as pure logic: RLE against pycocotools, the response schema, metrics,
synthetic mask data, the PennFudanPed converter, drawing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as coco_mask

from serve_demo.core import masks, schema
from serve_demo.core.config import HandlerConfig
from serve_demo.core.draw import draw_detections
from serve_demo.core.imaging import RequestError
from serve_demo.core.pipeline import COCO_KEYPOINTS, Request, format_output, parse_request
from serve_demo.data.coco import CocoDetection, label_map_from_coco, load_coco, segmentation_to_mask
from serve_demo.data.cocometrics import coco_metrics, for_iou_type, iou_types, to_coco_detections
from serve_demo.data.convert import ConvertError, convert_pennfudan, split_names
from serve_demo.data.synth import SynthConfig, generate_split, render_image

from .conftest import encode

pytestmark = pytest.mark.unit  # this file's layer (conftest.py: every test declares one)


def reference(m: np.ndarray) -> str:
    return coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode()


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (5, 1), (7, 9), (64, 48), (240, 320)])
@pytest.mark.parametrize("density", [0.0, 0.02, 0.5, 0.98, 1.0])
def test_rle_matches_pycocotools_on_random_masks(shape, density):
    rng = np.random.default_rng(hash((shape, density)) % 2**32)
    for _ in range(4):
        m = rng.random(shape) < density
        rle = masks.encode(m)
        assert rle["size"] == list(shape)
        assert rle["counts"] == reference(m)
        assert np.array_equal(masks.decode(rle), m.astype(np.uint8))
        assert masks.area(rle) == int(m.sum())


def test_rle_matches_pycocotools_on_shapes_touching_edges_and_columns():
    m = np.zeros((50, 40), dtype=bool)
    m[:, 0] = True  # full first column: the mask starts with a run of ones
    m[:, 5:9] = True  # full columns: runs join across the column boundary
    m[45:, 20] = True
    m[:10, 21] = True  # a run ending at a column's bottom continues at the next one's top
    m[-1, -1] = True  # the last pixel: no trailing zeros
    assert masks.encode(m)["counts"] == reference(m)
    assert masks.run_lengths(m)[0] == 0


def test_counts_compress_and_decompress_round_trip_large_and_negative_deltas():
    runs = [0, 5, 100000, 3, 1, 70000, 2, 2, 123456789]
    s = masks.compress_counts(runs)
    assert masks.decompress_counts(s) == runs
    assert s == coco_mask.frPyObjects({"size": [1, sum(runs)], "counts": runs}, 1, sum(runs))["counts"].decode()


def test_decode_rejects_runs_that_do_not_cover_the_image():
    with pytest.raises(ValueError, match="cover"):
        masks.decode({"size": [4, 4], "counts": [3, 2]})


def test_encode_all_binarises_at_the_threshold_inclusive():
    probs = torch.zeros(2, 1, 6, 8)
    probs[0, 0, 1:3, 2:5] = 0.5
    probs[1, 0, 4:, :2] = 0.49
    rles = masks.encode_all(probs, 0.5)
    assert masks.area(rles[0]) == 6 and masks.area(rles[1]) == 0
    assert masks.area(masks.encode_all(probs, 0.4)[1]) == 4


def fake_output(n: int = 3, h: int = 30, w: int = 40, keypoints: int = 0) -> dict[str, torch.Tensor]:
    out = {"boxes": torch.tensor([[2.0, 3.0, 20.0, 25.0]] * n), "labels": torch.ones(n, dtype=torch.int64),
           "scores": torch.tensor([0.9, 0.5, 0.1, 0.05][:n])}
    probs = torch.zeros(n, 1, h, w)
    for i in range(n):
        probs[i, 0, 3:25, 2 + i:20] = 0.8
    out["masks"] = probs
    if keypoints:
        kp = torch.zeros(n, keypoints, 3)
        kp[..., 0], kp[..., 1], kp[..., 2] = 10.0, 12.0, 1.0
        kp[0, 0, 0] = w + 7.5  # outside: clamped into the image
        out["keypoints"] = kp
        out["keypoints_scores"] = torch.full((n, keypoints), 3.5)
        del out["masks"]
    return out


def test_detailed_answer_carries_rle_masks_of_kept_detections_only():
    img = torch.zeros(3, 30, 40, dtype=torch.uint8)
    payload = format_output(fake_output(), Request(img, 0.5, "detailed", 0.5), {1: "thing"}, "m", "1.0")
    schema.validate_detailed(payload)
    assert len(payload["detections"]) == 2  # scores 0.9, 0.5 kept; 0.1 dropped
    for i, d in enumerate(payload["detections"]):
        m = masks.decode(d["mask"])
        assert m.shape == (30, 40) and m.sum() == 22 * (18 - i)
    stock = format_output(fake_output(), Request(img, 0.5, "stock", 0.5), {1: "thing"}, "m", "1.0")
    assert stock == [{"thing": d["box"], "score": d["score"]} for d in payload["detections"]]


def test_mask_threshold_per_request():
    img = torch.zeros(3, 30, 40, dtype=torch.uint8)
    payload = format_output(fake_output(), Request(img, 0.0, "detailed", 0.9), {1: "thing"}, "m", "1.0")
    assert all(masks.area(d["mask"]) == 0 for d in payload["detections"])
    cfg = HandlerConfig()
    req = parse_request({"body": encode(Image.new("RGB", (8, 8)), "PNG")}, {"x-mask-threshold": b"0.7"}, cfg)
    assert req.mask_threshold == 0.7
    with pytest.raises(RequestError) as err:
        parse_request({"body": b"x"}, {"X-Mask-Threshold": "2"}, cfg)
    assert err.value.code == 400 and "X-Mask-Threshold" in err.value.message
    with pytest.raises(ValueError, match="mask_threshold"):
        HandlerConfig.from_yaml({"mask_threshold": 1.5})


def test_keypoints_named_clamped_and_validated():
    img = torch.zeros(3, 30, 40, dtype=torch.uint8)
    out = fake_output(2, keypoints=17)
    payload = format_output(out, Request(img, 0.0, "detailed"), {1: "person"}, "m", "1.0")
    schema.validate_detailed(payload)
    assert payload["keypoint_names"] == list(COCO_KEYPOINTS)
    first = payload["detections"][0]["keypoints"]
    assert first[0] == [40.0, 12.0, 3.5] and first[1] == [10.0, 12.0, 3.5]
    named = format_output(fake_output(1, keypoints=3), Request(img, 0.0, "detailed"), {1: "star"}, "m", "1.0",
                          ["tip", "left", "right"])
    assert named["keypoint_names"] == ["tip", "left", "right"]
    unnamed = format_output(fake_output(1, keypoints=3), Request(img, 0.0, "detailed"), {1: "star"}, "m", "1.0")
    assert unnamed["keypoint_names"] == ["kp_0", "kp_1", "kp_2"]
    with pytest.raises(ValueError, match="2 names"):
        format_output(fake_output(1, keypoints=3), Request(img, 0.0, "detailed"), {1: "s"}, "m", "1.0", ["a", "b"])


@pytest.mark.parametrize("breakage, match", [
    (lambda d, p: d.update(mask={"size": [5, 5], "counts": "01"}), "mask must be RLE"),
    (lambda d, p: d.update(mask={"size": [30, 40], "counts": "0"}), "cover"),
    (lambda d, p: d.update(keypoints=[[1, 1, 1]]), "keypoint_names"),
    (lambda d, p: (d.update(keypoints=[[99, 1, 1]]), p.update(keypoint_names=["a"])), "outside"),
])
def test_schema_rejects_broken_masks_and_keypoints(breakage, match):
    img = torch.zeros(3, 30, 40, dtype=torch.uint8)
    payload = format_output(fake_output(1), Request(img, 0.0, "detailed"), {1: "thing"}, "m", "1.0")
    breakage(payload["detections"][0], payload)
    with pytest.raises(ValueError, match=match):
        schema.validate_detailed(payload)


def test_parse_detections_reads_masks_and_keypoints_back():
    img = torch.zeros(3, 30, 40, dtype=torch.uint8)
    payload = json.loads(schema.dumps(format_output(fake_output(2), Request(img, 0.0, "detailed"),
                                                    {1: "thing"}, "m", "1.0")))
    dets = schema.parse_detections(payload)
    assert all(d.mask is not None and d.keypoints is None for d in dets)


def _mask_gt() -> dict:
    m1 = np.zeros((40, 50), dtype=bool)
    m1[5:20, 5:30] = True
    m2 = np.zeros((40, 50), dtype=bool)
    m2[25:38, 30:48] = True
    anns = []
    for i, m in enumerate((m1, m2)):
        ys, xs = np.nonzero(m)
        anns.append({"id": i + 1, "image_id": 1, "category_id": 1, "segmentation": masks.encode(m),
                     "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1],
                     "area": int(m.sum()), "iscrowd": 0})
    gt = {"images": [{"id": 1, "width": 50, "height": 40, "file_name": "a.png"}], "annotations": anns,
          "categories": [{"id": 1, "name": "thing"}]}
    return gt


def test_segm_metrics_perfect_and_mask_errors_lower_segm_only():
    gt = _mask_gt()
    assert iou_types(gt) == ["bbox", "segm"]
    rows = [{"image_id": 1, "category_id": 1, "score": 0.9, "bbox": a["bbox"], "segmentation": a["segmentation"]}
            for a in gt["annotations"]]
    assert coco_metrics(gt, rows, "segm")["mAP"] == pytest.approx(1.0)
    # right boxes, masks that cover a third of the object: bbox stays perfect, segm drops
    wrong = []
    for r in rows:
        m = masks.decode(r["segmentation"]).astype(bool)
        ys, xs = np.nonzero(m)
        m[:, xs.min() + (np.ptp(xs) + 1) // 3:] = False
        wrong.append({**r, "segmentation": masks.encode(m)})
    assert coco_metrics(gt, wrong, "bbox")["mAP"] == pytest.approx(1.0)
    assert coco_metrics(gt, wrong, "segm")["mAP_50"] == 0.0
    assert all("bbox" not in r for r in for_iou_type(rows, "segm"))
    assert all("segmentation" not in r for r in for_iou_type(rows, "bbox"))


def test_keypoint_metrics_perfect():
    kps = [10, 10, 2, 20, 12, 2, 15, 30, 2]
    gt = {"images": [{"id": 1, "width": 50, "height": 40, "file_name": "a.png"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 8, 14, 24], "area": 300,
                           "iscrowd": 0, "keypoints": kps, "num_keypoints": 3}],
          "categories": [{"id": 1, "name": "star", "keypoints": ["a", "b", "c"], "skeleton": []}]}
    rows = to_coco_detections(1, [[8, 8, 22, 32]], [0.9], [1], {1: 1},
                              keypoints=[[[10, 10, 1], [20, 12, 1], [15, 30, 1]]])
    assert iou_types(gt) == ["bbox", "keypoints"]
    assert coco_metrics(gt, rows, "keypoints")["mAP"] == pytest.approx(1.0)


def test_synthetic_masks_same_image_disjoint_visible_and_consistent():
    cfg = SynthConfig()
    for seed in range(4):
        plain, objs = render_image(np.random.default_rng(seed), cfg)
        image, with_masks = render_image(np.random.default_rng(seed), cfg, masks=True)
        assert np.array_equal(np.asarray(plain), np.asarray(image))
        assert [o["box"] for o in objs] == [o["box"] for o in with_masks]
        stack = np.stack([o["mask"] for o in with_masks])
        assert stack.sum(0).max() <= 1  # later objects cut out of earlier ones
        for o in with_masks:
            ys, xs = np.nonzero(o["mask"])
            x1, y1, x2, y2 = o["box"]
            assert xs.min() >= int(x1) - 1 and xs.max() <= x2 + 1 and ys.min() >= int(y1) - 1 and ys.max() <= y2 + 1


def test_mask_split_loads_masks_that_match_annotations(tmp_path):
    generate_split(tmp_path, "train", 6, seed=3, cfg=SynthConfig(), progress=False, masks=True)
    coco = load_coco(tmp_path, "train")
    assert all(a["area"] == masks.area(a["segmentation"]) for a in coco["annotations"])
    ds = CocoDetection(tmp_path, "train", label_map_from_coco(coco), masks=True)
    for i in range(len(ds)):
        image, target = ds[i]
        assert target["masks"].shape == (len(target["boxes"]), *image.shape[-2:])
        for m, box in zip(target["masks"], target["boxes"]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box.int().tolist()
    flipped = CocoDetection(tmp_path, "train", label_map_from_coco(coco), hflip=True, masks=True)
    torch.manual_seed(1)
    for i in range(len(flipped)):
        image, target = flipped[i]
        for m, box in zip(target["masks"], target["boxes"]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert abs(float(xs.min()) - float(box[0])) <= 1 and abs(float(xs.max() + 1) - float(box[2])) <= 1


def test_segmentation_polygons_and_uncompressed_rle_decode():
    poly = segmentation_to_mask([[2, 2, 12, 2, 12, 8, 2, 8]], 10, 15)
    assert poly.shape == (10, 15) and 50 <= int(poly.sum()) <= 77
    m = np.zeros((6, 4), dtype=bool)
    m[1:3, 1:3] = True
    runs = masks.run_lengths(m).tolist()
    expected = torch.from_numpy(m).to(torch.uint8)
    assert torch.equal(segmentation_to_mask({"size": [6, 4], "counts": runs}, 6, 4), expected)
    assert torch.equal(segmentation_to_mask(masks.encode(m), 6, 4), expected)


def _pennfudan(root, n: int = 5):
    (root / "PNGImages").mkdir(parents=True)
    (root / "PedMasks").mkdir()
    truth = {}
    for i in range(n):
        name = f"FudanPed{i + 1:05d}"
        Image.new("RGB", (60, 40), (i * 20, 90, 120)).save(root / "PNGImages" / f"{name}.png")
        mask = Image.new("L", (60, 40))
        d = ImageDraw.Draw(mask)
        d.rectangle([2 + i, 3, 12 + i, 30], fill=1)
        d.rectangle([30, 5, 50, 35 - i], fill=2)
        mask.save(root / "PedMasks" / f"{name}_mask.png")
        truth[f"{name}.png"] = np.asarray(mask)
    return truth


def test_pennfudan_converter_writes_a_coco_mask_dataset(tmp_path):
    truth = _pennfudan(tmp_path / "PennFudanPed", 10)
    counts = convert_pennfudan(tmp_path / "PennFudanPed", tmp_path / "out", valid=0.2, test=0.2, progress=False)
    assert counts == {"train": 6, "valid": 2, "test": 2}
    for split in counts:
        coco = load_coco(tmp_path / "out", split)
        assert [c["name"] for c in coco["categories"]] == ["person"]
        ds = CocoDetection(tmp_path / "out", split, {"0": "__background__", "1": "person"}, masks=True)
        for i in range(len(ds)):
            _, target = ds[i]
            expected = truth[ds.images[i]["file_name"]]
            assert target["masks"].shape[0] == 2
            for k, m in enumerate(target["masks"]):
                assert np.array_equal(m.numpy(), (expected == k + 1).astype(np.uint8))
    assert split_names(10, 0.2, 0.2, 0) == split_names(10, 0.2, 0.2, 0)


def test_pennfudan_converter_names_what_is_missing(tmp_path):
    with pytest.raises(ConvertError, match="PedMasks"):
        (tmp_path / "PennFudanPed" / "PNGImages").mkdir(parents=True)
        convert_pennfudan(tmp_path / "PennFudanPed", tmp_path / "out", progress=False)
    truth = _pennfudan(tmp_path / "other", 2)
    (tmp_path / "other" / "PedMasks" / f"{sorted(truth)[0][:-4]}_mask.png").unlink()
    with pytest.raises(ConvertError, match="has no mask"):
        convert_pennfudan(tmp_path / "other", tmp_path / "out", progress=False)


def test_drawing_paints_masks_inside_only_and_keypoints():
    image = Image.new("RGB", (40, 30), (0, 0, 0))
    m = np.zeros((30, 40), dtype=bool)
    m[5:15, 5:20] = True
    det = schema.Detection("thing", 1, 0.9, (4, 4, 21, 16), masks.encode(m), [[30.0, 25.0, 1.0]])
    out = np.asarray(draw_detections(image, [det], caption=False))
    assert out[10, 10].sum() > 0  # inside the mask, away from the box outline
    assert out[20, 10].sum() == 0  # outside mask and box
    assert out[25, 30].sum() > 0  # the keypoint dot


def test_evaluator_scores_keypoints_and_masks_from_detailed_answers():
    """The served path's plumbing: detailed payloads -> COCO rows -> bbox + segm + keypoint AP."""
    from serve_demo.evaluate.evaluator import compute_metrics, to_rows

    gt = _mask_gt()
    kps = [[[10.0, 8.0, 2.0], [25.0, 15.0, 2.0]], [[35.0, 30.0, 2.0], [45.0, 36.0, 2.0]]]
    gt["categories"][0]["keypoints"] = ["head", "tail"]
    for a, k in zip(gt["annotations"], kps):
        a["keypoints"] = [v for p in k for v in p]
        a["num_keypoints"] = 2
    dets = [{"label": "thing", "label_id": 1, "score": 0.9,
             "box": [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]],
             "mask": a["segmentation"], "keypoints": [[x, y, 5.0] for x, y, _ in k]}
            for a, k in zip(gt["annotations"], kps)]
    payload = {"detections": dets, "image_size": [50, 40], "model": "m", "version": "1",
               "keypoint_names": ["head", "tail"]}
    schema.validate_detailed(payload)
    metrics = compute_metrics(gt, to_rows({1: payload}, gt), 0.5)
    assert metrics["coco"]["mAP"] == pytest.approx(1.0)
    assert metrics["coco_segm"]["mAP"] == pytest.approx(1.0)
    assert metrics["coco_keypoints"]["mAP"] == pytest.approx(1.0)
    assert metrics["per_class"]["thing"]["segm_AP"] == pytest.approx(1.0)
