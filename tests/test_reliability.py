"""Faults and load against a dedicated real TorchServe (loopback, bounded in count and time):
a worker killed mid-load, good and bad requests mixed under concurrency, and a short soak with
the worker's memory measured. The long versions are `make soak` (docs/reliability.md)."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from serve_demo.archive.builder import build
from serve_demo.serve.process import wait_until
from tests.conftest import DEMO_LABELS, DEMO_WEIGHTS, archive_args, encode, make_server, synth_image, workers

pytestmark = pytest.mark.server  # this file's layer (conftest.py: every test declares one)


@pytest.fixture(scope="module")
def ts(tmp_path_factory):
    """One `shapes` worker (batch 1) on its own instance: these tests kill and load it."""
    store = tmp_path_factory.mktemp("rel-store")
    build(archive_args(name="shapes", weights=str(DEMO_WEIGHTS), labels=str(DEMO_LABELS), arch="fcos_tiny",
                       export_path=str(store), build_dir=str(tmp_path_factory.mktemp("rel-build"))))
    with make_server(tmp_path_factory.mktemp("rel-home"), store).running(180) as server:
        yield server


def worker(ts) -> dict:
    return workers(ts)[0]


def bodies(n: int, seed: int = 0, small: bool = False) -> list[tuple[bytes, str]]:
    """A realistic mix: several sizes, JPEG and PNG (``small``: thumbnails, for the soak)."""
    sizes = ([(160, 120), (128, 96), (120, 160), (200, 150)] if small else
             [(320, 240), (240, 320), (160, 120), (400, 300), (224, 224)])
    out = []
    for i in range(n):
        img = synth_image(seed + i % 7, sizes[i % len(sizes)])
        fmt = "PNG" if i % 3 == 0 else "JPEG"
        out.append((encode(img, fmt), f"image/{fmt.lower()}"))
    return out


def predict(ts, session: requests.Session, data: bytes, ctype: str, **headers: str) -> requests.Response:
    return session.post(f"{ts.inference_url}/predictions/shapes", data=data, timeout=120,
                        headers={"Content-Type": ctype, **ts.auth("inference"), **headers})


def test_worker_killed_mid_load_is_replaced(ts):
    """SIGKILL the worker while requests stream in: only requests in flight at that moment may
    fail; TorchServe starts a new worker and every other request succeeds."""
    old = worker(ts)["pid"]
    work = bodies(40, seed=100)
    results: list[tuple[float, float, int]] = []  # (sent, answered, status)
    killed_at: list[float] = []
    eight_answered = threading.Event()

    def client(share: list[tuple[bytes, str]]) -> None:
        with requests.Session() as s:
            for data, ctype in share:
                t0 = time.monotonic()
                r = predict(ts, s, data, ctype)
                results.append((t0, time.monotonic(), r.status_code))
                if len(results) >= 8:
                    eight_answered.set()

    def killer() -> None:
        assert eight_answered.wait(300), "8 requests were never answered"
        killed_at.append(time.monotonic())
        os.kill(old, signal.SIGKILL)

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client, work[0::2]), pool.submit(client, work[1::2]), pool.submit(killer)]
        for f in futures:
            f.result(timeout=300)
    def replaced() -> dict | None:
        w = worker(ts)
        return w if w["status"] == "READY" and w["pid"] != old else None

    new = wait_until(replaced, 120, what="a new READY worker")
    assert new["pid"] != old and new["status"] == "READY" and not psutil.pid_exists(old)
    kill = killed_at[0]
    in_flight = [r for r in results if r[0] <= kill <= r[1]]
    failed = [r for r in results if r[2] != 200]
    print(f"worker {old} killed; replaced by {new['pid']}; {len(results)} requests, {len(failed)} failed, "
          f"{len(in_flight)} in flight at the kill")
    assert len(results) == 40
    assert all(r in in_flight for r in failed), (failed, in_flight)
    assert len(failed) <= 2  # at most one per client thread
    with requests.Session() as s:
        assert predict(ts, s, *bodies(1, seed=7)[0]).status_code == 200


BAD = [
    (b"", "image/jpeg", {}, 400),
    (b"not an image at all", "image/jpeg", {}, 415),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF truncated", "image/jpeg", {}, 415),
    (None, "image/jpeg", {"X-Threshold": "abc"}, 400),
    (None, "image/jpeg", {"X-Response-Format": "xml"}, 400),
]


def test_mixed_good_and_bad_under_concurrency(ts):
    """160 requests, 8 in flight, one in four malformed: every good one gets its detections,
    every bad one its 4xx, and the worker is never replaced."""
    pid = worker(ts)["pid"]
    good = bodies(120, seed=200)
    jobs = []
    for i in range(160):
        if i % 4 == 3:
            data, ctype, headers, code = BAD[(i // 4) % len(BAD)]
            jobs.append((data if data is not None else good[i % len(good)][0], ctype, headers, code))
        else:
            data, ctype = good[i % len(good)]
            jobs.append((data, ctype, {"X-Response-Format": "detailed"}, 200))

    def one(job):
        data, ctype, headers, code = job
        with requests.Session() as s:
            r = predict(ts, s, data, ctype, **headers)
        return code, r.status_code, r.json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, jobs))
    assert [got for _, got, _ in answers] == [want for want, _, _ in answers]
    for want, _, body in answers:
        if want == 200:
            assert isinstance(body["detections"], list) and body["model"] == "shapes"
        else:
            assert body["code"] == want and body["message"]
    assert worker(ts)["pid"] == pid


def test_soak_worker_memory_is_flat(ts):
    """2,000 requests (4 in flight, thumbnails of mixed sizes and formats): the worker's RSS after the run is
    within 5 % of its RSS after a 200-request warm-up."""
    pid = worker(ts)["pid"]
    proc = psutil.Process(pid)
    work = bodies(50, seed=300, small=True)

    def run(n: int) -> list[int]:
        def share(k: int) -> list[int]:
            with requests.Session() as s:
                return [predict(ts, s, *work[(k + 4 * j) % len(work)]).status_code for j in range(n // 4)]
        with ThreadPoolExecutor(4) as pool:
            return [c for codes in pool.map(share, range(4)) for c in codes]

    assert set(run(200)) == {200}
    warm = proc.memory_info().rss
    t0 = time.monotonic()
    codes = run(2000)
    elapsed = time.monotonic() - t0
    after = proc.memory_info().rss
    growth = (after - warm) / warm
    print(f"soak: 2000 requests in {elapsed:.0f} s ({2000 / elapsed:.1f}/s), worker RSS {warm / 2**20:.0f} MiB "
          f"-> {after / 2**20:.0f} MiB ({growth:+.1%})")
    assert codes.count(200) == 2000
    assert worker(ts)["pid"] == pid
    assert growth <= 0.05
