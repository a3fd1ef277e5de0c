"""The same archive on KServe's ``ModelServer``: the maintained second server, same worker core.

    python -m serve_demo.serve.kserve_server --archive model-store/shapes-1.0.mar \\
        --http_port 8080 --grpc_port 7070

It loads the ``.mar`` (or its unpacked folder) with :class:`serve_demo.core.worker.Worker`, the
class the TorchServe handler uses, and answers:

* KServe v1 ``POST /v1/models/NAME:predict`` (``{"instances": [...]}``, or an image as the body);
* Open Inference Protocol v2 over REST (``/v2/health/live|ready``, ``/v2/models/NAME[/ready]``,
  ``/v2/models/NAME/infer``, binary tensor extension included) and gRPC (``--grpc_port``);
* TorchServe's ``POST /predictions/NAME[/VERSION]`` (body, multipart ``data``, the same headers and
  fields), so clients written for TorchServe work unchanged; ``GET /ping``.

Answers, thresholds, formats and error codes are the ones TorchServe gives (same code). Requests
that arrive together are batched up to the archive's ``batchSize`` within ``maxBatchDelay`` ms,
mixed image sizes included; the model runs in one thread beside the event loop.

Safe by default, as ``make serve`` is: HTTP and gRPC listen on ``--bind`` (127.0.0.1) only, and every
call but health, liveness and ``/metrics`` needs a bearer key from ``--key-file`` (TorchServe's
``key_file.json``, new keys at each start; :mod:`serve_demo.serve.keys`). Behind a gateway that
authenticates (the Kubernetes manifest), ``--bind 0.0.0.0 --auth off``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import struct
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from serve_demo.core import defaults
from serve_demo.core.observe import DEFAULT_BUCKETS, MetricSpec
from serve_demo.serve import deadlines, keys
from serve_demo.serve.kserve_versions import ManagementApp, ModelTable
from serve_demo.serve.versions import version_key

log = logging.getLogger(__name__)


_PROMETHEUS: dict[int, dict[str, Any]] = {}


class PrometheusSink:
    """Into ``prometheus_client`` (the KServe server's /metrics) with TorchServe's exposition: the same
    names, labels (``Hostname`` added) and buckets. TorchServe 0.12's Java client writes counters
    without the ``_total`` suffix that Python's ``Counter`` adds, so counters are kept as gauges that
    only grow: ``rate()``/``increase()`` read both alike."""

    def __init__(self, registry: Any = None) -> None:
        import socket

        import prometheus_client

        self.registry = registry or prometheus_client.REGISTRY
        # one set of collectors per registry, shared by every model of the process
        self.made: dict[str, Any] = _PROMETHEUS.setdefault(id(self.registry), {})
        self.client = prometheus_client
        self.hostname = socket.gethostname()

    def __call__(self, spec: MetricSpec, dims: tuple[str, ...], value: float) -> None:
        metric = self.made.get(spec.name)
        if metric is None:
            labels = [*spec.dims, "Hostname"]
            if spec.kind == "counter":
                metric = self.client.Gauge(spec.name, spec.help, labels, registry=self.registry)
            else:
                metric = self.client.Histogram(spec.name, spec.help, labels, registry=self.registry,
                                               buckets=DEFAULT_BUCKETS)
            self.made[spec.name] = metric
        child = metric.labels(*dims, self.hostname)
        child.inc(value) if spec.kind == "counter" else child.observe(value)


@dataclass
class _Pending:
    row: dict
    headers: dict
    future: asyncio.Future


def _grpc_parameter(value: Any) -> Any:
    """One gRPC ``InferParameter`` as a Python value.

    KServe's proto has only ``bool_param``, ``int64_param`` and ``string_param``; the OIP (and
    tritonclient, for every float) also sends ``double_param`` (field 4) and ``uint64_param``
    (field 5), which KServe's message keeps as unknown fields: read those here, or a threshold
    sent as 0.3 would be dropped without a word.
    """
    which = value.WhichOneof("parameter_choice")
    if which:
        return getattr(value, which)
    from google.protobuf.unknown_fields import UnknownFieldSet

    for field in UnknownFieldSet(value):
        if field.field_number == 4 and field.wire_type == 1:  # double, 64-bit little-endian
            return struct.unpack("<d", struct.pack("<Q", field.data))[0]
        if field.field_number == 5 and field.wire_type == 0:  # uint64 varint
            return int(field.data)
    return None


def _parameters(params: Any) -> dict:
    """v2 ``parameters`` as a plain dict (gRPC hands over ``InferParameter`` messages)."""
    if not params:
        return {}
    return {key: _grpc_parameter(value) if hasattr(value, "WhichOneof") else value
            for key, value in dict(params).items()}


def envelope_from_infer_request(request: Any) -> dict:
    """A KServe ``InferRequest`` (REST v2 or gRPC) as the v2 envelope the worker core reads."""
    inputs = []
    for tensor in request.inputs:
        if tensor.datatype != "BYTES":
            inputs.append({"name": tensor.name, "datatype": tensor.datatype, "data": []})
            continue
        data = [bytes(v) if isinstance(v, (bytes, bytearray, memoryview)) else v
                for v in tensor.as_numpy().ravel().tolist()]
        inputs.append({"name": tensor.name, "datatype": "BYTES", "shape": list(tensor.shape), "data": data})
    envelope: dict = {"inputs": inputs, "parameters": _parameters(request.parameters)}
    if request.id:
        envelope["id"] = request.id
    return envelope


def build_model_class():
    """The ``kserve.Model`` subclass (built lazily: importing kserve parses ``sys.argv``)."""
    import kserve
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    from serve_demo.core.envelopes import OUTPUT_NAME
    from serve_demo.core.layout import available_cpus
    from serve_demo.core.loader import open_archive
    from serve_demo.core.schema import ImageAnswer
    from serve_demo.core.worker import Worker

    class RequestRefused(InvalidInput):
        """A client mistake with the HTTP status TorchServe answers (gRPC: INVALID_ARGUMENT)."""

        def __init__(self, status: int, payload: dict) -> None:
            super().__init__(payload.get("message", "bad request"))
            self.status, self.payload = status, payload

    class DetectorModel(kserve.Model):
        """An archive's detector as a KServe model; batches requests like TorchServe's frontend."""

        def __init__(self, archive: Path, device: str = "cpu", threads: int | None = None) -> None:
            self.files, self.device = open_archive(archive), device
            # one process serves every request here: the archive's threads, else every CPU
            self.threads = threads if threads is not None else (
                self.files.handler.threads or available_cpus())
            self.detector: Worker | None = None
            super().__init__(self.files.name)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detector")
            self._queue: asyncio.Queue | None = None
            self.batch_size, self.max_delay = 1, 0.0

        def load(self) -> bool:
            """Load the archive once; ``ready`` turns True (the v2 ready endpoints read it)."""
            # built in the thread that will run it: torch's thread settings and OpenMP pool are per
            # thread, and a model built in one thread and run in another answered 1.7x slower here
            self.detector = self._pool.submit(Worker, self.files, self.device, self.threads).result()
            self.detector.attach_metrics(PrometheusSink())  # the same names as TorchServe's :8082, on /metrics
            config = self.detector.files.config
            self.version = self.detector.version
            self.batch_size = max(1, int(config.get("batchSize", 1)))
            self.max_delay = max(0, int(config.get("maxBatchDelay", 0))) / 1000
            self.ready = True
            return self.ready

        def get_input_types(self) -> list[dict]:
            return [{"name": "images", "datatype": "BYTES", "shape": [-1]}]

        def get_output_types(self) -> list[dict]:
            return [{"name": OUTPUT_NAME, "datatype": "BYTES", "shape": [-1]}]

        async def handle_row(self, row: dict, headers: dict):
            """One request through the batcher; its :class:`serve_demo.core.worker.Answer`."""
            if self._queue is None:
                self._queue = asyncio.Queue()
                asyncio.get_running_loop().create_task(self._batcher())
            future = asyncio.get_running_loop().create_future()
            await self._queue.put(_Pending(row, headers, future))
            return await future

        async def _batcher(self) -> None:
            loop = asyncio.get_running_loop()
            while True:
                batch = [await self._queue.get()]
                deadline = time.monotonic() + self.max_delay
                while len(batch) < self.batch_size:
                    timeout = deadline - time.monotonic()
                    if timeout <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                    except asyncio.TimeoutError:
                        break
                try:
                    answers = await loop.run_in_executor(
                        self._pool, self.detector.handle, [p.row for p in batch], [p.headers for p in batch])
                except Exception as exc:  # the model failed: every request of the batch learns it
                    log.exception("batch of %d failed", len(batch))
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    continue
                for p, answer in zip(batch, answers):
                    if not p.future.done():
                        p.future.set_result(answer)

        async def predict(self, payload: Any, headers: dict | None = None) -> Any:
            """v1 (JSON or an image body) and v2 (REST, gRPC) requests; 4xx as :class:`RequestRefused`."""
            headers = dict(headers or {})
            v2 = isinstance(payload, InferRequest)
            row = {"body": envelope_from_infer_request(payload) if v2 else payload}
            answer = await self.handle_row(row, headers)
            if answer.status != 200:
                raise RequestRefused(answer.status, answer.payload)
            if not v2:  # a drawn image answers a v1 request as JSON (base64), like the envelopes
                return answer.payload.as_json() if isinstance(answer.payload, ImageAnswer) else answer.payload
            out = answer.payload["outputs"][0]
            return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name,
                                 model_version=self.version, from_grpc=payload.from_grpc,
                                 # raw output contents, as Triton answers over gRPC (tritonclient's
                                 # reader of bytes_contents fails under numpy 2)
                                 use_binary_outputs=payload.from_grpc,
                                 infer_outputs=[InferOutput(name=out["name"], shape=out["shape"],
                                                            datatype="BYTES", data=out["data"])])

    return DetectorModel, RequestRefused


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 (TorchServe's ``max_request_size``):
    refused on its ``Content-Length`` before it is read, or counted as it arrives when chunked."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.limit:
                return await self._refuse(send, int(length))
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True  # no length given (chunked): read it, up to the limit
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self._refuse(send, size)
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send, size: int) -> None:
        from serve_demo.core import schema

        body = schema.dumps(schema.error_payload(413, "request_too_large", f"the body is {size} bytes; at most "
                                                 f"{self.limit} (max_request_size): send a smaller image"))
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def add_routes(app, table: ModelTable, refused_cls, max_request_size: int = 0) -> None:
    """TorchServe's ``/predictions[/VERSION]`` and ``/ping``, OIP's versioned routes (KServe 0.21 has none)
    beside KServe's own, and 4xx answers that carry the same JSON body and status as TorchServe's."""
    from serve_demo.core import schema

    async def refused(request: Request, exc: Exception) -> Response:
        return JSONResponse(exc.payload, status_code=exc.status)

    app.add_exception_handler(refused_cls, refused)
    if max_request_size:
        app.add_middleware(BodyLimit, limit=max_request_size)

    async def ping() -> Response:
        ready = table.ready()
        return JSONResponse({"status": "Healthy" if ready else "Unhealthy"}, status_code=200 if ready else 503)

    def lookup(name: str, version: str | None) -> tuple[Any, Response | None]:
        model = table.get(name, version)
        if model is not None:
            return model, None
        what = f"{name} version {version}" if version else name
        message = f"model {what} is not served here; served: {table.served() or 'none'}"
        return None, JSONResponse({**schema.error_payload(404, "model_not_found", message), "error": message},
                                  status_code=404)

    async def v2_metadata(name: str, version: str | None = None) -> Response:
        """OIP v2 model metadata of one version (the default without ``version``), with every loaded version."""
        model, missing = lookup(name, version)
        if missing:
            return missing
        return JSONResponse({"name": name, "versions": sorted(table.models[name], key=version_key), "platform": "",
                             "inputs": model.get_input_types(), "outputs": model.get_output_types()})

    async def v2_ready(name: str, version: str) -> Response:
        """OIP v2 readiness of one version."""
        model, missing = lookup(name, version)
        if missing:
            return missing
        return JSONResponse({"name": name, "ready": bool(model.ready)}, status_code=200 if model.ready else 503)

    async def predictions(request: Request, name: str, version: str | None = None) -> Response:
        """TorchServe's route: an image as the body or multipart field, or a v1/v2 envelope."""
        model, missing = lookup(name, version)
        if missing:
            return missing
        headers = dict(request.headers)
        ctype = headers.get("content-type", "")
        if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            form = await request.form()
            row = {k: (await v.read() if hasattr(v, "read") else v) for k, v in form.items()}
        else:
            row = {"body": await request.body()}
        answer = await model.handle_row(row, headers)
        return Response(answer.body, status_code=answer.status, media_type=answer.content_type)

    async def v2_infer(request: Request, name: str, version: str | None = None) -> Response:
        """OIP v2 REST inference, read by the worker core (JSON or the binary tensor extension).

        Registered before KServe's own route for the same path: KServe 0.21 turns binary BYTES
        elements into UTF-8 text before the model sees them, which fails for image files.
        """
        model, missing = lookup(name, version)
        if missing:
            return missing
        answer = await model.handle_row({"body": await request.body()}, dict(request.headers))
        return Response(answer.body, status_code=answer.status, media_type=answer.content_type)

    app.add_api_route("/ping", ping, methods=["GET"])
    app.add_api_route("/predictions/{name}", predictions, methods=["POST", "PUT"])
    app.add_api_route("/predictions/{name}/{version}", predictions, methods=["POST", "PUT"])
    app.add_api_route("/v2/models/{name}/infer", v2_infer, methods=["POST"])
    app.add_api_route("/v2/models/{name}/versions/{version}/infer", v2_infer, methods=["POST"])
    app.add_api_route("/v2/models/{name}/versions/{version}", v2_metadata, methods=["GET"])
    app.add_api_route("/v2/models/{name}", v2_metadata, methods=["GET"])  # KServe's lists no versions
    app.add_api_route("/v2/models/{name}/versions/{version}/ready", v2_ready, methods=["GET"])


def grpc_server(host: str, key_set: keys.Keys | None, table: ModelTable, **kwargs: Any) -> Any:
    """KServe's gRPC server listening on ``host`` (KServe 0.21 always takes ``[::]``), keys checked,
    versions answered from ``table`` (KServe's servicer ignores ``model_version``).

    The same servicer, interceptors and message limits as :class:`kserve.protocol.grpc.server.GRPCServer`;
    ``kwargs`` are its constructor's.
    """
    from concurrent import futures

    import grpc
    from grpc import aio
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.grpc.servicer import InferenceServicer
    from kserve.protocol.infer_type import InferRequest

    class VersionedServicer(InferenceServicer):
        """``ModelInfer``, ``ModelReady`` and ``ModelMetadata`` with a version: that version, from the table."""

        async def _version(self, name: str, version: str, context) -> Any:
            model = table.get(name, version)
            if model is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"model {name} version {version} is not served here; "
                                    f"served: {table.served() or 'none'}")
            return model

        async def ModelInfer(self, request, context):
            if not request.model_version:
                return await super().ModelInfer(request, context)
            model = await self._version(request.model_name, request.model_version, context)
            self.validate_grpc_request(request)
            headers = {k: v for k, v in context.invocation_metadata() if not k.startswith("grpc-")}
            response = await model.predict(InferRequest.from_grpc(request), headers)
            return response.to_grpc()

        async def ModelReady(self, request, context):
            if not request.version:
                return await super().ModelReady(request, context)
            model = await self._version(request.name, request.version, context)
            return pb.ModelReadyResponse(ready=bool(model.ready))

        async def ModelMetadata(self, request, context):
            if not request.version:
                return await super().ModelMetadata(request, context)
            model = await self._version(request.name, request.version, context)
            versions = sorted(table.models[request.name], key=version_key)
            return pb.ModelMetadataResponse(name=request.name, versions=versions, platform="",
                                            inputs=model.get_input_types(), outputs=model.get_output_types())

    class BoundGRPCServer(GRPCServer):
        async def start(self, max_workers: int) -> None:
            checks = (keys.grpc_interceptor(key_set),) if key_set else ()
            self._server = aio.server(
                futures.ThreadPoolExecutor(max_workers=max_workers),
                interceptors=(*checks, LoggingInterceptor(), ExceptionToStatusInterceptor()),
                options=[("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                         ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length"))])
            grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
                VersionedServicer(self._data_plane, self._model_repository_extension), self._server)
            address = f"[{host}]:{self._port}" if ":" in host else f"{host}:{self._port}"
            if not self._server.add_insecure_port(address):
                raise SystemExit(f"kserve_server: gRPC cannot listen on {address} (port taken?)")
            log.info("gRPC (OIP v2) on %s, keys %s", address, "required" if key_set else "off")
            await self._server.start()
            await self._server.wait_for_termination()

    return BoundGRPCServer(**kwargs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", action="append", required=True,
                   help="a .mar or its unpacked folder (repeat for several models and versions; a model's first "
                        "archive is its default version)")
    p.add_argument("--management-port", type=int, default=0,
                   help="serve TorchServe's management API for versions (register, set-default, unregister, "
                        "describe) on 127.0.0.1:PORT, with the management key (default 0: none)")
    p.add_argument("--model-store", default=None,
                   help="the folder registrations may load archives from (default: the first archive's folder)")
    p.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:0 when CUDA is available)")
    p.add_argument("--max-request-size", type=int, default=defaults.MAX_REQUEST_SIZE,
                   help=f"largest request body in bytes, HTTP and gRPC (default {defaults.MAX_REQUEST_SIZE}, "
                        "as TorchServe's max_request_size)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the archive's handler.threads, else every CPU this process may use)")
    p.add_argument("--header-timeout", type=float, default=defaults.HEADER_TIMEOUT_S,
                   help=f"seconds a client has to send a request's line and headers, else 408 (default "
                        f"{defaults.HEADER_TIMEOUT_S:.0f})")
    p.add_argument("--body-idle-timeout", type=float, default=defaults.BODY_IDLE_TIMEOUT_S,
                   help=f"longest pause while a body arrives before the connection is closed (default "
                        f"{defaults.BODY_IDLE_TIMEOUT_S:.0f})")
    p.add_argument("--bind", default=defaults.BIND,
                   help=f"address HTTP and gRPC listen on (default {defaults.BIND}; 0.0.0.0 publishes them)")
    p.add_argument("--auth", default="keys", choices=("keys", "off"),
                   help="keys (default): bearer keys from --key-file on every call but health and /metrics; "
                        "off: no keys (behind a gateway that authenticates)")
    p.add_argument("--key-file", default="key_file.json",
                   help="where the keys are written at each start, TorchServe's format (default: key_file.json "
                        "in the current folder, as TorchServe)")
    args, _ = p.parse_known_args(argv)  # kserve reads its own flags (--http_port, --grpc_port, ...)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not any(a.startswith("--grpc_max_receive_message_length") for a in sys.argv):
        # kserve reads sys.argv when imported: cap gRPC messages like HTTP bodies
        sys.argv += ["--grpc_max_receive_message_length", str(args.max_request_size)]

    import torch
    from kserve import ModelServer
    from kserve import model_server as kserve_model_server
    from kserve.model_server import app

    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    model_cls, refused_cls = build_model_class()
    table = ModelTable()
    for archive in args.archive:
        model = model_cls(Path(archive), device, args.threads)
        model.load()
        if table.get(model.name, model.version) is not None:
            raise SystemExit(f"kserve_server: {archive} holds {model.name} {model.version}, given twice; give each "
                             "version once")
        table.add(model, Path(archive).name, startup=True)
    add_routes(app, table, refused_cls, args.max_request_size)
    key_set = keys.write_key_file(args.key_file) if args.auth == "keys" else None
    if key_set:
        app.add_middleware(keys.BearerKeys, keys=key_set)  # outside the body limit: 401 before 413
        log.info("token authorization on: keys in %s", Path(args.key_file).resolve())
    else:
        log.warning("token authorization off (--auth off): only behind a gateway that authenticates")
    http = deadlines.protocol(args.header_timeout, args.body_idle_timeout)
    grpc_wanted = kserve_model_server.args.enable_grpc
    store = Path(args.model_store or Path(args.archive[0]).parent)

    async def load(archive: Path) -> Any:
        model = model_cls(archive, device, args.threads)
        await asyncio.get_running_loop().run_in_executor(None, model.load)
        return model

    management = management_server(ManagementApp(table, store, load), args.management_port, key_set,
                                   http) if args.management_port else None

    class Server(ModelServer):
        def setup_event_loop(self) -> None:
            """Give KServe's uvicorn our address and slow-client timers, and start our gRPC server (called
            after the REST server is built, before anything runs)."""
            super().setup_event_loop()
            rest = getattr(self, "_rest_server", None)
            if rest is None:
                raise SystemExit("kserve_server: KServe's REST server is not where kserve 0.21 keeps it "
                                 "(ModelServer._rest_server); run one worker, or pin kserve==0.21.0")
            rest.config.http, rest.config.host = http, args.bind
            if grpc_wanted:
                self._grpc_server = grpc_server(
                    args.bind, key_set, table, port=self.grpc_port, data_plane=self.dataplane,
                    model_repository_extension=self.model_repository_extension,
                    kwargs=vars(kserve_model_server.args), grace_period=self.grace_period)
                self.servers.append(self._grpc_server.start(self.max_threads))
            if management is not None:
                self.servers.append(management.serve())
                log.info("management API (versions) on 127.0.0.1:%d, management key %s", args.management_port,
                         "required" if key_set else "off")

        def stop(self, sig: int) -> None:
            if management is not None:
                management.should_exit = True
            super().stop(sig)

    server = Server(enable_grpc=False)  # KServe's own gRPC server would listen on [::]
    table.repository = server.registered_models
    server.start([table.get(name) for name in table.models])
    return 0


def management_server(app: ManagementApp, port: int, key_set: keys.Keys | None, http: Any) -> Any:
    """A uvicorn server for the management API on loopback (always: as TorchServe's ``:8081``), keyed.

    It leaves the signals to KServe's REST server (KServe's ``stop`` then stops it).
    """
    import contextlib

    import uvicorn

    asgi = keys.BearerKeys(app, key_set, kind_of=lambda path: "management") if key_set else app

    class Quiet(uvicorn.Server):
        def capture_signals(self):
            return contextlib.nullcontext()

    return Quiet(uvicorn.Config(asgi, host="127.0.0.1", port=port, http=http, lifespan="off", log_level="warning",
                                access_log=False))


if __name__ == "__main__":
    sys.exit(main())
