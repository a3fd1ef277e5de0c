"""Draw labelled boxes on an image (client ``--draw`` and evaluation samples)."""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .schema import Detection

PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))


def color_for(label: str) -> tuple[int, int, int]:
    """A stable colour per label name (the stock format carries names, not ids)."""
    return PALETTE[zlib.crc32(label.encode()) % len(PALETTE)]


def draw_detections(image: Image.Image, dets: Iterable[Detection], width: int = 2,
                    color: tuple[int, int, int] | None = None, caption: bool = True) -> Image.Image:
    """A copy of ``image`` with each detection's box and ``label score`` drawn."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for d in dets:
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


def save_drawing(image_path: str | Path, dets: list[Detection], out: str | Path) -> Path:
    """Draw ``dets`` over the (EXIF-upright) image file and save to ``out``."""
    from .data import load_rgb

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_detections(load_rgb(image_path), dets).save(out)
    return out
