"""Deterministic synthetic COCO-format detection dataset.

Writes the layout users bring from Roboflow and similar tools::

    OUT/train/_annotations.coco.json  OUT/train/*.jpg
    OUT/valid/...                     OUT/test/...

Images have different sizes, textured and cluttered backgrounds (colour noise, thin lines,
arcs and dots that are not objects), and 1-9 objects of five shape classes with varied sizes,
aspect ratios, rotations and colours. Objects may overlap: a later object may cover at most
part of an earlier one's box, so every annotated object stays visible.
Every byte is a function of the seed: the same seed gives the same files.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from serve_demo.core import defaults

log = logging.getLogger(__name__)

CLASSES = ("ellipse", "rectangle", "triangle", "star", "cross")
SPLITS = {"train": 0, "valid": 1, "test": 2}
ANNOTATIONS = "_annotations.coco.json"


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator; the defaults make the demo dataset."""

    min_side: int = 224
    max_side: int = 384
    min_objects: int = 1
    max_objects: int = 9
    min_object: int = 14
    max_object: int = 120
    max_cover: float = 0.45  # largest fraction of an earlier box a later object may cover
    clutter: int = 14  # distractor strokes per image (mean)


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Low-frequency colour field + fine noise + optional stripes."""
    gw, gh = rng.integers(2, 7), rng.integers(2, 7)
    grid = rng.uniform(30, 225, size=(gh, gw, 3)).astype(np.uint8)
    img = Image.fromarray(grid).resize((w, h), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0, rng.uniform(4, 14), size=(h, w, 1))
    if rng.random() < 0.35:  # stripes or checker texture
        period = rng.uniform(6, 30)
        yy, xx = np.mgrid[0:h, 0:w]
        angle = rng.uniform(0, math.pi)
        wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
        arr += (wave[..., None] * rng.uniform(8, 25)).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, w: int, h: int, n: int) -> None:
    """Thin lines, arcs and dots: edges and colours that are not objects."""
    for _ in range(n):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        if kind == 0:
            length, ang = rng.uniform(20, 160), rng.uniform(0, 2 * math.pi)
            x1, y1 = x0 + length * math.cos(ang), y0 + length * math.sin(ang)
            draw.line([(x0, y0), (x1, y1)], fill=color, width=int(rng.integers(1, 3)))
        elif kind == 1:
            r = rng.uniform(10, 60)
            start = rng.uniform(0, 360)
            draw.arc([x0 - r, y0 - r, x0 + r, y0 + r], start, start + rng.uniform(40, 200),
                     fill=color, width=int(rng.integers(1, 3)))
        else:
            r = rng.uniform(1.5, 4)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=color)


def _polygon(cls: str, cx: float, cy: float, w: float, h: float, rot: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centred at (cx, cy), scaled to w x h before rotation."""
    if cls == "triangle":
        pts = [(0.0, -0.5), (0.5, 0.5), (-0.5, 0.5)]
    elif cls == "star":
        pts = []
        for k in range(10):
            r = 0.5 if k % 2 == 0 else 0.21
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
    else:
        raise ValueError(cls)
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + (x * w) * c - (y * h) * s, cy + (x * w) * s + (y * h) * c) for x, y in pts]


def _draw_object(draws: list[tuple[ImageDraw.ImageDraw, tuple | int, tuple | int | None]],
                 rng: np.random.Generator, cls: str, cx: float, cy: float, w: float, h: float,
                 outline: bool) -> list[float]:
    """Draw one object on each ``(draw, fill, outline colour)``; return its tight box [x1, y1, x2, y2].

    The image and the object's mask are drawn with the same geometry (one set of random draws).
    """
    width = 2 if outline else 0
    if cls in ("ellipse", "rectangle"):
        box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        for draw, fill, line in draws:
            shape = draw.ellipse if cls == "ellipse" else draw.rectangle
            shape(box, fill=fill, outline=line if outline else None, width=width)
        return box
    if cls == "cross":
        t = rng.uniform(0.28, 0.4)
        for draw, fill, _ in draws:
            draw.rectangle([cx - w / 2, cy - h * t / 2, cx + w / 2, cy + h * t / 2], fill=fill)
            draw.rectangle([cx - w * t / 2, cy - h / 2, cx + w * t / 2, cy + h / 2], fill=fill)
        return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    pts = _polygon(cls, cx, cy, w, h, rng.uniform(0, 2 * math.pi))
    for draw, fill, line in draws:
        draw.polygon(pts, fill=fill, outline=line if outline else None, width=width)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return [min(xs), min(ys), max(xs), max(ys)]


def _box_area(b: list[float]) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def _inter(a: list[float], b: list[float]) -> float:
    return _box_area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])


def _contrasting_color(rng: np.random.Generator, bg: np.ndarray) -> tuple[int, int, int]:
    """A random colour far enough from the local background to be visible."""
    for _ in range(50):
        c = rng.integers(0, 256, 3)
        if np.abs(c - bg).sum() > 120:
            break
    return tuple(int(v) for v in c)


def render_image(rng: np.random.Generator, cfg: SynthConfig,
                 masks: bool = False) -> tuple[Image.Image, list[dict]]:
    """One image and its objects as ``[{"category": name, "box": [x1, y1, x2, y2]}]``.

    With ``masks``, each object also carries ``"mask"``: its visible pixels (an ``H x W`` bool
    array, later objects cut out). The image is the same with or without masks.
    """
    w, h = (int(v) for v in rng.integers(cfg.min_side, cfg.max_side + 1, 2))
    img = _background(rng, w, h)
    draw = ImageDraw.Draw(img)
    _clutter(rng, draw, w, h, int(rng.poisson(cfg.clutter)))
    bg = np.asarray(img, dtype=np.int32)
    objects: list[dict] = []
    wanted = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    for _ in range(wanted * 6):
        if len(objects) >= wanted:
            break
        cls = CLASSES[int(rng.integers(len(CLASSES)))]
        size = math.exp(rng.uniform(math.log(cfg.min_object), math.log(min(cfg.max_object, min(w, h) * 0.6))))
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        ow, oh = size * math.sqrt(aspect), size / math.sqrt(aspect)
        if cls in ("star", "triangle"):  # rotation spreads the box: keep them compact
            ow = oh = size * rng.uniform(0.8, 1.0)
        cx, cy = rng.uniform(ow / 2 + 1, w - ow / 2 - 1), rng.uniform(oh / 2 + 1, h - oh / 2 - 1)
        approx = [cx - ow / 2, cy - oh / 2, cx + ow / 2, cy + oh / 2]
        if any(_inter(approx, o["box"]) > cfg.max_cover * _box_area(o["box"]) for o in objects):
            continue
        x1, y1, x2, y2 = (int(v) for v in (approx[0], approx[1], approx[2], approx[3]))
        local = bg[max(0, y1):max(y1 + 1, y2), max(0, x1):max(x1 + 1, x2)].reshape(-1, 3).mean(0)
        color = _contrasting_color(rng, local)
        outline = tuple(int(v) for v in rng.integers(0, 256, 3)) if rng.random() < 0.25 else None
        draws = [(draw, color, outline)]
        mask = Image.new("L", (w, h)) if masks else None
        if mask is not None:
            draws.append((ImageDraw.Draw(mask), 255, 255))
        box = _draw_object(draws, rng, cls, cx, cy, ow, oh, outline is not None)
        box = [max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3])]
        objects.append({"category": cls, "box": box})
        if mask is not None:
            visible = np.asarray(mask) > 0
            for earlier in objects[:-1]:
                earlier["mask"] &= ~visible  # the new object hides what it covers
            objects[-1]["mask"] = visible
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return img, objects


def mask_annotation(mask: np.ndarray) -> dict | None:
    """COCO ``segmentation`` (compressed RLE), ``bbox`` and ``area`` of a visible mask."""
    from serve_demo.core.masks import encode

    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    return {"segmentation": encode(mask), "bbox": [x1, y1, x2 - x1, y2 - y1], "area": int(mask.sum())}


def generate_split(out: Path, split: str, count: int, seed: int, cfg: SynthConfig,
                   progress: bool = True, masks: bool = False) -> Path:
    """Write one split folder; return the path of its annotation file.

    With ``masks``, annotations carry ``segmentation`` (RLE of the visible pixels) and take their
    ``bbox`` and ``area`` from it, as COCO's do; the images are the same as without.
    """
    from tqdm import tqdm

    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, SPLITS.get(split, 9)])
    categories = [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CLASSES)]
    cat_id = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for i in tqdm(range(count), desc=f"synth {split}", disable=not progress, unit="img"):
        img, objects = render_image(rng, cfg, masks)
        name = f"{split}_{i:05d}.jpg"
        img.save(folder / name, quality=int(rng.integers(80, 96)))
        images.append({"id": i + 1, "file_name": name, "width": img.width, "height": img.height})
        for o in objects:
            x1, y1, x2, y2 = o["box"]
            ann = {"bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                   "area": round((x2 - x1) * (y2 - y1), 2)}
            if masks:
                ann = mask_annotation(o["mask"])
                if ann is None:
                    continue
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": cat_id[o["category"]], **ann, "iscrowd": 0})
    ann_path = folder / ANNOTATIONS
    ann_path.write_text(json.dumps({
        "info": {"description": f"serve_demo synthetic shapes, seed {seed}", "version": "1"},
        "images": images, "annotations": annotations, "categories": categories,
    }))
    log.info("wrote %s: %d images, %d objects", folder, len(images), len(annotations))
    return ann_path


def generate(out: Path, seed: int = 0, train: int = 3000, valid: int = 200, test: int = 300,
             cfg: SynthConfig | None = None, progress: bool = True, masks: bool = False) -> Path:
    """Write train/valid/test splits under ``out``; skip splits already complete.

    ``masks`` adds instance segmentation (same images as without, for the same seed).
    """
    cfg = cfg or SynthConfig()
    stamp = out / ".synth.json"
    spec = {"seed": seed, "train": train, "valid": valid, "test": test, "cfg": cfg.__dict__}
    if masks:
        spec["masks"] = True
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        log.info("%s already holds this dataset (seed %d); nothing to do", out, seed)
        return out
    for split, count in (("train", train), ("valid", valid), ("test", test)):
        generate_split(out, split, count, seed, cfg, progress, masks)
    stamp.write_text(json.dumps(spec))
    return out


def add_arguments(p) -> None:
    """``serve_demo data``: where, which seed, how many images per split."""
    p.add_argument("--out", default=defaults.DEMO_DATA, help="dataset root (train/ valid/ test/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=3000, help="training images")
    p.add_argument("--valid", type=int, default=200, help="validation images")
    p.add_argument("--test", type=int, default=300, help="test images")
    p.add_argument("--masks", action="store_true",
                   help="add instance masks (COCO RLE segmentation; same images as without)")


def main(args) -> int:
    """Generate the dataset (splits already complete are kept)."""
    generate(Path(args.out), seed=args.seed, train=args.train, valid=args.valid, test=args.test,
             masks=args.masks)
    print(f"dataset ready in {args.out}")
    return 0
