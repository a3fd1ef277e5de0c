"""``serve_demo stream``: live sources through a real TorchServe, tracked and counted.

A clip of moving shapes with known truth (``serve_demo clip``) is played from a file and, as a camera,
from a local RTSP server (GStreamer's, ``scripts/rtsp_server.py``): tracking is scored with motmetrics,
the line counter against the truth; a slow server gets fresh frames, not a queue; a camera that goes
away is reconnected; sources come and go through the watched sources file while the page, the
metrics and a real Prometheus follow them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import requests

from serve_demo.evaluate.tracking import iou_distances, read_rows, score
from serve_demo.serve.process import free_ports, wait_until
from serve_demo.stream import clip as clips
from serve_demo.stream.rtsp import LocalRtspServer
from serve_demo.stream.runner import StreamRunner, percentile
from serve_demo.stream.source import Frame, Slot, backoff
from serve_demo.stream.spec import (
    SourceSpec,
    SpecError,
    StreamSpec,
    check_source,
    name_for,
    parse_points,
    read_sources_file,
    region,
)
from tests.conftest import ROOT

CLIP = clips.ClipSpec()  # 320 x 240, 25 fps, 12 s, 6 shapes: 4 cross the middle line left to right, 2 back
DOOR = "door=160,0,160,240"


# ----------------------------------------------------------------------------------------------- units


def frame(i: int) -> Frame:
    return Frame(i, i / 25, time.monotonic(), time.time(), None)


@pytest.mark.unit
def test_live_slot_keeps_the_newest_and_counts_the_dropped():
    slot, stop = Slot(blocking=False, depth=2), threading.Event()
    for i in range(5):
        assert slot.put(frame(i), stop)
    assert slot.dropped == 3 and slot.take(0).index == 3 and slot.take(0).index == 4
    assert slot.take(0.01) is None
    slot.close()
    assert slot.closed and not slot.put(frame(9), stop)


@pytest.mark.unit
def test_file_slot_waits_for_the_consumer():
    slot, stop = Slot(blocking=True), threading.Event()
    slot.put(frame(0), stop)
    done = threading.Event()
    threading.Thread(target=lambda: (slot.put(frame(1), stop), done.set()), daemon=True).start()
    assert not done.wait(0.3)  # the second frame waits: nothing is dropped
    assert slot.take(1).index == 0 and done.wait(2) and slot.take(1).index == 1 and slot.dropped == 0


@pytest.mark.unit
def test_backoff_doubles_to_ten_seconds():
    assert [backoff(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 10, 10, 10]


@pytest.mark.unit
def test_source_names_and_checks(tmp_path):
    taken: set[str] = set()
    names = []
    for url in ("rtsp://10.0.0.7:554/stream1", "rtsp://10.0.0.8:554/stream1", "/data/gate cam.mp4", "http://cam.local/"):
        names.append(name_for(url, taken))
        taken.add(names[-1])
    assert names == ["stream1", "stream1-2", "gate-cam", "cam.local"]
    with pytest.raises(SpecError, match="no such file"):
        check_source(str(tmp_path / "missing.mp4"))
    with pytest.raises(SpecError, match="unsupported scheme"):
        check_source("ftp://host/x.mp4")
    check_source("rtsp://127.0.0.1:1/x")  # a live URL is tried (and retried) when it runs
    assert parse_points("160,0, 160,240", "--line") == ((160, 0), (160, 240))
    with pytest.raises(SpecError, match="odd count"):
        parse_points("1,2,3", "--line")
    with pytest.raises(SpecError, match="2 points"):
        region("door", ((0, 0), (1, 1), (2, 2)), "line")
    with pytest.raises(SpecError, match="3 points"):
        region("lot", ((0, 0), (1, 1)), "zone")


@pytest.mark.unit
@pytest.mark.parametrize("text, message", [
    ("cameras: []", "top-level 'sources:' list"),
    ("sources: [{name: a}]", "needs a 'url'"),
    ("sources: [{url: a.mp4, pace: slow}]", "pace 'slow'"),
    ("sources: [{url: a.mp4, max_fps: -1}]", "max_fps must be a positive number"),
    ("sources: [{url: a.mp4, lines: [{points: [[0, 0]]}]}]", "a line has 2 points"),
    ("sources: [{url: a.mp4, name: x}, {url: b.mp4, name: x}]", "is taken"),
    ("sources: [{url: a.mp4, name: '../x'}]", "not letters"),
    ("sources: [", "expected"),
])
def test_sources_file_mistakes_are_named(tmp_path, text, message):
    path = tmp_path / "sources.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=message) as err:
        read_sources_file(path)
    assert str(path) in str(err.value)


@pytest.mark.unit
def test_sources_file_reads_lines_zones_and_defaults(tmp_path):
    path = tmp_path / "sources.yaml"
    path.write_text("sources:\n  - rtsp://cam/a\n  - {url: gate.mp4, name: gate, max_fps: 5, pace: realtime,"
                    " lines: [{name: door, points: [[1, 2], [3, 4]]}], zones: [{points: [[0,0],[9,0],[9,9]]}]}\n")
    a, gate = read_sources_file(path)
    assert (a.name, a.live, a.max_fps) == ("a", True, None)
    assert gate.name == "gate" and gate.live and not gate.live_url and gate.max_fps == 5.0
    assert gate.lines[0].name == "door" and gate.lines[0].points == ((1, 2), (3, 4))
    assert gate.zones[0].name == "zone1" and len(gate.zones[0].points) == 3


def det(label: str, box, score: float = 0.9, label_id: int = 1):
    from serve_demo.core.schema import Detection

    return Detection(label, label_id, score, tuple(float(v) for v in box))


@pytest.mark.unit
def test_tracks_keep_their_ids_and_the_line_counts_each_crossing_once():
    from serve_demo.stream.spec import Region
    from serve_demo.stream.track import SourceTracker

    tracker = SourceTracker(0.5, 25, lines=(Region("door", ((100, 0), (100, 200))),),
                            zones=(Region("left", ((0, 0), (100, 0), (100, 200), (0, 200))),))
    ids_a, ids_b = set(), set()
    for f in range(40):  # a moves right across x=100, b moves left across it; b is less sure of itself
        a = det("star", (20 + 4 * f, 20, 50 + 4 * f, 50), 0.9, 4)
        b = det("cross", (170 - 4 * f, 120, 200 - 4 * f, 150), 0.55 if f % 2 else 0.9, 5)
        out = tracker.update([a, b], f / 25)
        got = {t.det.label: t.track_id for t in out}
        if f >= 2:
            ids_a.add(got["star"])
            ids_b.add(got["cross"])
    assert len(ids_a) == 1 and len(ids_b) == 1 and ids_a != ids_b and None not in ids_a | ids_b
    counts = tracker.counts
    assert counts.lines["door"] == {"in": 1, "out": 1}
    assert counts.lines_by_label["door"] == {"in": {"star": 1}, "out": {"cross": 1}}
    assert counts.zones["left"] == 1 and counts.zones_by_label["left"] == {"cross": 1}  # a left, b arrived
    assert counts.tracks_by_label == {"star": 1, "cross": 1}


@pytest.mark.unit
def test_iou_distances_and_percentiles():
    d = iou_distances([[0, 0, 10, 10]], [[0, 0, 10, 10], [5, 0, 15, 10], [50, 50, 60, 60]], 0.3)
    assert d[0, 0] == 0 and d[0, 1] == pytest.approx(1 - 50 / 150) and np.isnan(d[0, 2])
    assert percentile([], 50) is None and percentile(range(101), 95) == 95


@pytest.mark.unit
def test_the_clip_is_what_its_truth_says(tmp_path):
    spec = clips.ClipSpec(seconds=2.0, objects=3)
    truth = json.loads(clips.write(spec, tmp_path / "c.mp4").read_text())
    assert len(truth["frames"]) == spec.frames == 50
    with av.open(str(tmp_path / "c.mp4")) as video:
        assert sum(1 for _ in video.decode(video=0)) == 50
    counts = clips.line_truth(CLIP)
    assert counts == {"in": 4, "out": 2}
    frames = [f for _, f in clips.render(CLIP)]
    ids = {o["id"] for f in frames for o in f}
    assert ids == {1, 2, 3, 4, 5, 6}


# ------------------------------------------------------------------------------------ clips and RTSP


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """The default clip as H.264 MP4 (for files) with its truth."""
    path = tmp_path_factory.mktemp("stream-clip") / "shapes.mp4"
    clips.write(CLIP, path)
    return path


@pytest.fixture(scope="module")
def camera_clip(tmp_path_factory) -> Path:
    """The same clip as MJPEG in Matroska: what the RTSP server sends as RTP/JPEG."""
    path = tmp_path_factory.mktemp("stream-camera") / "shapes.mkv"
    clips.write(CLIP, path, "mjpeg")
    return path


@pytest.fixture
def rtsp(camera_clip):
    server = LocalRtspServer({"cam1": camera_clip, "cam2": camera_clip})
    server.start()
    yield server
    server.stop()


def run_in_thread(runner: StreamRunner) -> tuple[threading.Thread, dict]:
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(runner.run()), daemon=True)
    thread.start()
    return thread, result


def stream_spec(server, out: Path, **kw) -> StreamSpec:
    return StreamSpec(out=out, url=server.inference_url, token=server.key("inference"), port=kw.pop("port", None),
                      report_every=2.0, **kw)


# ------------------------------------------------------------------------------------ a real TorchServe


@pytest.mark.server
def test_file_tracked_scored_and_counted(server, clip, tmp_path, capsys):
    """Every frame of the file: MOTA/IDF1 from motmetrics, the line's in/out equal to the truth."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "serve_demo", "stream", str(clip), "--out", str(out), "--line", DOOR,
                           "--url", server.inference_url, "--home", str(server.home), "--port", "-1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shapes: 300 frames in, 300 processed" in proc.stdout and "door in 4 out 2" in proc.stdout
    result = score(read_rows(out / "shapes.jsonl"), json.loads(Path(f"{clip}.truth.json").read_text()))
    with capsys.disabled():  # the figures, in make test's output
        print(f"\ntracking, file, every frame: MOTA {result['mota']:.3f} IDF1 {result['idf1']:.3f} "
              f"ID switches {result['switches']} tracks {result['tracks']} for {result['objects']} objects")
    assert result["line_counts"] == {"door": result["line_truth"]} == {"door": {"in": 4, "out": 2}}
    assert result["mota"] >= 0.85 and result["idf1"] >= 0.85 and result["switches"] <= 6, result
    assert result["tracks"] <= result["objects"] + 2, result
    with av.open(str(out / "shapes.mp4")) as video:
        frames = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
    assert len(frames) == 300 and frames[0].shape == (240, 320, 3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sources"]["shapes"]["counts"]["lines"]["door"]["in"] == 4
    cli = subprocess.run([sys.executable, "-m", "serve_demo", "track-score", str(out / "shapes.jsonl"),
                          f"{clip}.truth.json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert cli.returncode == 0 and "MOTA" in cli.stdout and "(truth: in 4 out 2)" in cli.stdout


@pytest.mark.server
def test_live_camera_on_a_slower_server_drops_frames_and_latency_stays_bounded(server, rtsp, tmp_path, capsys):
    """25 fps in; shapes_b4 answers a batch once it is full or after 3 s: far slower than the camera.
    The newest frame is sent when a request is free, so latency stays at about one answer's time."""
    spec = stream_spec(server, tmp_path / "out", model="shapes_b4", inflight=2, duration=10.0)
    summary = StreamRunner(spec, [SourceSpec("cam1", rtsp.url("cam1"))]).run()
    f = summary["sources"]["cam1"]
    rows = read_rows(tmp_path / "out" / "cam1.jsonl")
    lat = [r["latency_ms"] for r in rows]
    with capsys.disabled():
        print(f"\nlive 25 fps into a slower server: {f['frames_in']} in, {f['processed']} answered, {f['dropped']} "
              f"dropped; latency p50 {f['latency_ms']['p50']} ms, p95 {f['latency_ms']['p95']} ms; per frame {lat}")
    assert f["frames_in"] >= 150 and f["processed"] >= 3 and f["errors"] == 0
    assert f["dropped"] >= 0.8 * f["frames_in"], f  # dropped, not queued
    # queued, the last frame would wait ~all of the run (10 s); dropped, every frame waits about one batch (3 s)
    assert max(lat) < 5000 and lat[-1] < lat[0] + 1000, lat
    assert [r["frame"] for r in rows] == sorted(r["frame"] for r in rows)


@pytest.mark.server
def test_camera_that_goes_away_is_reconnected(server, rtsp, tmp_path):
    runner = StreamRunner(stream_spec(server, tmp_path / "out"), [SourceSpec("cam1", rtsp.url("cam1"))])
    thread, result = run_in_thread(runner)
    try:
        run = wait_until(lambda: runner.runs.get("cam1"), 30, what="the source's start")
        wait_until(lambda: run.processed >= 10 or None, 60, what="10 answered frames")
        rtsp.stop()
        wait_until(lambda: run.reader.reconnects >= 1 or None, 30, what="the reader noticing the camera left")
        assert runner.status()["sources"]["cam1"]["state"] in ("reconnecting", "connecting")
        before = run.processed
        time.sleep(1.5)
        rtsp.start()
        wait_until(lambda: run.processed >= before + 10 or None, 60, what="frames after the camera came back")
        assert runner.status()["sources"]["cam1"]["state"] == "live"
    finally:
        runner.stop()
        thread.join(60)
    f = result["sources"]["cam1"]
    assert f["reconnects"] >= 1 and f["errors"] == 0, f
    rows = read_rows(tmp_path / "out" / "cam1.jsonl")
    assert [r["frame"] for r in rows] == sorted({r["frame"] for r in rows})  # one timeline across the gap


@pytest.mark.server
def test_sources_come_and_go_and_the_page_metrics_and_prometheus_follow(server, rtsp, clip, tmp_path):
    from serve_demo.monitor import dashboard
    from serve_demo.monitor.prometheus import LocalPrometheus

    sources = tmp_path / "sources.yaml"
    sources.write_text(f"sources:\n  - {{name: cam1, url: '{rtsp.url('cam1')}', lines: [{{name: door, points: "
                       "[[160, 0], [160, 240]]}]}\n")
    runner = StreamRunner(stream_spec(server, tmp_path / "out", port=0, sources_file=sources), [])
    thread, result = run_in_thread(runner)
    prom = None
    try:
        wait_until(lambda: runner.runs.get("cam1") and runner.runs["cam1"].processed >= 5 or None, 60,
                   what="cam1 answered")
        page = f"http://127.0.0.1:{runner.port}"
        prom = LocalPrometheus(tmp_path / "prom", f"127.0.0.1:{server.metrics_port}", free_ports(1)[0], "1s",
                               stream_target=f"127.0.0.1:{runner.port}")
        prom.start()
        # a second source, added while running: the file at the camera's pace, with a zone
        sources.write_text(sources.read_text() + f"  - {{name: gate, url: '{clip}', pace: realtime, loop: true, "
                           "zones: [{name: left, points: [[0, 0], [160, 0], [160, 240], [0, 240]]}]}\n")
        wait_until(lambda: runner.runs.get("gate") and runner.runs["gate"].processed >= 5 or None, 60,
                   what="the added source answered")
        status = requests.get(f"{page}/status", timeout=10).json()
        assert set(status["sources"]) == {"cam1", "gate"} and status["sources"]["gate"]["live"]
        assert 'src="streams/gate.mjpg"' in requests.get(page, timeout=10).text
        with requests.get(f"{page}/streams/gate.mjpg", stream=True, timeout=10) as resp:
            assert resp.headers["content-type"].startswith("multipart/x-mixed-replace")
            head = next(resp.iter_content(4096))
        assert head.startswith(b"--frame\r\nContent-Type: image/jpeg") and b"\xff\xd8" in head
        assert requests.get(f"{page}/streams/nope.mjpg", timeout=10).status_code == 404
        metrics = requests.get(f"{page}/metrics", timeout=10).text
        assert 'stream_frames_processed_total{source="gate"}' in metrics
        assert 'stream_latency_seconds_bucket{le="0.5",source="cam1"}' in metrics

        def scraped():
            r = requests.get(f"{prom.url}/api/v1/query", timeout=10, params={
                "query": 'sum by (source) (rate(stream_frames_processed_total[1m]))'}).json()["data"]["result"]
            return {x["metric"]["source"] for x in r} >= {"cam1", "gate"} or None

        wait_until(scraped, 60, what="Prometheus scraping both sources", interval=0.5)
        for panel in dashboard.PANELS:
            if panel.title.startswith("Streams"):
                for q in panel.queries:
                    body = requests.get(f"{prom.url}/api/v1/query", params={"query": q.expr}, timeout=10).json()
                    assert body["status"] == "success", (q.expr, body)
        # the first source removed from the file: it stops, its files are finished, the page forgets it
        sources.write_text(f"sources:\n  - {{name: gate, url: '{clip}', pace: realtime, loop: true, "
                           "zones: [{name: left, points: [[0, 0], [160, 0], [160, 240], [0, 240]]}]}\n")
        wait_until(lambda: "cam1" in runner.finished or None, 30, what="cam1 removed")
        assert set(requests.get(f"{page}/status", timeout=10).json()["sources"]) == {"gate"}
        assert 'source="cam1"' not in requests.get(f"{page}/metrics", timeout=10).text
        # a broken file keeps what runs
        sources.write_text("sources: [")
        time.sleep(2)
        assert set(runner.runs) == {"gate"}
    finally:
        runner.stop()
        thread.join(60)
        if prom:
            prom.stop()
    assert set(result["sources"]) == {"cam1", "gate"}
    with av.open(str(tmp_path / "out" / "cam1.mp4")) as video:  # finished when removed: it plays to its end
        assert sum(1 for _ in video.decode(video=0)) == result["sources"]["cam1"]["processed"]
    rows = read_rows(tmp_path / "out" / "gate.jsonl")
    assert all("left" in r["counts"]["zones"] for r in rows)


@pytest.mark.server
def test_ctrl_c_finishes_the_files(server, rtsp, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "serve_demo", "stream", rtsp.url("cam1"), rtsp.url("cam2"),
                             "--out", str(out), "--url", server.inference_url, "--home", str(server.home),
                             "--port", "-1", "--report-every", "1", "--line", DOOR],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        wait_until(lambda: all((out / f"{n}.jsonl").is_file() and len(read_rows(out / f"{n}.jsonl")) >= 10
                               for n in ("cam1", "cam2")) or None, 90, what="both cameras answered")
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopping (finishing the files" in stderr
    watchdog = [line for line in stderr.splitlines() if " fps  out " in line]
    assert {"cam1", "cam2"} <= {line.split()[3] for line in watchdog}, stderr[-2000:]
    for name in ("cam1", "cam2"):
        rows = read_rows(out / f"{name}.jsonl")
        with av.open(str(out / f"{name}.mp4")) as video:
            assert sum(1 for _ in video.decode(video=0)) == len(rows)
        assert f"{name}: " in stdout and all("track_id" in d for r in rows for d in r["detections"])


@pytest.mark.unit
def test_metrics_follow_running_totals_and_forget_a_removed_source():
    from serve_demo.stream.sinks import Metrics

    m = Metrics()
    for total in (3, 3, 5):
        m.add(m.crossings, "cam1", total, "door", "in", "star")
    m.add(m.frames_in, "cam1", 40)
    m.add(m.frames_in, "cam2", 7)
    text = m.exposition().decode()
    assert 'stream_line_crossings_total{direction="in",label="star",line="door",source="cam1"} 5.0' in text
    assert 'stream_frames_in_total{source="cam1"} 40.0' in text
    m.remove("cam1")
    text = m.exposition().decode()
    assert 'source="cam1"' not in text and 'stream_frames_in_total{source="cam2"} 7.0' in text


@pytest.mark.server
def test_the_kserve_server_answers_a_stream_too(kserve, clip, tmp_path):
    """The same runner against the second server (its /predictions route and keys)."""
    spec = StreamSpec(out=tmp_path / "out", url=kserve.inference_url, token=kserve.key("inference"), port=None,
                      max_frames=100)
    line = region("door", ((160, 0), (160, 240)), "line")
    summary = StreamRunner(spec, [SourceSpec("shapes", str(clip), lines=(line,))]).run()
    f = summary["sources"]["shapes"]
    assert f["processed"] == 100 and f["errors"] == 0, f
    result = score(read_rows(tmp_path / "out" / "shapes.jsonl"), json.loads(Path(f"{clip}.truth.json").read_text()))
    assert result["mota"] >= 0.8 and result["idf1"] >= 0.8, result
