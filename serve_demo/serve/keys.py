"""Bearer keys on the KServe server, in TorchServe's ``key_file.json`` format.

TorchServe writes an ``inference`` and a ``management`` key to ``key_file.json`` when it starts and
refuses calls without ``Authorization: Bearer KEY``. The KServe server does the same, so that
``make key``, :func:`serve_demo.serve.management.read_key` and every client of ours work unchanged:

- :func:`write_key_file` makes two new random keys at each start (mode 0600);
- :class:`BearerKeys` (ASGI) answers ``401`` with a JSON body and ``WWW-Authenticate: Bearer`` to an
  HTTP call without the right key; health, liveness and ``/metrics`` stay open (probes and
  Prometheus carry no key, as TorchServe's metrics port does not);
- :class:`GrpcKeys` (a ``grpc.aio`` interceptor) answers ``UNAUTHENTICATED`` to a gRPC call without
  ``authorization: Bearer KEY`` metadata; ``ServerLive`` and ``ServerReady`` stay open.

Model loading and unloading (OIP's repository extension, HTTP and gRPC) takes the management key,
everything else the inference key. Behind a gateway that authenticates (Kubernetes), turn it off
with ``--auth off``.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KINDS = ("inference", "management")
OPEN_PATHS = frozenset({"/", "/ping", "/v2/health/live", "/v2/health/ready", "/metrics"})
OPEN_GRPC = frozenset({"ServerLive", "ServerReady"})
MANAGEMENT_GRPC = frozenset({"RepositoryModelLoad", "RepositoryModelUnload"})


@dataclass(frozen=True)
class Keys:
    """The two keys of one server run."""

    inference: str
    management: str

    def needed(self, kind: str) -> str:
        return self.management if kind == "management" else self.inference

    def accepts(self, kind: str, authorization: str | None) -> bool:
        """Whether an ``Authorization`` value carries the ``kind`` key (compared in constant time)."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        return hmac.compare_digest(token.strip().encode(), self.needed(kind).encode())


def write_key_file(path: str | Path) -> Keys:
    """New random keys, written to ``path`` (TorchServe's format, mode 0600, replacing an old file)."""
    path = Path(path)
    keys = Keys(inference=secrets.token_urlsafe(24), management=secrets.token_urlsafe(24))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({kind: {"key": keys.needed(kind)} for kind in KINDS}, f, indent=2)
    os.replace(tmp, path)
    return keys


def kind_of_path(path: str) -> str | None:
    """Which key an HTTP path takes: None (open), ``management`` or ``inference``."""
    if path in OPEN_PATHS:
        return None
    if path.startswith("/v2/repository/"):
        return "management"
    return "inference"


def _refusal(kind: str, given: bool) -> bytes:
    what = "a wrong key" if given else "no key"
    message = (f"this call needs the {kind} key and carried {what}: send `Authorization: Bearer KEY` with the "
               f"{kind} key of the server's key_file.json (`make key` prints the inference key)")
    return json.dumps({"code": 401, "type": "unauthorized", "message": message}).encode()


class BearerKeys:
    """ASGI middleware: HTTP calls without the right bearer key get 401 (see the module's docstring)."""

    def __init__(self, app: Any, keys: Keys, kind_of: Any = None) -> None:
        self.app, self.keys = app, keys
        self.kind_of = kind_of or kind_of_path  # path -> the key it takes (None: open)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        kind = self.kind_of(scope.get("path", ""))
        if kind is None:
            return await self.app(scope, receive, send)
        raw = dict(scope.get("headers") or []).get(b"authorization")
        authorization = raw.decode("latin-1") if raw is not None else None
        if self.keys.accepts(kind, authorization):
            return await self.app(scope, receive, send)
        body = _refusal(kind, authorization is not None)
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b'Bearer realm="serve-demo"')]})
        await send({"type": "http.response.body", "body": body})


def grpc_interceptor(keys: Keys) -> Any:
    """A ``grpc.aio.ServerInterceptor`` refusing calls without the right key (``UNAUTHENTICATED``)."""
    import grpc

    class GrpcKeys(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            method = details.method.rsplit("/", 1)[-1]
            handler = await continuation(details)
            if method in OPEN_GRPC or handler is None:
                return handler
            kind = "management" if method in MANAGEMENT_GRPC else "inference"
            authorization = dict(details.invocation_metadata or ()).get("authorization")
            if keys.accepts(kind, authorization):
                return handler
            message = json.loads(_refusal(kind, authorization is not None))["message"]

            async def refuse(request, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

            if handler.request_streaming or handler.response_streaming:
                async def refuse_stream(request_iterator, context):
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
                make = {(True, True): grpc.stream_stream_rpc_method_handler,
                        (True, False): grpc.stream_unary_rpc_method_handler,
                        (False, True): grpc.unary_stream_rpc_method_handler}[
                    (handler.request_streaming, handler.response_streaming)]
                return make(refuse_stream if handler.request_streaming else refuse,
                            request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
            return grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=handler.request_deserializer,
                                                       response_serializer=handler.response_serializer)

    return GrpcKeys()
