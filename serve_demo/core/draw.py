"""Draw labelled boxes, instance masks and keypoints on an image (client ``--draw``, evaluation samples)."""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .schema import Detection

MASK_ALPHA = 0.45
# COCO's person skeleton as pairs of keypoint indices (drawn when a model has COCO's 17 keypoints)
COCO_SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
                 (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))

PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))


def color_for(label: str) -> tuple[int, int, int]:
    """A stable colour per label name (the stock format carries names, not ids)."""
    return PALETTE[zlib.crc32(label.encode()) % len(PALETTE)]


def draw_detections(image: Image.Image, dets: Iterable[Detection], width: int | None = None,
                    color: tuple[int, int, int] | None = None, caption: bool = True) -> Image.Image:
    """A copy of ``image`` with each detection's box and ``label score`` drawn (the client's
    ``--draw`` and the server's image answers: one drawing).

    Line width and caption size follow the image (2 px and 11 pt up to ~500 px); the font is
    the scalable one Pillow ships, so the drawing is the same on every machine.
    """
    dets = list(dets)
    out = paint_masks(image.convert("RGB"), dets, color)
    draw = ImageDraw.Draw(out)
    side = min(out.size)
    width = width or max(2, round(side / 250))
    font = ImageFont.load_default(size=max(11, round(side / 40)))
    for d in dets:
        if d.keypoints:
            draw_keypoints(draw, d.keypoints, color or color_for(d.label), radius=max(2, width))
        c = color or color_for(d.label)
        x1, y1, x2, y2 = d.box
        draw.rectangle([x1, y1, x2, y2], outline=c, width=width)
        if caption:
            text = f"{d.label} {d.score:.2f}"
            tx1, ty1, tx2, ty2 = draw.textbbox((x1, y1), text, font=font)
            ty = y1 - (ty2 - ty1) - 2 if y1 > (ty2 - ty1) + 2 else y1
            draw.rectangle([x1, ty, x1 + (tx2 - tx1) + 4, ty + (ty2 - ty1) + 2], fill=c)
            draw.text((x1 + 2, ty), text, fill=(0, 0, 0) if sum(c) > 400 else (255, 255, 255), font=font)
    return out


def paint_masks(image: Image.Image, dets: list[Detection], color: tuple[int, int, int] | None = None,
                alpha: float = MASK_ALPHA) -> Image.Image:
    """A copy of ``image`` with each detection's RLE mask blended in its class colour."""
    from .masks import decode

    with_masks = [d for d in dets if d.mask is not None]
    if not with_masks:
        return image.copy()
    arr = np.asarray(image, dtype=np.float32).copy()
    for d in with_masks:
        m = decode(d.mask).astype(bool)
        if m.shape != arr.shape[:2]:  # drawn on a resized image (evaluation samples)
            m = np.asarray(Image.fromarray(m).resize((arr.shape[1], arr.shape[0]), Image.NEAREST))
        arr[m] = arr[m] * (1 - alpha) + np.asarray(color or color_for(d.label), np.float32) * alpha
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def draw_keypoints(draw: ImageDraw.ImageDraw, keypoints: list, color: tuple[int, int, int],
                   radius: int = 3) -> None:
    """Dots at ``[[x, y, score], ...]`` (COCO's skeleton joined when there are 17)."""
    if len(keypoints) == 17:
        for a, b in COCO_SKELETON:
            draw.line([tuple(keypoints[a][:2]), tuple(keypoints[b][:2])], fill=color, width=max(1, radius // 2))
    for x, y, _ in keypoints:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color, outline=(255, 255, 255))


def save_drawing(image_path: str | Path, dets: list[Detection], out: str | Path) -> Path:
    """Draw ``dets`` over the (EXIF-upright) image file and save to ``out``."""
    from .imaging import load_rgb

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_detections(load_rgb(image_path), dets).save(out)
    return out
