"""Model versions: register, list, promote behind an mAP gate, roll back, compare.

TorchServe serves several versions of one model side by side (``/predictions/NAME/VERSION``)
and answers ``/predictions/NAME`` with the default one, but started with ``--ncs`` it forgets
all of that on restart. The project keeps its own record, ``MODEL_STORE/registry.json``: which
archives are registered, which version is the default, the previous defaults (for rollback)
and a log of every promotion with the metrics that justified it. ``make serve`` starts
TorchServe from that record, so a restart comes back with the same versions and defaults.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .management import Management

log = logging.getLogger(__name__)

REGISTRY_FILE = "registry.json"
EXIT_REFUSED = 3  # the gate refused a promotion


class VersionError(RuntimeError):
    """A version operation that cannot be done; the message says what to do instead."""


def version_key(version: str) -> tuple:
    """Natural order: ``1.10`` after ``1.9``, numbers before words."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", version) if p)


def archive_identity(path: Path) -> tuple[str, str]:
    """``(model name, version)`` from an archive's ``MAR-INF/MANIFEST.json``."""
    try:
        with zipfile.ZipFile(path) as z:
            model = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise VersionError(f"{path} is not a model archive ({exc})") from None
    return model["modelName"], str(model.get("modelVersion", "1.0"))


def archive_runtime(path: Path) -> str:
    """The runtime an archive's ``model-config.yaml`` names (``eager``, ``onnxruntime``, ``openvino-int8``...)."""
    import yaml

    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if "model-config.yaml" not in names:  # built elsewhere: say whose handler serves it
                manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
                return f"{Path(str(manifest.get('handler', '?'))).stem} handler"
            handler = (yaml.safe_load(z.read("model-config.yaml")) or {}).get("handler") or {}
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, yaml.YAMLError):
        return "?"
    rt = handler.get("runtime") or {}
    if isinstance(rt, str):
        rt = {"name": rt}
    name, precision = rt.get("name", "eager"), rt.get("precision", "fp32")
    return name if precision == "fp32" else f"{name}-{precision}"


@dataclass
class Registry:
    """The record of registered versions and defaults, stored as JSON in the model store."""

    path: Path
    models: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, store: str | Path) -> Registry:
        path = Path(store) / REGISTRY_FILE
        if not path.is_file():
            return cls(path)
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise VersionError(f"{path} is not valid JSON ({exc}); fix or delete it") from None
        return cls(path, data.get("models", {}))

    def save(self) -> None:
        """Write atomically (a crash never leaves half a file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"models": self.models}, indent=1) + "\n")
        os.replace(tmp, self.path)

    def entry(self, name: str) -> dict[str, Any]:
        return self.models.setdefault(name, {"default": None, "versions": {}, "history": [], "log": []})

    def add(self, name: str, version: str, archive: str) -> None:
        """Record a registered version; the first version of a model becomes its default."""
        e = self.entry(name)
        e["versions"][version] = archive
        if e["default"] is None:
            e["default"] = version

    def remove(self, name: str, version: str) -> None:
        e = self.entry(name)
        e["versions"].pop(version, None)
        e["history"] = [v for v in e["history"] if v != version]
        if e["default"] == version:
            e["default"] = e["history"].pop() if e["history"] else (
                max(e["versions"], key=version_key) if e["versions"] else None)

    def set_default(self, name: str, version: str, note: dict | None = None) -> str | None:
        """Make ``version`` the default, remembering the previous one; returns the previous one."""
        e = self.entry(name)
        if version not in e["versions"]:
            raise VersionError(f"{name} {version} is not registered")
        previous = e["default"]
        if previous == version:
            return previous
        if previous is not None:
            e["history"].append(previous)
        e["default"] = version
        e["log"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "action": "promote", "from": previous,
                         "to": version, **(note or {})})
        return previous

    def rollback(self, name: str) -> tuple[str, str]:
        """Return to the previous default; ``(from, to)``."""
        e = self.entry(name)
        while e["history"] and e["history"][-1] not in e["versions"]:
            e["history"].pop()
        if not e["history"]:
            raise VersionError(f"{name} has no previous default to roll back to")
        current, previous = e["default"], e["history"].pop()
        e["default"] = previous
        e["log"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "action": "rollback", "from": current,
                         "to": previous})
        return current, previous

    def sync(self, store: Path) -> list[str]:
        """Reconcile with the archives on disk; returns warnings.

        Versions whose archive is gone are dropped; a model with archives but no record gets
        its highest version registered as the default (others wait for ``make register``).
        """
        warnings = []
        for name, e in list(self.models.items()):
            for version, archive in list(e["versions"].items()):
                if not (store / archive).is_file():
                    warnings.append(f"{name} {version}: archive {archive} is gone from {store}; dropped")
                    self.remove(name, version)
            if not e["versions"]:
                del self.models[name]
        found: dict[str, list[tuple[str, str]]] = {}
        for mar in sorted(store.glob("*.mar")):
            try:
                name, version = archive_identity(mar)
            except VersionError as exc:
                warnings.append(str(exc))
                continue
            found.setdefault(name, []).append((version, mar.name))
        for name, archives in found.items():
            if name not in self.models:
                version, archive = max(archives, key=lambda va: version_key(va[0]))
                self.add(name, version, archive)
        return warnings

    def load_plan(self) -> tuple[list[str], list[str]]:
        """Archives to load at start (the defaults) and to register afterwards (the others)."""
        first, later = [], []
        for e in self.models.values():
            for version, archive in sorted(e["versions"].items(), key=lambda va: version_key(va[0])):
                (first if version == e["default"] else later).append(archive)
        return first, later


def plan_from_registry(ts) -> tuple[Registry, list[str]]:
    """Set ``ts.models`` to the recorded defaults; returns the registry and the archives to register
    once it runs. The registry is saved when the store is writable (a read-only mount is read as is)."""
    registry = Registry.load(ts.model_store)
    for w in registry.sync(ts.model_store):
        log.warning(w)
    try:
        registry.save()
    except OSError as exc:
        log.info("registry not saved (%s): the store is read-only here", exc)
    first, later = registry.load_plan()
    if not first:
        raise VersionError(f"no archives in {ts.model_store}: run `make archive` (or `make demo`) first")
    ts.models = ",".join(first)
    return registry, later


def finish_from_registry(ts, registry: Registry, later: list[str], timeout: float = 180) -> dict[str, list[dict]]:
    """On a started ``ts``: register the recorded non-default versions and set the defaults."""
    ts.wait_ready(timeout)
    mgmt = Management(ts.management_url, home=ts.home)
    for archive in later:
        log.info("registering %s (recorded in %s)", archive, registry.path)
        mgmt.register(archive)
    for name, e in registry.models.items():
        if later and mgmt.default_version(name) != e["default"]:
            mgmt.set_default(name, e["default"])
    return ts.wait_ready(timeout)


def start_from_registry(ts, timeout: float = 180) -> dict[str, list[dict]]:
    """Start ``ts`` (a :class:`~serve_demo.serve.torchserve.TorchServe`) with the recorded versions and defaults."""
    registry, later = plan_from_registry(ts)
    ts.start()
    return finish_from_registry(ts, registry, later, timeout)


def register_new_models(ts, served: dict) -> list[str]:
    """Register, on a running ``ts``, the recorded archives of models it does not serve yet
    (an archive made after the server started); defaults first. Returns the archives added."""
    registry = Registry.load(ts.model_store)
    for w in registry.sync(ts.model_store):
        log.warning(w)
    registry.save()
    first, later = registry.load_plan()
    mgmt = Management(ts.management_url, home=ts.home)
    added = []
    name_of = {archive: name for name, e in registry.models.items() for archive in e["versions"].values()}
    for archive in first + later:
        if name_of.get(archive) not in served:
            log.info("registering %s (new in %s)", archive, ts.model_store)
            mgmt.register(archive)
            added.append(archive)
    return added


def find_archive(store: Path, name: str, version: str) -> Path | None:
    """``NAME-VERSION.mar`` (what ``make archive`` writes), else any archive in the store whose manifest
    says ``name`` ``version`` (one built elsewhere: ``torch-model-archiver --model-name NAME`` writes
    ``NAME.mar``)."""
    archive = store / f"{name}-{version}.mar"
    if archive.is_file():
        return archive
    for mar in sorted(store.glob("*.mar")):
        try:
            if archive_identity(mar) == (name, version):
                return mar
        except VersionError:
            continue
    return None
