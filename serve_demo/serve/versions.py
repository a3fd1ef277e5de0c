"""Model versions: register, list, promote behind an mAP gate, roll back, compare.

TorchServe serves several versions of one model side by side (``/predictions/NAME/VERSION``)
and answers ``/predictions/NAME`` with the default one, but started with ``--ncs`` it forgets
all of that on restart. The project keeps its own record, ``MODEL_STORE/registry.json``: which
archives are registered, which version is the default, the previous defaults (for rollback)
and a log of every promotion with the metrics that justified it. ``make serve`` starts
TorchServe from that record, so a restart comes back with the same versions and defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_demo.core import defaults

from .management import Management, ManagementError

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


# ----------------------------------------------------------------------------------------- commands


def _mgmt(args: argparse.Namespace) -> Management:
    return Management(args.management_url, token=args.token, home=args.home)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def describe_versions(name: str, store: Path, mgmt: Management) -> str:
    """The ``make versions`` table: every archived version, whether served, default, workers."""
    registry = Registry.load(store)
    e = registry.models.get(name, {"default": None, "versions": {}, "history": []})
    try:
        served = {str(v["modelVersion"]): v for v in mgmt.versions(name)}
        default = mgmt.default_version(name)
        server_note = ""
    except ManagementError as exc:
        served, default = {}, e["default"]
        server_note = "" if exc.status == 404 else f"  (server: {exc})"
    archived = {}
    for mar in sorted(store.glob("*.mar")):  # archives built elsewhere have any file name
        try:
            n, v = archive_identity(mar)
        except VersionError:
            continue
        if n == name:
            archived[v] = mar
    rows = [["version", "default", "status", "workers", "batch", "runtime", "archive"]]
    for v in sorted(set(archived) | set(served) | set(e["versions"]), key=version_key):
        desc = served.get(v)
        if desc:
            workers = ", ".join(w["status"] for w in desc.get("workers", [])) or "none"
            status, batch = "served", str(desc.get("batchSize", ""))
        else:
            workers, batch = "-", "-"
            status = "not registered" if v in archived else "archive missing"
        mar = archived.get(v)
        size = f" ({mar.stat().st_size / 1e6:.1f} MB)" if mar else ""
        rows.append([v, "*" if v == default else "", status, workers, batch, archive_runtime(mar) if mar else "-",
                     (mar.name if mar else e["versions"].get(v, "-")) + size])
    history = " <- ".join(reversed(e.get("history", []))) or "-"
    head = f"{name}: default {default or '-'}; previous defaults (rollback order): {history}{server_note}"
    if len(rows) == 1:
        return head + f"\n  no archives of {name} in {store}: make archive NAME={name} VERSION=..."
    return head + "\n" + _table(rows)


def main_versions(args: argparse.Namespace) -> int:
    store = Path(args.model_store)
    mgmt = _mgmt(args)
    names = [args.model] if args.model else sorted(
        set(Registry.load(store).models) | {archive_identity(m)[0] for m in store.glob("*.mar")})
    if not names:
        print(f"no archives in {store}: run `make archive`")
        return 0
    print("\n\n".join(describe_versions(n, store, mgmt) for n in names))
    return 0


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


def main_register(args: argparse.Namespace) -> int:
    store = Path(args.model_store)
    archive = find_archive(store, args.model, args.version)
    if archive is None:
        print(f"register: no archive of {args.model} {args.version} in {store} (looked for "
              f"{args.model}-{args.version}.mar and at every archive's manifest); build it with `make archive "
              f"NAME={args.model} VERSION={args.version} WEIGHTS=...` or copy your .mar there", file=sys.stderr)
        return 2
    name, version = archive_identity(archive)
    if (name, version) != (args.model, args.version):
        print(f"register: {archive} holds {name} {version}, not {args.model} {args.version}; rebuild it",
              file=sys.stderr)
        return 2
    mgmt = _mgmt(args)
    registry = Registry.load(store)
    try:
        served = [str(v["modelVersion"]) for v in mgmt.versions(name)]
    except ManagementError as exc:
        if exc.status != 404:
            print(f"register: {exc}", file=sys.stderr)
            return 2
        served = []
    if version in served:
        print(f"{name} {version} is already registered")
    else:
        t0 = time.monotonic()
        try:
            mgmt.register(archive.name, workers=args.workers)
        except ManagementError as exc:
            print(f"register: {exc}", file=sys.stderr)
            return 2
        print(f"registered {name} {version} from {archive.name} in {time.monotonic() - t0:.1f} s")
    if served and name not in registry.models:
        # no record yet (a server started on a store it could not write): record what it serves first
        default = mgmt.default_version(name)
        urls = {str(v["modelVersion"]): v.get("modelUrl") for v in mgmt.versions(name)}
        for v in sorted(served, key=lambda v: (v != default, version_key(v))):
            known = find_archive(store, name, v)
            registry.add(name, v, known.name if known else (urls.get(v) or f"{name}-{v}.mar"))
    registry.add(name, version, archive.name)
    if not served:
        registry.entry(name)["default"] = version
    registry.save()
    print(describe_versions(name, store, mgmt))
    return 0


def gate_table(default: dict, candidate: dict, tolerance: float,
               headers: tuple[str, str] = ("default", "candidate")) -> tuple[bool, str]:
    """``(accepted, table)``: the candidate passes unless its mAP is lower by more than ``tolerance``."""
    dc, cc = default["metrics"]["coco"], candidate["metrics"]["coco"]
    df2, cf2 = default["metrics"]["f2"], candidate["metrics"]["f2"]
    rows = [["metric", f"{headers[0]} {default['version']}".strip(), f"{headers[1]} {candidate['version']}".strip(),
             "change"]]
    for key in ("mAP", "mAP_50", "mAP_75", "mAP_small", "mAP_medium", "mAP_large", "AR_100"):
        rows.append([key, f"{dc[key]:.4f}", f"{cc[key]:.4f}", f"{cc[key] - dc[key]:+.4f}"])
    rows.append([f"F2@0.5 (thr {df2['threshold']:.2f})", f"{df2['f2']:.4f}", f"{cf2['f2']:.4f}",
                 f"{cf2['f2'] - df2['f2']:+.4f}"])
    rows.append(["best F2@0.5", f"{df2['best_f2']:.4f} @{df2['best_threshold']:.2f}",
                 f"{cf2['best_f2']:.4f} @{cf2['best_threshold']:.2f}", f"{cf2['best_f2'] - df2['best_f2']:+.4f}"])
    for kind in gated_kinds(default, candidate)[1:]:
        d, c = default["metrics"][kind], candidate["metrics"][kind]
        label = kind.removeprefix("coco_")
        for key in ("mAP", "mAP_50", "mAP_75"):
            rows.append([f"{label} {key}", f"{d[key]:.4f}", f"{c[key]:.4f}", f"{c[key] - d[key]:+.4f}"])
    rows.append(["images / failures", f"{default['images']} / {len(default['failures'])}",
                 f"{candidate['images']} / {len(candidate['failures'])}", ""])
    accepted = not gate_drops(default, candidate, tolerance) and not candidate["failures"]
    return accepted, _table(rows)


def gated_kinds(default: dict, candidate: dict) -> list[str]:
    """The metric families both reports hold: ``coco`` (boxes), then ``coco_segm`` / ``coco_keypoints``."""
    return [k for k in ("coco", "coco_segm", "coco_keypoints") if k in default["metrics"] and k in candidate["metrics"]]


def gate_drops(default: dict, candidate: dict, tolerance: float) -> dict[str, float]:
    """``{family: mAP drop}`` for each family whose mAP@[.5:.95] falls by more than ``tolerance``.

    Mask and keypoint models are gated on their masks / keypoints as well as their boxes.
    """
    drops = {}
    for kind in gated_kinds(default, candidate):
        drop = default["metrics"][kind]["mAP"] - candidate["metrics"][kind]["mAP"]
        if drop > tolerance:
            drops[kind.removeprefix("coco_").replace("coco", "bbox")] = drop
    return drops


def _evaluate_versions(args: argparse.Namespace, mgmt: Management, versions: list[str]) -> list[dict]:
    from serve_demo.evaluate.evaluator import evaluate, inference_token

    return [evaluate(args.dataset, args.split, model=args.model, version=v, url=args.url, management=mgmt,
                     store=Path(args.model_store), concurrency=args.concurrency, threshold=args.threshold,
                     limit=args.limit, reuse=not args.fresh, samples=args.samples, token=inference_token(args))
            for v in versions]


def main_promote(args: argparse.Namespace) -> int:
    store, mgmt = Path(args.model_store), _mgmt(args)
    try:
        cur_desc = mgmt.describe(args.model)
        cand_desc = mgmt.describe(args.model, args.version)
        current = str(cur_desc["modelVersion"])
    except ManagementError as exc:
        hint = (f"; register it first: make register NAME={args.model} VERSION={args.version}"
                if exc.status == 404 else "")
        print(f"promote: {exc}{hint}", file=sys.stderr)
        return 2
    if current == args.version:
        print(f"{args.model} {args.version} is already the default")
        return 0
    registry = Registry.load(store)
    base, cand = _evaluate_versions(args, mgmt, [current, args.version])
    accepted, table = gate_table(base, cand, args.tolerance)
    print(f"gate: {args.model} {args.version} against the default {current} on {args.dataset} ({args.split}, "
          f"{cand['images']} images), served; tolerance {args.tolerance} on mAP@[.5:.95]\n{table}")
    note = {"mAP_from": base["metrics"]["coco"]["mAP"], "mAP_to": cand["metrics"]["coco"]["mAP"],
            "images": cand["images"], "dataset_sha256": cand["dataset_sha256"], "forced": False}
    if not accepted:
        if not args.force:
            drops = ", ".join(f"{k} mAP@[.5:.95] {v:.4f} lower" for k, v in
                              gate_drops(base, cand, args.tolerance).items())
            why = (f"{len(cand['failures'])} of its requests failed" if cand["failures"] else
                   f"{drops} than {current} (tolerance {args.tolerance})")
            print(f"REFUSED: {why}; the default stays {current}. FORCE=1 (--force) overrides.")
            return EXIT_REFUSED
        note["forced"] = True
        print("gate failed, promoting anyway (--force)")
    mgmt.set_default(args.model, args.version)
    e = registry.entry(args.model)
    registry.add(args.model, current, Path(cur_desc.get("modelUrl", f"{args.model}-{current}.mar")).name)
    registry.add(args.model, args.version, Path(cand_desc.get("modelUrl", f"{args.model}-{args.version}.mar")).name)
    e["default"] = current  # the server knows the current default best
    registry.set_default(args.model, args.version, note)
    registry.save()
    print(f"PROMOTED: /predictions/{args.model} now answers with {args.version} (was {current}; "
          f"make rollback NAME={args.model} returns to it)")
    return 0


def main_rollback(args: argparse.Namespace) -> int:
    store, mgmt = Path(args.model_store), _mgmt(args)
    registry = Registry.load(store)
    try:
        current, previous = registry.rollback(args.model)
        mgmt.describe(args.model, previous)
        mgmt.set_default(args.model, previous)
    except (VersionError, ManagementError) as exc:
        print(f"rollback: {exc}", file=sys.stderr)
        return 2
    registry.save()
    print(f"ROLLED BACK: /predictions/{args.model} answers with {previous} again (was {current})")
    return 0


def main_compare(args: argparse.Namespace) -> int:
    from serve_demo.evaluate.plots import plot_compare

    mgmt = _mgmt(args)
    try:
        a, b = _evaluate_versions(args, mgmt, [args.a, args.b])
    except ManagementError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    _, table = gate_table(a, b, 0.0, headers=("", ""))
    out = Path(args.out or f"reports/compare-{args.model}-{args.a}-vs-{args.b}")
    out.mkdir(parents=True, exist_ok=True)
    plot_compare(a, b, out / "compare.png")
    (out / "compare.md").write_text(
        f"# {args.model}: {args.a} vs {args.b} on {args.dataset} ({args.split}, {a['images']} images, served)\n\n"
        f"```\n{table}\n```\n\n![comparison](compare.png)\n\nReports: `{a['report']}`, `{b['report']}`\n")
    print(table)
    print(f"plot: {out / 'compare.png'}; reports: {a['report']}, {b['report']}")
    return 0


def add_common(p: argparse.ArgumentParser, version: bool = True, connection: bool = True) -> None:
    from .management import DEFAULT_MANAGEMENT_URL

    p.add_argument("--model", required=version, help="model name")
    if version:
        p.add_argument("--version", required=True, help="model version")
    if not connection:
        return
    p.add_argument("--management-url", default=DEFAULT_MANAGEMENT_URL)
    p.add_argument("--token", default=None, help="management token (default: HOME/key_file.json if present)")
    p.add_argument("--home", default=defaults.HOME, help="the server's state folder")
    p.add_argument("--model-store", default=defaults.MODEL_STORE)


def add_versions_arguments(p: argparse.ArgumentParser) -> None:
    """``versions`` and ``rollback``: a model and the server to ask."""
    add_common(p, version=False)


def add_register_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--workers", type=int, default=None,
                   help="initial workers (default: the archive's minWorkers, else the server's CPU/GPU layout)")


def add_promote_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, connection=False)
    add_gate_arguments(p)
    p.add_argument("--tolerance", type=float, default=defaults.GATE_TOLERANCE,
                   help=f"largest mAP@[.5:.95] drop accepted (default {defaults.GATE_TOLERANCE})")
    p.add_argument("--force", action="store_true", help="promote even if the gate refuses")


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--a", required=True, help="first version (the baseline)")
    p.add_argument("--b", required=True, help="second version")
    p.add_argument("--out", default=None, help="output folder (default reports/compare-MODEL-A-vs-B)")
    add_gate_arguments(p)


def add_gate_arguments(p: argparse.ArgumentParser) -> None:
    from serve_demo.evaluate.evaluator import add_dataset_arguments

    add_dataset_arguments(p)
    p.add_argument("--fresh", action="store_true", help="evaluate again even if a matching report exists")
    p.add_argument("--samples", type=int, default=6, help="annotated sample images per report")
