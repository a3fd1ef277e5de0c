"""``serve_demo video``: a short clip of moving synthetic shapes, made here, goes through a real
TorchServe from a file and from a stream URL served on loopback; the detections follow the objects."""

from __future__ import annotations

import functools
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import av
import numpy as np
import pytest

from serve_demo.stream.video import VideoSpec, run
from tests.conftest import ROOT, synth_image

FRAMES, STEP, FPS = 24, 4, 12  # the scene moves STEP px right per frame


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """24 frames of one synthetic scene sliding right by 4 px a frame (H.264, 12 fps)."""
    scene = np.asarray(synth_image(90, (320, 240)))
    path = tmp_path_factory.mktemp("clip") / "moving.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.options = {"crf": "12"}
        for i in range(FRAMES):
            frame = np.roll(scene, STEP * i, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def tracks(jsonl: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl.read_text().splitlines()]


def check_follows(rows: list[dict], every: int) -> None:
    """The most confident detection of the first frame is found again, STEP px further per frame."""
    stays = [d for d in rows[0]["detections"] if d["box"][2] + STEP * FRAMES < 310]  # never wraps around
    first = max(stays, key=lambda d: d["score"])
    x0 = (first["box"][0] + first["box"][2]) / 2
    matched = 0
    for row in rows[1:]:
        expected = x0 + STEP * row["frame"]
        same = [d for d in row["detections"] if d["label"] == first["label"]
                and abs((d["box"][0] + d["box"][2]) / 2 - expected) < 6]
        matched += bool(same)
    assert matched >= 0.8 * (len(rows) - 1), (matched, len(rows))
    assert [r["frame"] for r in rows] == list(range(0, FRAMES, every))


@pytest.mark.server
def test_video_file_annotated_and_tracked(server, clip, tmp_path):
    out = tmp_path / "annotated.mp4"
    proc = subprocess.run([sys.executable, "-m", "serve_demo", "video", str(clip), "--out", str(out),
                           "--url", server.inference_url, "--home", str(server.home), "--every", "2",
                           "--inflight", "3"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "frames/s" in proc.stdout and "24 frames, 12 sent" in proc.stdout
    rows = tracks(out.with_suffix(".jsonl"))
    assert len(rows) == 12
    check_follows(rows, every=2)
    with av.open(str(out)) as video:
        frames = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
    assert len(frames) == FRAMES and frames[0].shape == (240, 320, 3)
    with av.open(str(clip)) as source:
        original = next(source.decode(video=0)).to_ndarray(format="rgb24")
    assert np.abs(frames[0].astype(int) - original).mean() > 0.5  # boxes drawn over the first frame


@pytest.mark.server
def test_video_from_a_stream_url(server, clip, tmp_path):
    """The same clip from an HTTP URL on loopback (what a camera's HTTP stream looks like to FFmpeg)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(clip.parent))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/{clip.name}"
        result = run(VideoSpec(url, tmp_path / "stream.mp4", url=server.inference_url,
                               token=server.key("inference"), max_frames=10))
    finally:
        httpd.shutdown()
    assert result["frames"] == 10 and result["sent"] == 10 and result["fps"] > 0
    rows = tracks(tmp_path / "stream.jsonl")
    assert [r["frame"] for r in rows] == list(range(10))
    first = max(rows[0]["detections"], key=lambda d: d["score"])
    assert first["score"] >= 0.5


@pytest.mark.unit
def test_bad_source_named(tmp_path):
    (tmp_path / "not_a_video.mp4").write_bytes(b"hello")
    proc = subprocess.run([sys.executable, "-m", "serve_demo", "video", str(tmp_path / "not_a_video.mp4"),
                           "--out", str(tmp_path / "o.mp4")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "cannot open" in proc.stderr


@pytest.mark.unit
def test_clip_moves_as_described(clip):
    """The clip is what the tests say it is: the scene moves STEP px right a frame."""
    with av.open(str(clip)) as source:
        a, b = [f.to_ndarray(format="rgb24").astype(int) for f, _ in zip(source.decode(video=0), range(2))]
    assert np.abs(np.roll(a, STEP, axis=1)[:, 40:-40] - b[:, 40:-40]).mean() < 6
