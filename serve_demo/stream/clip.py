"""A clip of synthetic shapes crossing the frame, with its truth: what ``make stream`` plays by
default and what the tests score tracking and counting against.

Each object keeps its class, size, colour and lane; it enters at one side, crosses the vertical
line at ``x = width/2`` once and leaves at the other side. The truth is per frame
(``{"frame", "objects": [{"id", "category", "box"}]}``, an object listed while at least
``VISIBLE`` of its box is inside the frame) and, for the line, how many crossed left to right
(``in``) and right to left (``out``). Every pixel is a function of the seed.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from serve_demo.data import synth

VISIBLE = 0.6  # fraction of an object's box inside the frame for it to count in the truth
TRUTH_SUFFIX = ".truth.json"


@dataclass(frozen=True)
class ClipSpec:
    """The clip's knobs; the defaults make ``make stream``'s clip."""

    width: int = 320
    height: int = 240
    fps: int = 25
    seconds: float = 12.0
    objects: int = 6
    seed: int = 0
    min_size: int = 34
    max_size: int = 56
    min_speed: float = 60.0  # px per second
    max_speed: float = 110.0

    @classmethod
    def at_width(cls, width: int, **kw) -> ClipSpec:
        """The default clip at ``width`` x 3/4 of it, sizes and speeds scaled (the model sees the same scene)."""
        d, k = cls(), width / cls().width
        return cls(width=width, height=width * 3 // 4, min_size=round(d.min_size * k), max_size=round(d.max_size * k),
                   min_speed=d.min_speed * k, max_speed=d.max_speed * k, **kw)

    @property
    def frames(self) -> int:
        return round(self.seconds * self.fps)

    @property
    def line(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """The counting line: vertical, through the middle, top to bottom."""
        return (self.width // 2, 0), (self.width // 2, self.height)


@dataclass(frozen=True)
class Mover:
    """One object's path: its box centre at frame ``f`` is ``(x0 + vx * (f - start), cy)``."""

    id: int
    category: str
    w: float
    h: float
    cy: float
    x0: float
    vx: float  # px per frame; > 0 moves right ("in" across the line)
    start: int
    color: tuple[int, int, int]
    seed: int

    def box(self, frame: int) -> list[float]:
        cx = self.x0 + self.vx * (frame - self.start)
        return [cx - self.w / 2, self.cy - self.h / 2, cx + self.w / 2, self.cy + self.h / 2]


def movers(spec: ClipSpec) -> list[Mover]:
    """The objects' paths: one lane each, entry times spread so that every object crosses
    the whole frame inside the clip."""
    rng = np.random.default_rng(spec.seed)
    lanes = spec.objects
    lane_h = spec.height / lanes
    out = []
    for i in range(spec.objects):
        size = float(rng.uniform(spec.min_size, min(spec.max_size, lane_h * 1.6)))
        cat = synth.CLASSES[i % len(synth.CLASSES)]
        aspect = 1.0 if cat in ("star", "triangle") else float(rng.uniform(0.75, 1.33))
        w, h = size * math.sqrt(aspect), size / math.sqrt(aspect)
        speed = float(rng.uniform(spec.min_speed, spec.max_speed)) / spec.fps
        rightward = i % 3 != 2  # two of three move in, one out
        span = spec.width + w  # from just outside one side to just outside the other
        duration = math.ceil(span / speed)
        latest = max(0, spec.frames - duration - 1)
        start = int(rng.integers(0, latest + 1)) if latest else 0
        x0 = -w / 2 if rightward else spec.width + w / 2
        cy = float(np.clip((i + 0.5) * lane_h, h / 2 + 1, spec.height - h / 2 - 1))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        out.append(Mover(i + 1, cat, w, h, cy, x0, speed if rightward else -speed, start, color,
                         int(rng.integers(1 << 30))))
    return out


def _visible(box: list[float], spec: ClipSpec) -> list[float] | None:
    x1, y1, x2, y2 = max(0.0, box[0]), max(0.0, box[1]), min(float(spec.width), box[2]), min(float(spec.height), box[3])
    area = (box[2] - box[0]) * (box[3] - box[1])
    if x2 <= x1 or y2 <= y1 or (x2 - x1) * (y2 - y1) < VISIBLE * area:
        return None
    return [round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)]


def render(spec: ClipSpec) -> Iterator[tuple[np.ndarray, list[dict]]]:
    """``(RGB frame, truth objects)`` for every frame of the clip."""
    rng = np.random.default_rng(spec.seed + 1)
    background = synth._background(rng, spec.width, spec.height)
    synth._clutter(rng, ImageDraw.Draw(background), spec.width, spec.height, 8)
    objs = movers(spec)
    for f in range(spec.frames):
        image = background.copy()
        draw = ImageDraw.Draw(image)
        truth = []
        for m in objs:
            if f < m.start:
                continue
            box = m.box(f)
            if box[2] < 0 or box[0] > spec.width:
                continue
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            # the same generator per object and frame: a star keeps its rotation
            synth._draw_object([(draw, m.color, None)], np.random.default_rng(m.seed), m.category, cx, cy,
                               m.w, m.h, False)
            seen = _visible(box, spec)
            if seen:
                truth.append({"id": m.id, "category": m.category, "box": seen})
        yield np.asarray(image), truth


def line_truth(spec: ClipSpec) -> dict[str, int]:
    """How many objects cross the middle line in each direction within the clip."""
    counts = {"in": 0, "out": 0}
    mid = spec.width / 2
    for m in movers(spec):
        before = (m.box(m.start)[0] + m.box(m.start)[2]) / 2
        after = (m.box(spec.frames - 1)[0] + m.box(spec.frames - 1)[2]) / 2
        if before < mid <= after:
            counts["in"] += 1
        elif after < mid <= before:
            counts["out"] += 1
    return counts


def write(spec: ClipSpec, path: Path, codec: str = "libx264") -> Path:
    """Encode the clip to ``path`` (``libx264`` MP4, or ``mjpeg`` in Matroska for RTP/JPEG) and its
    truth beside it (``PATH.truth.json``); return the truth's path."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    frames = []
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=spec.fps)
        stream.width, stream.height = spec.width, spec.height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "14"}
        else:  # MJPEG: 1.5 bits a pixel, about JPEG quality 90 on these scenes
            stream.bit_rate = spec.width * spec.height * spec.fps * 3 // 2
        for index, (frame, truth) in enumerate(render(spec)):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
            frames.append({"frame": index, "objects": truth})
        for packet in stream.encode():
            out.mux(packet)
    truth_path = path.with_name(path.name + TRUTH_SUFFIX)
    truth_path.write_text(json.dumps({"spec": asdict(spec), "line": [list(p) for p in spec.line],
                                      "line_counts": line_truth(spec), "frames": frames}))
    return truth_path


def thumbnail(spec: ClipSpec, frame: int) -> Image.Image:
    """One frame of the clip as an image (the README's picture, a quick look)."""
    for index, (image, _) in enumerate(render(spec)):
        if index == frame:
            return Image.fromarray(image)
    raise ValueError(f"the clip has {spec.frames} frames, not {frame + 1}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ClipSpec()
    p.add_argument("out", help="the clip to write (.mp4; .mkv writes MJPEG, what an RTP/JPEG server streams)")
    p.add_argument("--width", type=int, default=d.width, help=f"frame width; height 3/4 of it (default {d.width})")
    p.add_argument("--seconds", type=float, default=d.seconds, help=f"length (default {d.seconds})")
    p.add_argument("--fps", type=int, default=d.fps, help=f"frames per second (default {d.fps})")
    p.add_argument("--objects", type=int, default=d.objects, help=f"moving shapes (default {d.objects})")
    p.add_argument("--seed", type=int, default=d.seed)


def main(args: argparse.Namespace) -> int:
    spec = ClipSpec.at_width(args.width, fps=args.fps, seconds=args.seconds, objects=args.objects, seed=args.seed)
    out = Path(args.out)
    truth = write(spec, out, "mjpeg" if out.suffix == ".mkv" else "libx264")
    print(f"wrote {out} ({spec.frames} frames at {spec.fps} fps, {spec.objects} shapes) and its truth {truth}; "
          f"line {spec.line} crossings: {line_truth(spec)}")
    return 0
