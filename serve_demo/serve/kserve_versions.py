"""Versions on the KServe server: several archives of one model side by side, and the management API.

KServe 0.21 keeps one model per name (its ``ModelRepository``) and answers versioned OIP routes with
``NotImplementedError``. The KServe server of this project holds every loaded version in a
:class:`ModelTable`; KServe's repository always holds each model's *default* version, so KServe's own
routes (v1, unversioned v2, gRPC without a version) answer with it, and the project's routes
(``/predictions/NAME/VERSION``, ``/v2/models/NAME/versions/V[/ready|/infer]``, gRPC with
``model_version``) pick a version from the table.

:class:`ManagementApp` answers the part of TorchServe's management API that ``make register /
promote / rollback / versions``, the UI, the evaluator and the start-up from ``registry.json`` use
(:class:`serve_demo.serve.management.Management`), with TorchServe's JSON shapes:

=========================================  ==================================================
``GET /models``                            every model and its default's archive
``GET /models/NAME[/VERSION|/all]``        version descriptions (``modelVersion``, ``modelUrl``,
                                           ``batchSize``, ``workers``: one READY worker)
``POST /models?url=FILE.mar``              load an archive of the model store (409 if loaded)
``PUT /models/NAME/VERSION/set-default``   the version ``/predictions/NAME`` answers with
``DELETE /models/NAME[/VERSION]``          unload (the default only when it is the last one)
=========================================  ==================================================

Every request passes the management guard's checks first (:func:`serve_demo.serve.guard.canonical`:
archives of the store only after percent-decoding and normalisation, names, worker counts within the
machine), so both servers keep the same promises and the same messages. Scaling itself is then refused
with a 400: the KServe server runs each version in one thread of one process; scale it with replicas.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from serve_demo.core.layout import available_cpus

from .guard import Refused, canonical
from .versions import archive_identity, version_key

log = logging.getLogger(__name__)


class ModelTable:
    """Every loaded version of every model; KServe's repository mirrors the defaults."""

    def __init__(self, repository: Any = None) -> None:
        self.repository = repository  # kserve.ModelRepository, set once the server exists
        self.models: dict[str, dict[str, Any]] = {}  # name -> version -> model
        self.defaults: dict[str, str] = {}
        self.archives: dict[tuple[str, str], str] = {}  # (name, version) -> archive file name
        self.loaded_at_startup: set[tuple[str, str]] = set()

    def add(self, model: Any, archive: str, startup: bool = False) -> None:
        """A loaded model; the first version of a name becomes its default (as TorchServe does)."""
        name, version = model.name, str(model.version)
        self.models.setdefault(name, {})[version] = model
        self.archives[(name, version)] = archive
        if startup:
            self.loaded_at_startup.add((name, version))
        if name not in self.defaults:
            self.set_default(name, version)

    def get(self, name: str, version: str | None = None) -> Any:
        """The model answering ``name`` (its default) or ``name``/``version``; None when not loaded."""
        versions = self.models.get(name, {})
        return versions.get(version if version is not None else self.defaults.get(name, ""))

    def set_default(self, name: str, version: str) -> None:
        model = self.get(name, version)
        if model is None:
            raise KeyError(f"{name} {version}")
        self.defaults[name] = version
        if self.repository is not None:
            self.repository.update(model)  # KServe's routes now answer with it

    def remove(self, name: str, version: str) -> Any:
        """Unload a version; the default only when it is the last one (TorchServe's rule).

        Raises:
            KeyError: not loaded. Refused: the default while others are loaded.
        """
        versions = self.models.get(name, {})
        if version not in versions:
            raise KeyError(f"{name} {version}")
        if version == self.defaults.get(name) and len(versions) > 1:
            others = ", ".join(sorted((v for v in versions if v != version), key=version_key))
            raise Refused(f"{name} {version} is the default version: make another one the default first "
                          f"(PUT /models/{name}/VERSION/set-default; loaded: {others})")
        model = versions.pop(version)
        self.archives.pop((name, version), None)
        if not versions:
            del self.models[name]
            self.defaults.pop(name, None)
            if self.repository is not None and self.repository.get_model(name) is model:
                self.repository.models.pop(name, None)
        return model

    def all(self) -> list[Any]:
        return [m for versions in self.models.values() for m in versions.values()]

    def ready(self) -> bool:
        return bool(self.models) and all(m.ready for m in self.all())

    def served(self) -> str:
        """``name version, ...`` (for 404 messages)."""
        return ", ".join(f"{n} {v}" for n, versions in self.models.items()
                         for v in sorted(versions, key=version_key))

    def describe(self, name: str, version: str) -> dict:
        """TorchServe's description of one version (the keys our tools read)."""
        model = self.models[name][version]
        config = getattr(getattr(model, "files", None), "config", {}) or {}
        return {"modelName": name, "modelVersion": version, "modelUrl": self.archives.get((name, version), ""),
                "runtime": "python", "minWorkers": 1, "maxWorkers": 1,
                "batchSize": int(config.get("batchSize", getattr(model, "batch_size", 1))),
                "maxBatchDelay": int(config.get("maxBatchDelay", 0)),
                "loadedAtStartup": (name, version) in self.loaded_at_startup,
                "workers": [{"id": f"{name}-{version}", "status": "READY" if model.ready else "UNLOADING",
                             "pid": os.getpid(), "gpu": str(getattr(model, "device", "cpu")).startswith("cuda")}]}


def _error(code: int, kind: str, message: str) -> tuple[int, Any]:
    return code, {"code": code, "type": kind, "message": message}


class ManagementApp:
    """ASGI: TorchServe's management API over a :class:`ModelTable` (see the module's docstring).

    ``load`` builds and loads the model of an archive path (in a thread: it takes seconds) and returns it.
    """

    def __init__(self, table: ModelTable, store: Path, load: Callable[[Path], Awaitable[Any]],
                 max_workers: int | None = None) -> None:
        self.table, self.store, self.load = table, Path(store).resolve(), load
        self.max_workers = max_workers or available_cpus()  # what the guard accepts in front of TorchServe

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # served with lifespan="off"
            return
        more = True
        while more:  # no call takes a body: read and drop it
            message = await receive()
            more = message.get("more_body", False) and message["type"] == "http.request"
        raw = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        try:
            target = canonical(scope["method"], raw + (f"?{query}" if query else ""), self.store, self.max_workers)
            code, body = await self.route(scope["method"], target)
        except Refused as exc:
            log.warning("refused %s %s: %s", scope["method"], raw[:200], exc)
            code, body = _error(400, "BadRequestException", str(exc))
        data = json.dumps(body, indent=2).encode()
        await send({"type": "http.response.start", "status": code,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    async def route(self, method: str, target: str) -> tuple[int, Any]:
        """One checked request (``target`` from :func:`canonical`): ``(status, JSON body)``."""
        path, _, query = target.partition("?")
        params = dict(parse_qsl(query, keep_blank_values=True))
        segments = [s for s in path.split("/") if s]
        if not segments or segments[0] != "models" or len(segments) > 4:
            return _error(404, "ResourceNotFoundException", f"no management route {method} {path}: this server "
                          "answers /models[/NAME[/VERSION|/all]] and /models/NAME/VERSION/set-default")
        name, version = (segments[1:3] + [None, None])[:2]
        if method == "GET" and name is None:
            archives, defaults = self.table.archives, self.table.defaults
            return 200, {"models": [{"modelName": n, "modelUrl": archives.get((n, defaults[n]), "")}
                                    for n in sorted(self.table.models)]}
        if method == "POST" and name is None:
            return await self.register(params)
        if name not in self.table.models:
            return _error(404, "ModelNotFoundException", f"Model not found: {name} (loaded: "
                          f"{self.table.served() or 'none'})")
        if version not in (None, "all") and version not in self.table.models[name]:
            return _error(404, "ModelVersionNotFoundException", f"Model version: {version} does not exist for model: "
                          f"{name} (loaded: {', '.join(sorted(self.table.models[name], key=version_key))})")
        if method == "GET" and len(segments) <= 3:
            versions = (sorted(self.table.models[name], key=version_key) if version == "all"
                        else [version or self.table.defaults[name]])
            return 200, [self.table.describe(name, v) for v in versions]
        if method == "PUT" and len(segments) == 4 and segments[3] == "set-default" and version != "all":
            self.table.set_default(name, version)
            log.info("default of %s is now %s", name, version)
            return 200, {"status": f'Default version successfully updated for model "{name}" to "{version}"'}
        if method == "PUT" and len(segments) <= 3:
            raise Refused("the KServe server runs each version in one thread of one process: worker counts "
                          "cannot change here; scale with replicas (Kubernetes) or serve with TorchServe")
        if method == "DELETE" and len(segments) <= 3 and version != "all":
            version = version or self.table.defaults[name]
            model = self.table.remove(name, version)
            _unload(model)
            log.info("unloaded %s %s", name, version)
            return 200, {"status": f'Model "{name}" version: {version} unregistered'}
        return _error(405, "MethodNotAllowedException", f"{method} {path} is not a management call of this server")

    async def register(self, params: dict[str, str]) -> tuple[int, Any]:
        archive = params["url"]  # canonical() made it a .mar file name of the store
        name, version = archive_identity(self.store / archive)
        if params.get("model_name") not in (None, name):
            raise Refused(f"model_name={params['model_name']!r}: {archive} holds {name}; the KServe server "
                          "registers an archive under its own name")
        if version in self.table.models.get(name, {}):
            return _error(409, "ConflictStatusException", f"Model version {version} for model {name} has already "
                          "been registered.")
        log.info("loading %s (%s %s)", archive, name, version)
        model = await self.load(self.store / archive)
        self.table.add(model, archive)
        return 200, {"status": f'Model "{name}" Version: {version} registered with 1 initial workers'}


def _unload(model: Any) -> None:
    model.ready = False
    pool = getattr(model, "_pool", None)
    if pool is not None:
        pool.shutdown(wait=False)
