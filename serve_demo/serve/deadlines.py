"""Slow clients on the listeners we own: a deadline for a request's headers, an idle limit for its body.

uvicorn (the KServe server's and the UI's HTTP server) keeps a connection open as long as the client
sends nothing, or one header byte every few seconds: forty such connections cost nothing to send and
each holds a socket, a parser and a slot of any ``limit_concurrency``. :func:`protocol` is uvicorn's
httptools protocol with two more timers, as nginx's ``client_header_timeout`` and
``client_body_timeout``:

- the request line and headers must arrive within ``header_timeout`` seconds of the connection (or of
  the request's first byte, on a kept-alive connection); else the client gets ``408`` and the
  connection is closed;
- while the body arrives, a pause longer than ``body_idle_timeout`` closes the connection (the app
  sees a disconnect). A slow but steady upload is not cut.

Once a request is read, no timer runs: inference may take as long as it takes.
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serve_demo.core import defaults

log = logging.getLogger("serve_demo.deadlines")


class DeadlineProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that cuts clients slow to send their request (see the module's docstring)."""

    header_timeout: float = defaults.HEADER_TIMEOUT_S
    body_idle_timeout: float = defaults.BODY_IDLE_TIMEOUT_S

    _phase: str = "idle"  # "headers", "body" or "idle" (nothing to wait for: answering, or kept alive)
    _timer: asyncio.TimerHandle | None = None
    _last_read: float = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wait("headers", self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._phase != "headers":  # a kept-alive connection's next request: its headers' deadline starts now
            self._wait("headers", self.header_timeout)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._wait("body", self.body_idle_timeout)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._cancel()

    def _wait(self, phase: str, seconds: float) -> None:
        self._cancel()
        self._phase, self._last_read = phase, self.loop.time()
        self._timer = self.loop.call_later(seconds, self._expired)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._phase = None, "idle"

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._phase == "body":
            if self.flow.read_paused:  # the app is behind, not the client
                self._last_read = self.loop.time()
            idle = self.loop.time() - self._last_read
            if idle < self.body_idle_timeout:  # still arriving: wait for the rest of the idle limit
                self._timer = self.loop.call_later(self.body_idle_timeout - idle, self._expired)
                return
            log.warning("%s: no body bytes for %.0f s; connection closed", _peer(self.client), self.body_idle_timeout)
            self.transport.close()
            return
        log.warning("%s: request headers not complete after %.0f s; 408, connection closed", _peer(self.client),
                    self.header_timeout)
        message = (f"the request's line and headers did not arrive within {self.header_timeout:.0f} s; send the "
                   "whole request at once (the connection is closed)")
        body = json.dumps({"code": 408, "type": "request_timeout", "message": message}).encode()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"


def protocol(header_timeout: float = defaults.HEADER_TIMEOUT_S,
             body_idle_timeout: float = defaults.BODY_IDLE_TIMEOUT_S) -> type[DeadlineProtocol]:
    """The protocol class to give uvicorn (``uvicorn.Config(http=...)``) with these limits."""
    return type("DeadlineProtocol", (DeadlineProtocol,), {"header_timeout": header_timeout,
                                                          "body_idle_timeout": body_idle_timeout})
