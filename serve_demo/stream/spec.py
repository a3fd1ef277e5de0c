"""What ``serve_demo stream`` reads, counts and writes: typed specs, and the sources file.

A source is a file, a URL FFmpeg opens (``rtsp://``, ``http(s)://``, ``rtmp://``, ``udp://``, ``srt://``)
or a camera (``/dev/videoN``). Lines and zones are in the source's pixels. The sources file (YAML or JSON)
lists sources with their own lines, zones and ``max_fps``; ``serve_demo stream`` re-reads it when it
changes, so cameras are added and removed while it runs::

    sources:
      - name: gate                      # the files' and the metrics' name (default: from the URL)
        url: rtsp://10.0.0.7:554/stream1
        max_fps: 10                     # at most this many frames a second to the server
        lines:
          - {name: door, points: [[160, 0], [160, 240]]}
        zones:
          - {name: lot, points: [[0, 120], [320, 120], [320, 240], [0, 240]]}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from serve_demo.core import defaults

LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
PACES = ("fast", "realtime")


class SpecError(ValueError):
    """A source, line, zone or sources file that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Region:
    """A counting line (2 points) or a zone (a polygon, 3 points or more), in pixels."""

    name: str
    points: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class SourceSpec:
    """One source and what is counted on it."""

    name: str
    url: str
    max_fps: float | None = None  # at most this many frames a second to the server (None: as many as it takes)
    pace: str = "fast"  # files: "fast" (every frame, as fast as the server answers) or "realtime" (like a camera)
    loop: bool = False  # files: start over at the end
    every: int = 1  # send every k-th frame; the others are drawn with the latest tracks (serve_demo video)
    lines: tuple[Region, ...] = ()
    zones: tuple[Region, ...] = ()

    @property
    def live_url(self) -> bool:
        """A camera or a stream (not a file)."""
        return is_live(self.url)

    @property
    def live(self) -> bool:
        """Frames come at their own rate and the oldest are dropped: a camera, a stream, or a file at
        ``pace: realtime``."""
        return self.live_url or self.pace == "realtime"


@dataclass(frozen=True)
class StreamSpec:
    """Where frames go and where the results are written."""

    out: Path
    model: str = defaults.DEMO_NAME
    url: str = f"http://127.0.0.1:{defaults.INFERENCE_PORT}"
    token: str | None = None
    threshold: float = defaults.THRESHOLD
    inflight: int = defaults.STREAM_INFLIGHT  # requests in flight, all sources together
    port: int | None = defaults.STREAM_PORT  # the MJPEG page, /status and /metrics; None: no page
    report_every: float = 5.0  # seconds between watchdog lines
    duration: float | None = None  # stop after this many seconds
    max_frames: int | None = None  # per source: stop it after this many frames read
    sources_file: Path | None = None  # watched: sources added and removed while running
    video: bool = True  # write DIR/NAME.mp4
    trace: int = 25  # points of each track's trace drawn
    summary: bool = True  # write DIR/summary.json at the end


def is_live(url: str) -> bool:
    scheme = urlsplit(url).scheme.lower()
    return scheme in LIVE_SCHEMES or url.startswith("/dev/video")


def name_for(url: str, taken: set[str]) -> str:
    """A file-system and metric-label safe name for a source: the file's stem, the URL's last path part
    or its host; ``-2``, ``-3`` ... when taken."""
    parts = urlsplit(url)
    raw = Path(parts.path).stem if parts.path.strip("/") else (parts.hostname or "source")
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", raw).strip("-.") or "source"
    base = base if NAME_RE.fullmatch(base) else f"s-{base}"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def check_source(url: str) -> None:
    """A missing file is named now, not after a reconnect loop."""
    if is_live(url):
        if url.startswith("/dev/video") and not Path(url).exists():
            raise SpecError(f"{url}: no such camera (ls /dev/video*)")
        return
    if "://" in url and urlsplit(url).scheme.lower() not in ("file",):
        raise SpecError(f"{url}: unsupported scheme (use a file, /dev/videoN, or {', '.join(LIVE_SCHEMES)})")
    path = Path(url[len("file://"):] if url.startswith("file://") else url)
    if not path.is_file():
        raise SpecError(f"{url}: no such file")


def parse_points(text: str, what: str) -> tuple[tuple[float, float], ...]:
    """``"x1,y1,x2,y2,..."`` (the command line's --line/--zone) -> points."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise SpecError(f"{what} {text!r}: expected numbers x1,y1,x2,y2,...") from None
    if len(values) % 2:
        raise SpecError(f"{what} {text!r}: an odd count of numbers; expected x,y pairs")
    return tuple(zip(values[::2], values[1::2]))


def region(name: str, points, kind: str) -> Region:
    pts = tuple((float(p[0]), float(p[1])) for p in points)
    if kind == "line" and len(pts) != 2:
        raise SpecError(f"line {name!r}: a line has 2 points, got {len(pts)}")
    if kind == "zone" and len(pts) < 3:
        raise SpecError(f"zone {name!r}: a zone needs 3 points or more, got {len(pts)}")
    if not NAME_RE.fullmatch(name):
        raise SpecError(f"{kind} name {name!r}: use letters, digits, '_', '.', '-'")
    return Region(name, pts)


def _regions(items, kind: str, where: str) -> tuple[Region, ...]:
    out = []
    for i, item in enumerate(items or []):
        if not isinstance(item, dict) or "points" not in item:
            raise SpecError(f"{where}: {kind}s[{i}] needs 'points' (a list of [x, y])")
        try:
            out.append(region(str(item.get("name", f"{kind}{i + 1}")), item["points"], kind))
        except (TypeError, IndexError, ValueError) as exc:
            raise SpecError(f"{where}: {kind}s[{i}]: {exc}") from None
    return tuple(out)


def read_sources_file(path: Path) -> list[SourceSpec]:
    """The sources listed in a YAML or JSON file (see the module's docstring).

    Raises:
        SpecError: the file cannot be read or a source is malformed; the message names the entry.
    """
    import yaml

    try:
        doc = yaml.safe_load(path.read_text()) if path.suffix != ".json" else json.loads(path.read_text())
    except (OSError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise SpecError(f"{path}: {exc}") from None
    items = (doc or {}).get("sources") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise SpecError(f"{path}: expected a top-level 'sources:' list")
    out: list[SourceSpec] = []
    taken: set[str] = set()
    for i, item in enumerate(items):
        where = f"{path}: sources[{i}]"
        if isinstance(item, str):
            item = {"url": item}
        if not isinstance(item, dict) or not item.get("url"):
            raise SpecError(f"{where}: needs a 'url'")
        url = str(item["url"])
        name = str(item.get("name") or name_for(url, taken))
        if not NAME_RE.fullmatch(name) or name in taken:
            raise SpecError(f"{where}: name {name!r} is {'taken' if name in taken else 'not letters, digits, _ . -'}")
        pace = str(item.get("pace", "fast"))
        if pace not in PACES:
            raise SpecError(f"{where}: pace {pace!r}; expected one of {', '.join(PACES)}")
        max_fps = item.get("max_fps")
        if max_fps is not None and (not isinstance(max_fps, (int, float)) or max_fps <= 0):
            raise SpecError(f"{where}: max_fps must be a positive number")
        taken.add(name)
        out.append(SourceSpec(name, url, max_fps=float(max_fps) if max_fps else None, pace=pace,
                              loop=bool(item.get("loop", False)), lines=_regions(item.get("lines"), "line", where),
                              zones=_regions(item.get("zones"), "zone", where)))
    return out
