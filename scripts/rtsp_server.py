#!/usr/bin/python3
"""A local RTSP server for clips: what a camera looks like to ``serve_demo stream``.

GStreamer's RTSP server (Debian: ``gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good python3-gi``;
run with the system's ``/usr/bin/python3``, which has ``gi``). Each ``--mount NAME=CLIP.mkv`` (MJPEG in
Matroska, as ``serve_demo clip OUT.mkv`` writes) is streamed at ``rtsp://HOST:PORT/NAME`` as RTP/JPEG, in
real time, shared by every client like a camera. When a clip ends the clients see the stream end; a
client that connects again (``serve_demo stream`` reconnects) gets the clip from its start.

    /usr/bin/python3 scripts/rtsp_server.py --port 8554 --mount cam1=build/stream/shapes.mkv

Prints ``ready rtsp://HOST:PORT`` once it listens; stops on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

try:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer
except (ImportError, ValueError) as exc:
    sys.exit(f"rtsp_server: GStreamer's RTSP server is missing ({exc}); install it with "
             "sudo apt-get install gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good python3-gi")


def launch(clip: Path) -> str:
    """The media pipeline: the clip's JPEG frames, paced by their timestamps, as RTP/JPEG (RFC 2435)."""
    return f'( filesrc location="{clip}" ! matroskademux ! rtpjpegpay name=pay0 pt=26 )'


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8554)
    p.add_argument("--mount", action="append", required=True, metavar="NAME=CLIP.mkv")
    args = p.parse_args()
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address(args.host)
    server.set_service(str(args.port))
    mounts = server.get_mount_points()
    for item in args.mount:
        name, _, clip = item.partition("=")
        path = Path(clip).resolve()
        if not name or not path.is_file():
            sys.exit(f"rtsp_server: --mount {item}: expected NAME=CLIP with an existing clip")
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(launch(path))
        factory.set_shared(True)
        mounts.add_factory(f"/{name}", factory)
    if server.attach(None) == 0:
        sys.exit(f"rtsp_server: cannot listen on {args.host}:{args.port}")
    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    print(f"ready rtsp://{args.host}:{server.get_bound_port()}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
