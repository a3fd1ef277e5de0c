"""Track identities and counts per source, and the annotated frame.

Tracking is ByteTrack from Roboflow's ``trackers`` package (Apache-2.0, maintained, clean-room
re-implementations of SORT, ByteTrack, OC-SORT and BoT-SORT behind one ``update(detections)``);
its counters are ``supervision``'s ``LineZone`` and ``PolygonZone``, which ``trackers`` is built on.
ByteTrack matches confident detections first and then the less confident ones to the tracks
left over, so the server is asked down to ``LOW_FACTOR x threshold`` and the answer keeps a
detection when it is at least ``threshold`` or continues a track.

A line counts an object once when its box centre crosses it; ``in`` is the line's direction
(first point to second) turned a quarter counter-clockwise on the screen: a line drawn from
top to bottom counts left-to-right crossings as ``in``. A zone counts the objects whose box
bottom-centre is inside it, per frame.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from serve_demo.core.draw import PALETTE, color_for
from serve_demo.core.schema import Detection

from .spec import Region

LOST_FRAMES = 30  # a track unseen for this many processed frames is ended (and its trace dropped)
LOW_FACTOR = 0.5  # the server is asked down to this fraction of the threshold (ByteTrack's second stage)


def request_threshold(threshold: float) -> float:
    """What the server is asked down to: ByteTrack matches the less confident detections second."""
    return round(threshold * LOW_FACTOR, 4)


@dataclass(frozen=True)
class Tracked:
    """A detection and its track (``None`` until the tracker confirms one)."""

    det: Detection
    track_id: int | None

    def as_json(self) -> dict:
        d = self.det
        return {"track_id": self.track_id, "label": d.label, "label_id": d.label_id, "score": round(d.score, 4),
                "box": [round(v, 2) for v in d.box]}


@dataclass
class Counts:
    """Cumulative line crossings and the current zone occupancy of one source."""

    lines: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> {"in", "out"}
    lines_by_label: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # name -> in/out -> label -> n
    zones: dict[str, int] = field(default_factory=dict)  # name -> objects inside now
    zones_by_label: dict[str, dict[str, int]] = field(default_factory=dict)
    tracks_by_label: dict[str, int] = field(default_factory=dict)  # distinct tracks seen so far

    def as_json(self) -> dict:
        return {"lines": {n: {**c, "by_label": self.lines_by_label.get(n, {})} for n, c in self.lines.items()},
                "zones": {n: {"inside": c, "by_label": self.zones_by_label.get(n, {})} for n, c in self.zones.items()},
                "tracks_by_label": dict(self.tracks_by_label)}


class SourceTracker:
    """ByteTrack + line and zone counters for one source; ``update`` once per processed frame, in order."""

    def __init__(self, threshold: float, fps: float | None, lines: tuple[Region, ...] = (),
                 zones: tuple[Region, ...] = (), trace: int = 25) -> None:
        import supervision as sv
        from trackers import ByteTrackTracker

        self.threshold = threshold
        self.tracker = ByteTrackTracker(lost_track_buffer=LOST_FRAMES, frame_rate=fps or 25.0,
                                        track_activation_threshold=threshold,
                                        high_conf_det_threshold=threshold, minimum_consecutive_frames=2)
        self.lines = {r.name: (r, sv.LineZone(sv.Point(*r.points[0]), sv.Point(*r.points[1]),
                                              triggering_anchors=(sv.Position.CENTER,))) for r in lines}
        self.zones = {r.name: (r, sv.PolygonZone(np.array(r.points, dtype=np.int64))) for r in zones}
        self.traces: dict[int, deque] = {}
        self.trace = trace
        self.labels: dict[int, str] = {}
        self.active = 0  # tracks in the last frame
        self._frame = 0
        self._last: dict[int, int] = {}  # track id -> the frame it was last seen in
        self.seen: dict[int, str] = {}  # track id -> label (first seen)
        self.counts = Counts(lines={n: {"in": 0, "out": 0} for n in self.lines},
                             zones={n: 0 for n in self.zones})

    def update(self, dets: list[Detection], when: float) -> list[Tracked]:
        """Track one frame's detections (``when``: its time in seconds) and count them."""
        import supervision as sv

        for d in dets:
            self.labels[d.label_id] = d.label
        if dets:
            detections = sv.Detections(xyxy=np.array([d.box for d in dets], dtype=np.float32),
                                       confidence=np.array([d.score for d in dets], dtype=np.float32),
                                       class_id=np.array([d.label_id for d in dets], dtype=int),
                                       data={"index": np.arange(len(dets))})
        else:
            detections = sv.Detections.empty()
            detections.data["index"] = np.zeros(0, dtype=int)
        tracked = self.tracker.update(detections, timestamp=when)
        out: list[Tracked] = []
        keep = []
        for i in range(len(tracked)):
            det = dets[int(tracked.data["index"][i])]
            tid = int(tracked.tracker_id[i]) if tracked.tracker_id is not None else -1
            if tid < 0 and det.score < self.threshold:
                continue  # a low-score detection that continues no track
            keep.append(i)
            out.append(Tracked(det, tid if tid >= 0 else None))
            if tid >= 0:
                cx, cy = (det.box[0] + det.box[2]) / 2, (det.box[1] + det.box[3]) / 2
                self.traces.setdefault(tid, deque(maxlen=self.trace)).append((cx, cy))
                if tid not in self.seen:
                    self.seen[tid] = det.label
                    self.counts.tracks_by_label[det.label] = self.counts.tracks_by_label.get(det.label, 0) + 1
        confirmed = tracked[np.array([i for i in keep if tracked.tracker_id[i] >= 0], dtype=int)] \
            if len(tracked) else tracked
        self._count(confirmed)
        self._frame += 1
        self.active = 0
        for t in out:
            if t.track_id is not None:
                self._last[t.track_id] = self._frame
                self.active += 1
        for tid in [t for t, last in self._last.items() if self._frame - last > LOST_FRAMES]:
            del self._last[tid]
            self.traces.pop(tid, None)
        return out

    def _count(self, confirmed) -> None:
        for name, (_, zone) in self.lines.items():
            if len(confirmed) == 0:
                continue
            crossed_in, crossed_out = zone.trigger(confirmed)
            for direction, mask in (("in", crossed_in), ("out", crossed_out)):
                for cid in confirmed.class_id[mask]:
                    label = self.labels.get(int(cid), str(cid))
                    self.counts.lines[name][direction] += 1
                    per = self.counts.lines_by_label.setdefault(name, {}).setdefault(direction, {})
                    per[label] = per.get(label, 0) + 1
        for name, (_, zone) in self.zones.items():
            inside = zone.trigger(confirmed) if len(confirmed) else np.zeros(0, dtype=bool)
            self.counts.zones[name] = int(inside.sum())
            self.counts.zones_by_label[name] = dict(Counter(self.labels.get(int(c), str(c))
                                                            for c in confirmed.class_id[inside]))


def warm_up() -> None:
    """Import the tracker and the counters now (about a second: OpenCV, supervision)."""
    import supervision  # noqa: F401
    import trackers  # noqa: F401


def track_color(track_id: int | None, label: str) -> tuple[int, int, int]:
    return PALETTE[track_id % len(PALETTE)] if track_id is not None else color_for(label)


def annotate(image: Image.Image, tracked: list[Tracked], tracker: SourceTracker) -> Image.Image:
    """The frame with each box, ``label #id``, its trace, the lines with their counts and the zones."""
    out = image.convert("RGB")
    side = min(out.size)
    width = max(2, round(side / 250))
    font = ImageFont.load_default(size=max(11, round(side / 28)))
    if tracker.zones:
        overlay = Image.new("RGBA", out.size)
        od = ImageDraw.Draw(overlay)
        for r, _ in tracker.zones.values():
            od.polygon(r.points, fill=(0, 160, 255, 50), outline=(0, 160, 255, 255), width=width)
        out = Image.alpha_composite(out.convert("RGBA"), overlay).convert("RGB")
    draw = ImageDraw.Draw(out)
    for name, (r, _) in tracker.zones.items():
        x, y = r.points[0]
        draw.text((x + 3, y + 2), f"{name}: {tracker.counts.zones[name]}", fill=(255, 255, 255), font=font,
                  stroke_width=2, stroke_fill=(0, 0, 0))
    for t in tracked:
        c = track_color(t.track_id, t.det.label)
        if t.track_id is not None and len(tracker.traces.get(t.track_id, ())) > 1:
            draw.line(list(tracker.traces[t.track_id]), fill=c, width=width)
        x1, y1, x2, y2 = t.det.box
        draw.rectangle([x1, y1, x2, y2], outline=c, width=width)
        text = f"{t.det.label} #{t.track_id}" if t.track_id is not None else f"{t.det.label} {t.det.score:.2f}"
        tx1, ty1, tx2, ty2 = draw.textbbox((x1, y1), text, font=font)
        ty = y1 - (ty2 - ty1) - 2 if y1 > (ty2 - ty1) + 2 else y1
        draw.rectangle([x1, ty, x1 + (tx2 - tx1) + 4, ty + (ty2 - ty1) + 2], fill=c)
        draw.text((x1 + 2, ty), text, fill=(0, 0, 0) if sum(c) > 400 else (255, 255, 255), font=font)
    for name, (r, _) in tracker.lines.items():
        draw.line(r.points, fill=(255, 255, 255), width=width + 1)
        counts = tracker.counts.lines[name]
        x = min(max(r.points[0][0] + 4, 2), out.size[0] - 90)
        draw.text((x, 4), f"{name} in {counts['in']} out {counts['out']}", fill=(255, 255, 255), font=font,
                  stroke_width=2, stroke_fill=(0, 0, 0))
    return out
