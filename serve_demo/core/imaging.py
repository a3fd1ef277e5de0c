"""Decode uploaded bytes into an upright RGB tensor, refusing bad input with a clear error.

Handles JPEG, PNG, BMP, WebP and GIF (first frame), applies EXIF orientation, and converts
greyscale, palette, RGBA (over white), CMYK and 16-bit images to 8-bit RGB. The pixel limit is
checked from the header, before any pixel is decoded (decompression bombs cost nothing).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from . import defaults

FORMATS = {"JPEG", "PNG", "BMP", "WEBP", "GIF", "MPO"}
DEFAULT_MAX_PIXELS = defaults.MAX_IMAGE_PIXELS


class RequestError(ValueError):
    """A client error: HTTP ``code``, a short machine ``kind`` and a message naming the fix."""

    def __init__(self, code: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.kind = kind
        self.message = message


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float32)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if im.mode == "F":
            top = 1.0 if arr.max() <= 1.0 else 255.0
        grey = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def decode_image(data: bytes | bytearray, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode ``data`` to a ``uint8`` tensor ``3 x H x W`` (RGB, upright).

    Raises:
        RequestError: empty body (400), not an image or an unsupported format (415),
            more than ``max_pixels`` pixels (413), truncated or corrupt data (400).
    """
    if not data:
        raise RequestError(400, "empty_body",
                           "the request carried no image: send one with `curl -T image.jpg` "
                           "or as a multipart field named `data`")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise RequestError(413, "image_too_large", f"image refused: {exc}") from None
    except Exception:  # noqa: BLE001 - whatever a decoder plugin raises on hostile bytes is the input's fault
        raise RequestError(415, "not_an_image",
                           f"the body ({len(data)} bytes, starting {bytes(data[:8])!r}) is not an image "
                           "this server decodes: send JPEG, PNG, BMP, WebP or GIF") from None
    with im:
        if im.format not in FORMATS:
            raise RequestError(415, "unsupported_format",
                               f"{im.format} images are not accepted: send JPEG, PNG, BMP, WebP or GIF")
        w, h = im.size
        if w < 1 or h < 1:
            raise RequestError(400, "empty_image", f"the image is {w}x{h} pixels: nothing to detect")
        if w * h > max_pixels:
            raise RequestError(413, "image_too_large",
                               f"the image is {w}x{h} = {w * h:,} pixels, over the limit of "
                               f"{max_pixels:,}: resize it before sending")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.seek(0)
                im.load()
                im = ImageOps.exif_transpose(im)
                rgb = _to_rgb(im)
                arr = np.asarray(rgb, dtype=np.uint8)
        except Image.DecompressionBombError as exc:
            raise RequestError(413, "image_too_large", f"image refused: {exc}") from None
        except MemoryError:
            raise RequestError(413, "image_too_large", "the image does not fit in memory once decoded") from None
        except Exception as exc:  # noqa: BLE001 - see above: a decoder failing on these bytes is a bad request
            raise RequestError(400, "corrupt_image",
                               f"the {im.format} image could not be decoded ({exc}): the file is "
                               "truncated or damaged") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def jpeg_for_gpu(data: bytes | bytearray, max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """Whether nvjpeg can decode ``data`` exactly as :func:`decode_image` would.

    True for a baseline 8-bit RGB or greyscale JPEG within the pixel limit and without an EXIF
    rotation; everything else (CMYK, rotated, PNG, bad bytes) goes to the CPU path, which also
    refuses bad input with its 4xx. Reads the header only.
    """
    if len(data) < 4 or bytes(data[:3]) != b"\xff\xd8\xff":
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            return (im.format == "JPEG" and im.mode in ("RGB", "L") and 0 < w * h <= max_pixels
                    and im.getexif().get(0x0112, 1) == 1 and not im.info.get("progressive"))
    except Exception:  # noqa: BLE001 - not decodable here: the CPU path answers with the right 4xx
        return False


def decode_image_on(data: bytes | bytearray, device: torch.device, max_pixels: int = DEFAULT_MAX_PIXELS,
                    gpu_decode: bool = False) -> torch.Tensor:
    """:func:`decode_image`, or nvjpeg on ``device`` for plain JPEGs when ``gpu_decode`` is on and
    ``device`` is CUDA (``torchvision.io.decode_jpeg(device=...)``). Same errors, same pixels
    up to the decoders' rounding (``scripts/verify_gpu.py`` measures it)."""
    if gpu_decode and device.type == "cuda" and jpeg_for_gpu(data, max_pixels):
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # nvjpeg refuses what Pillow may still read: fall through
            pass
    return decode_image(data, max_pixels)


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as upright RGB (EXIF orientation applied)."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")
