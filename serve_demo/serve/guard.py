"""The management guard: our promises about TorchServe's management API, enforced in front of it.

TorchServe 0.12 (archived upstream) checks a registration URL for a literal ``..`` only, so
``url=%2e%2e/%2e%2e/elsewhere/x.mar`` registers an archive from outside the model store and runs its
handler; it stores ``min_worker=-5`` and starts ``min_worker=1000`` workers; it answers 500 for
client mistakes. The guard listens where clients expect the management API (``:8081``), checks each
request, answers the bad ones itself with a 400 JSON naming the problem, and forwards the rest,
rewritten to their canonical form, to TorchServe's own management listener on a private loopback
port (the key is still TorchServe's: the guard forwards ``Authorization`` untouched).

Checked (after percent-decoding, repeatedly, and path normalisation):

- ``POST /models``: ``url`` names a ``.mar`` file inside the model store (a plain name or a
  ``file://`` URL; no symlink out of it, nothing else); forwarded as the plain file name;
- model names and versions in paths and ``model_name``: ``[A-Za-z0-9][A-Za-z0-9_.-]*``;
- worker counts (``initial_workers``, ``min_worker``, ``max_worker``): whole numbers from 0 to
  ``--max-workers`` (the machine's CPUs, or 4 per GPU), ``min_worker <= max_worker``.

Slow clients: a request whose line and headers have not arrived within ``--header-timeout`` seconds
(of the connection, or of the previous answer on a kept-alive one) gets 408 and is closed; a body
that pauses longer than ``--body-idle-timeout`` closes the connection.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import re
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from serve_demo.core import defaults

log = logging.getLogger("serve_demo.guard")

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
WORKER_PARAMS = ("initial_workers", "min_worker", "max_worker")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host",
              "proxy-connection", "content-length"}


class Refused(ValueError):
    """A client mistake: the 400 answer's message."""


def decoded(value: str, rounds: int = 5) -> str:
    """``value`` percent-decoded until it no longer changes (``%252e`` is ``.`` too)."""
    for _ in range(rounds):
        new = unquote(value)
        if new == value:
            return value
        value = new
    raise Refused(f"{value[:80]!r} is percent-encoded more than {rounds} times")


def check_name(value: str, what: str) -> str:
    name = decoded(value)
    if not NAME.fullmatch(name):
        raise Refused(f"{what} {name[:80]!r} is not a name: letters, digits, '.', '_' and '-', starting with a "
                      "letter or digit")
    return name


def archive_in_store(url: str, store: Path) -> str:
    """The plain file name of the store's ``.mar`` that ``url`` names.

    Raises:
        Refused: anything else (another scheme, a path outside the store, a symlink out, not a file).
    """
    raw = decoded(url)
    if "://" in raw:
        scheme, _, rest = raw.partition("://")
        if scheme.lower() != "file":
            raise Refused(f"url {raw[:120]!r}: only archives in the model store can be registered (no {scheme}:// "
                          "URLs); copy the .mar into the store and give its file name")
        path = Path(rest)
    else:
        path = store / raw
    root = store.resolve()
    real = Path(os.path.realpath(path))
    if real.parent != root:
        raise Refused(f"url {raw[:120]!r} is not an archive in the model store {root}: give the file name of a .mar "
                      "in it (make register NAME=... VERSION=...)")
    if real.suffix != ".mar" or not real.is_file():
        raise Refused(f"url {raw[:120]!r}: {real.name!r} is not a .mar file in the model store")
    return real.name


def check_workers(params: dict[str, str], limit: int) -> None:
    counts = {}
    for key in WORKER_PARAMS:
        if key in params:
            value = params[key].strip()
            if not value.isdigit() or int(value) > limit:
                raise Refused(f"{key}={value[:20]!r}: give a whole number from 0 to {limit} (this machine's worker "
                              "limit; more workers than CPUs only queue)")
            counts[key] = int(value)
    if "min_worker" in counts and "max_worker" in counts and counts["min_worker"] > counts["max_worker"]:
        raise Refused(f"min_worker={counts['min_worker']} is above max_worker={counts['max_worker']}")


def canonical(method: str, target: str, store: Path, limit: int) -> str:
    """The request target to forward, checked and rewritten.

    Raises:
        Refused: the client's mistake, as the 400's message.
    """
    parts = urlsplit(target)
    segments = [s for s in parts.path.split("/") if s]
    if segments and segments[0] == "models":  # /models/NAME[/VERSION[/set-default]]
        segments[1:3] = [check_name(seg, "model name" if i == 0 else "version") for i, seg in enumerate(segments[1:3])]
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    if "model_name" in params:
        params["model_name"] = check_name(params["model_name"], "model_name")
    check_workers(params, limit)
    if method == "POST" and segments == ["models"]:
        if "url" not in params:
            raise Refused("POST /models needs url=FILE.mar (an archive in the model store)")
        params["url"] = archive_in_store(params["url"], store)
    path = "/" + "/".join(segments)
    return path + (f"?{urlencode(params)}" if params else "")


class GuardHandler(BaseHTTPRequestHandler):
    """One management request: refused with a 400, or forwarded and its answer relayed."""

    server_version = "serve-demo-guard"
    protocol_version = "HTTP/1.1"
    header_timeout = defaults.HEADER_TIMEOUT_S  # seconds to send the request line and headers
    timeout = defaults.BODY_IDLE_TIMEOUT_S  # the socket's: longest pause in a body (set from --body-idle-timeout)
    upstream = ("127.0.0.1", 0)
    store = Path(".")
    limit = 1

    def log_message(self, fmt: str, *args) -> None:  # the standard library's writes to stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    def handle_one_request(self) -> None:
        """One request, its line and headers within ``header_timeout`` (a timer shuts the socket's reading)."""
        self._headers_read = False
        timer = threading.Timer(self.header_timeout, self._headers_late)
        timer.daemon = True
        timer.start()
        try:
            super().handle_one_request()
        finally:
            timer.cancel()

    def parse_request(self) -> bool:
        ok = super().parse_request()  # reads the headers
        self._headers_read = True
        return ok

    def _headers_late(self) -> None:
        if self._headers_read:
            return
        log.warning("%s: request headers not complete after %.0f s; 408, connection closed", self.address_string(),
                    self.header_timeout)
        message = (f"the request's line and headers did not arrive within {self.header_timeout:.0f} s; send the "
                   "whole request at once (the connection is closed)")
        body = json.dumps({"code": 408, "type": "request_timeout", "message": message}).encode()
        try:
            self.connection.sendall(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            self.connection.shutdown(socket.SHUT_RDWR)  # the blocked read returns: the handler ends
        except OSError:
            pass

    def _answer(self, code: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _refuse(self, message: str) -> None:
        log.warning("refused %s %s: %s", self.command, self.path[:200], message)
        body = json.dumps({"code": 400, "type": "BadRequestException", "message": message}).encode()
        self._answer(400, body, {"Content-Type": "application/json"})

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        try:
            target = canonical(self.command, self.path, self.store, self.limit)
        except Refused as exc:
            self._refuse(str(exc))
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        conn = http.client.HTTPConnection(*self.upstream, timeout=600)  # registration loads workers
        try:
            conn.request(self.command, target, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as exc:
            self._answer(503, json.dumps({"code": 503, "type": "ServiceUnavailable",
                                          "message": f"TorchServe's management API: {exc}"}).encode(),
                         {"Content-Type": "application/json"})
            return
        finally:
            conn.close()
        self._answer(resp.status, data, {k: v for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP})

    do_GET = do_POST = do_PUT = do_DELETE = do_OPTIONS = _forward


def serve(listen: tuple[str, int], upstream: tuple[str, int], store: Path, limit: int,
          header_timeout: float = defaults.HEADER_TIMEOUT_S,
          body_idle_timeout: float = defaults.BODY_IDLE_TIMEOUT_S) -> ThreadingHTTPServer:
    """The guard's server (not yet serving: call ``serve_forever``)."""
    handler = type("Guard", (GuardHandler,), {"upstream": upstream, "store": store.resolve(), "limit": limit,
                                              "header_timeout": header_timeout, "timeout": body_idle_timeout})
    server = ThreadingHTTPServer(listen, handler)
    server.daemon_threads = True
    return server


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve_demo.serve.guard", description=__doc__.split("\n")[0])
    p.add_argument("--listen", required=True, type=_address, help="HOST:PORT clients use (the management API's)")
    p.add_argument("--upstream", required=True, type=_address, help="TorchServe's own management HOST:PORT")
    p.add_argument("--store", required=True, type=Path, help="the model store")
    p.add_argument("--max-workers", type=int, required=True, help="largest worker count accepted")
    p.add_argument("--header-timeout", type=float, default=defaults.HEADER_TIMEOUT_S,
                   help="seconds a client has to send a request's line and headers, else 408")
    p.add_argument("--body-idle-timeout", type=float, default=defaults.BODY_IDLE_TIMEOUT_S,
                   help="longest pause while a body arrives before the connection is closed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = serve(args.listen, args.upstream, args.store, args.max_workers, args.header_timeout,
                   args.body_idle_timeout)
    log.info("management guard on %s:%d -> TorchServe %s:%d (store %s, workers <= %d)", *args.listen,
             *args.upstream, args.store, args.max_workers)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
