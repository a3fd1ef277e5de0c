"""The drawn image answer (``X-Response-Format: image`` / ``Accept: image/png``): pure rendering, then
each real server, alone, in a batch beside JSON answers, and inside KServe envelopes."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image, ImageOps

from serve_demo.core.draw import color_for
from serve_demo.core.envelopes import Parsed
from serve_demo.core.imaging import RequestError
from serve_demo.core.pipeline import Request, accepted_image_type, format_output
from tests.conftest import encode, post, synth_image

NAMES = {0: "__background__", 1: "ellipse", 2: "rectangle"}


@pytest.mark.unit
@pytest.mark.parametrize("accept,expected", [
    ("image/png", "png"), ("image/jpeg", "jpeg"), ("image/png;q=0.9, application/json", "png"),
    ("application/json, image/png", None), ("*/*", None), ("", None), (None, None), ("text/html", None),
])
def test_accept_header(accept, expected):
    assert accepted_image_type(accept) == expected


def fixed_output() -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor([[20.0, 30.0, 90.0, 100.0], [120.0, 40.0, 180.0, 90.0]]),
            "scores": torch.tensor([0.9, 0.3]), "labels": torch.tensor([2, 1])}


def upload(w: int = 200, h: int = 150) -> torch.Tensor:
    arr = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@pytest.mark.unit
def test_png_drawn_where_the_boxes_are_and_nowhere_else():
    image = upload()
    answer = format_output(fixed_output(), Request(image, 0.5, "image", image_type="png"), NAMES, "m", "1")
    assert answer.content_type == "image/png"
    drawn = np.asarray(Image.open(io.BytesIO(answer.data)).convert("RGB"))
    original = image.permute(1, 2, 0).numpy()
    assert drawn.shape == original.shape
    left_edge = drawn[60:95, 20]  # below the caption, on the kept box's left side
    assert (left_edge == color_for("rectangle")).all(axis=1).mean() > 0.9
    assert (drawn[:, 110:] == original[:, 110:]).all()  # the 0.3 detection is under the threshold: not drawn
    assert (drawn[110:, :] == original[110:, :]).all()


@pytest.mark.unit
def test_jpeg_and_the_size_limit():
    image = upload()
    answer = format_output(fixed_output(), Request(image, 0.5, "image"), NAMES, "m", "1")
    assert answer.content_type == "image/jpeg" and Image.open(io.BytesIO(answer.data)).size == (200, 150)
    with pytest.raises(RequestError, match="over the 1000-byte response limit") as e:
        format_output(fixed_output(), Request(image, 0.5, "image", image_type="png"), NAMES, "m", "1",
                      max_image_bytes=1000)
    assert (e.value.code, e.value.kind) == (413, "image_answer_too_large")


@pytest.mark.unit
def test_envelopes_carry_base64_json():
    from serve_demo.core.envelopes import wrap

    image = format_output(fixed_output(), Request(upload(), 0.5, "image"), NAMES, "m", "1")
    v1 = wrap(Parsed("v1"), [image], "m", "1")
    assert v1["predictions"][0]["content_type"] == "image/jpeg"
    assert base64.b64decode(v1["predictions"][0]["data"]) == image.data
    assert wrap(Parsed("plain"), [image], "m", "1") is image


def rotated_jpeg() -> tuple[bytes, tuple[int, int]]:
    """A 320x240 JPEG whose EXIF says 'rotate 90': upright it is 240x320."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(synth_image(70, (320, 240)), "JPEG", exif=exif.tobytes()), (240, 320)


@pytest.mark.server
def test_image_answer_is_upright_and_drawn_on_the_boxes(target):
    data, upright = rotated_jpeg()
    r = post(target, "shapes", data, {"X-Response-Format": "image", "Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text[:200]
    drawn = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)
    detailed = post(target, "shapes", data, {"X-Response-Format": "detailed"}).json()
    assert drawn.shape[1::-1] == upright and tuple(detailed["image_size"]) == upright
    plain = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")).astype(int)
    tall = [d["box"] + [d["label"]] for d in detailed["detections"] if d["box"][3] - d["box"][1] >= 24]
    assert tall
    painted = 0
    for x1, y1, _, y2, label in tall:  # each box's left edge, below its caption, is in its label's colour
        edge = drawn[int(y1) + 14:int(y2) - 2, max(0, int(x1) - 1):int(x1) + 2]
        painted += (edge == np.array(color_for(label))).all(axis=2).any(axis=1).mean() > 0.6
    assert painted >= 0.8 * len(tall)  # (a crossing box may paint over another's edge)
    mask = np.ones(drawn.shape[:2], bool)  # away from every box and caption: the upload's own pixels
    for d in detailed["detections"]:
        x1, y1, x2, y2 = d["box"]
        mask[max(0, int(y1) - 30):int(y2) + 6, max(0, int(x1) - 6):int(x2) + 90] = False
    assert mask.sum() > 1000 and (drawn[mask] == plain[mask]).all()
    jpeg = post(target, "shapes", data, {"X-Response-Format": "image"})
    assert jpeg.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(jpeg.content)).size == upright


@pytest.mark.server
def test_accept_png_and_batch_beside_json(target):
    bodies = [encode(synth_image(71 + i, size)) for i, size in enumerate([(320, 240), (240, 320), (200, 150)])]
    asks = [({"Accept": "image/png"}, bodies[0]), ({"X-Response-Format": "detailed"}, bodies[1]),
            ({"X-Response-Format": "image"}, b"not an image"), ({"X-Response-Format": "image"}, bodies[2])]
    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda a: post(target, "shapes_b4", a[1], a[0]), asks))
    assert [r.status_code for r in rs] == [200, 200, 415, 200]
    assert [r.headers["content-type"].split(";")[0] for r in rs] == [
        "image/png", "application/json", "application/json", "image/jpeg"]
    assert Image.open(io.BytesIO(rs[0].content)).size == (320, 240)
    assert rs[1].json()["image_size"] == [240, 320] and rs[2].json()["type"] == "not_an_image"
    assert Image.open(io.BytesIO(rs[3].content)).size == (200, 150)


@pytest.mark.server
def test_image_answer_inside_a_kserve_v1_envelope(target):
    body = {"instances": [{"data": base64.b64encode(encode(synth_image(75, (320, 240)))).decode()}]}
    r = requests.post(f"{target.inference_url}/v1/models/shapes:predict", json=body, timeout=60,
                      headers={**target.auth("inference"), "X-Response-Format": "image"})
    assert r.status_code == 200, r.text[:300]
    (pred,) = r.json()["predictions"]
    assert pred["content_type"] == "image/jpeg"
    assert Image.open(io.BytesIO(base64.b64decode(pred["data"]))).size == (320, 240)
