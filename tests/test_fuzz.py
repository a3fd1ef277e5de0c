"""Property-based fuzzing (hypothesis) of the decode/validate path the handler runs per request.

Whatever bytes and headers arrive, the path either returns a valid RGB image / request or raises
``RequestError`` with a 4xx code: never another exception (which would become a 5xx).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_demo.core.config import HandlerConfig, parse_threshold
from serve_demo.core.imaging import RequestError, decode_image
from serve_demo.core.pipeline import parse_request
from tests.conftest import encode, synth_image

pytestmark = pytest.mark.unit  # this file's layer (conftest.py: every test declares one)

SEEDS = {fmt: encode(synth_image(50, (96, 72)), fmt) for fmt in ("JPEG", "PNG", "GIF", "BMP", "WEBP")}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_decode(data: bytes) -> None:
    try:
        img = decode_image(data, max_pixels=4_000_000)
    except RequestError as exc:
        assert exc.code in (400, 413, 415) and exc.kind and exc.message
        return
    assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3 and min(img.shape[1:]) >= 1


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data):
    check_decode(data)


@FUZZ
@given(st.sampled_from(sorted(SEEDS)), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                min_size=1, max_size=8), st.floats(0.05, 1.0))
def test_mutated_images(fmt, flips, keep):
    """Valid images with bytes overwritten and the tail cut: headers, chunk sizes, dimensions."""
    data = bytearray(SEEDS[fmt])
    for pos, value in flips:
        data[pos % len(data)] = value
    check_decode(bytes(data[: max(1, int(len(data) * keep))]))


@FUZZ
@given(st.text(max_size=20))
def test_threshold_text(raw):
    try:
        value = parse_threshold(raw)
    except RequestError as exc:
        assert exc.code == 400
        return
    assert 0.0 <= value <= 1.0 and not math.isnan(value)


@FUZZ
@given(st.dictionaries(st.sampled_from(["X-Threshold", "x-response-format", "X-RESPONSE-FORMAT", "Other"]),
                       st.text(max_size=12), max_size=3),
       st.dictionaries(st.sampled_from(["body", "data", "threshold", "response_format", "junk"]),
                       st.one_of(st.binary(max_size=64), st.text(max_size=32), st.none(),
                                 st.dictionaries(st.text(max_size=4), st.text(max_size=8), max_size=2)),
                       max_size=4))
def test_request_rows(headers, row):
    """Any row shape TorchServe could hand over (bytes, text, JSON dicts, missing keys)."""
    try:
        req = parse_request(row, headers, HandlerConfig())
    except RequestError as exc:
        assert 400 <= exc.code < 500
        return
    assert req.image.shape[0] == 3 and 0 <= req.threshold <= 1 and req.response_format in ("stock", "detailed")
