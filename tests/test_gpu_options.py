"""The handler's GPU options (``gpu_decode``, ``channels_last``, ``pin_memory``, ``fp16``) on the
CPU: which JPEGs nvjpeg would take, that the CPU path is untouched, that channels_last gives the
same detections, that the archive writes the options. The CUDA checks run where CUDA exists;
``scripts/verify_gpu.py`` is the full check for a person with a GPU."""

from __future__ import annotations

import io

import pytest
import torch
import yaml
from PIL import Image

from serve_demo.archive.builder import build
from serve_demo.core.config import HandlerConfig
from serve_demo.core.imaging import RequestError, decode_image, decode_image_on, jpeg_for_gpu
from serve_demo.core.loader import load_detector
from serve_demo.core.pipeline import parse_request, run_detector, upload
from serve_demo.core.worker import Worker

from .conftest import DEMO_LABELS, DEMO_WEIGHTS, archive_args, encode, synth_image

pytestmark = pytest.mark.integration  # this file's layer (conftest.py: every test declares one)

CPU = torch.device("cpu")


def rotated_jpeg() -> bytes:
    img = synth_image(3, (64, 48))
    exif = img.getexif()
    exif[0x0112] = 6
    return encode(img, "JPEG", exif=exif)


@pytest.mark.parametrize("data, expected", [
    (lambda: encode(synth_image(1, (64, 48)), "JPEG"), True),
    (lambda: encode(synth_image(1, (64, 48)).convert("L"), "JPEG"), True),
    (lambda: encode(synth_image(1, (64, 48)).convert("CMYK"), "JPEG"), False),
    (lambda: encode(synth_image(1, (64, 48)), "JPEG", progressive=True), False),
    (rotated_jpeg, False),
    (lambda: encode(synth_image(1, (64, 48)), "PNG"), False),
    (lambda: b"\xff\xd8\xff\xe0 not really a jpeg", False),
    (lambda: b"", False),
])
def test_which_uploads_nvjpeg_would_decode(data, expected):
    assert jpeg_for_gpu(data()) is expected


def test_pixel_limit_keeps_big_jpegs_on_the_checked_cpu_path():
    data = encode(synth_image(1, (64, 48)), "JPEG")
    assert jpeg_for_gpu(data, max_pixels=64 * 48) and not jpeg_for_gpu(data, max_pixels=64 * 48 - 1)
    with pytest.raises(RequestError) as err:
        decode_image_on(data, CPU, max_pixels=100, gpu_decode=True)
    assert err.value.code == 413


def test_gpu_decode_on_a_cpu_worker_is_the_cpu_decoder():
    data = encode(synth_image(2), "JPEG")
    assert torch.equal(decode_image_on(data, CPU, gpu_decode=True), decode_image(data))
    cfg = HandlerConfig(gpu_decode=True, pin_memory=True, channels_last=True, fp16=True)
    req = parse_request({"body": data}, {}, cfg, CPU)
    assert req.image.device.type == "cpu" and torch.equal(req.image, decode_image(data))
    with pytest.raises(RequestError):
        parse_request({"body": b"garbage"}, {}, cfg, CPU)


def test_pin_memory_is_a_no_op_off_cuda():
    image = torch.zeros(3, 4, 5, dtype=torch.uint8)
    assert upload(image, CPU, pin_memory=True) is image


def test_channels_last_gives_the_same_detections_on_cpu():
    cfg = HandlerConfig(arch="fcos_tiny")
    labels = 6
    plain = load_detector(DEMO_WEIGHTS.parent, DEMO_WEIGHTS.name, None, cfg, labels, CPU)
    nhwc = load_detector(DEMO_WEIGHTS.parent, DEMO_WEIGHTS.name, None, HandlerConfig(arch="fcos_tiny",
                         channels_last=True), labels, CPU)
    conv = next(m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = [decode_image(encode(synth_image(s), "PNG")) for s in range(4)]
    for a, b in zip(run_detector(plain, images, CPU), run_detector(nhwc, images, CPU, fp16=True, pin_memory=True)):
        keep = a["scores"] > 0.3
        assert torch.equal(a["labels"][keep], b["labels"][keep])
        assert torch.allclose(a["boxes"][keep], b["boxes"][keep], atol=0.05)


def test_archive_writes_gpu_options_and_the_model_still_loads(tmp_path):
    mar = build(archive_args(name="gpu_opts", weights=str(DEMO_WEIGHTS), labels=str(DEMO_LABELS), arch="fcos_tiny",
                             fp16=True, gpu_decode=True, channels_last=True, pin_memory=True,
                             export_path=str(tmp_path / "store"), build_dir=str(tmp_path / "build")))
    config = yaml.safe_load((tmp_path / "build" / "gpu_opts" / "model-config.yaml").read_text())
    assert {k: config["handler"][k] for k in ("fp16", "gpu_decode", "channels_last", "pin_memory")} == \
        {"fp16": True, "gpu_decode": True, "channels_last": True, "pin_memory": True}
    model = Worker.from_archive(mar)
    assert model.cfg.gpu_decode and model.cfg.channels_last
    buf = io.BytesIO()
    synth_image(5).save(buf, format="JPEG")
    assert model.predict(buf.getvalue(), threshold=0.0)["detections"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (scripts/verify_gpu.py is the full check)")
def test_nvjpeg_decode_matches_pillow_within_a_level():
    cuda = torch.device("cuda:0")
    data = encode(synth_image(4), "JPEG", quality=90)
    gpu = decode_image_on(data, cuda, gpu_decode=True)
    assert gpu.device.type == "cuda" and gpu.shape == decode_image(data).shape
    assert (gpu.cpu().float() - decode_image(data).float()).abs().mean() < 2.0
    pinned = upload(decode_image(data), cuda, pin_memory=True)
    assert torch.equal(pinned.cpu(), decode_image(data))


def test_decoded_image_is_rgb_uint8_from_any_jpeg_mode():
    grey = encode(Image.new("L", (9, 7), 100), "JPEG")
    t = decode_image_on(grey, CPU, gpu_decode=True)
    assert t.shape == (3, 7, 9) and t.dtype == torch.uint8
