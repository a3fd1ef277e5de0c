"""``serve_demo versions | register | promote | rollback | compare``: a model's versions on a live server.

The registry and the start-up plan are :mod:`serve_demo.serve.versions`; the evaluation is
:mod:`serve_demo.evaluate.evaluator` and the gate :mod:`serve_demo.evaluate.gate`; this module reads
the command line, calls them and prints.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from serve_demo.core import defaults
from serve_demo.evaluate.evaluator import add_dataset_arguments, evaluate, inference_token
from serve_demo.evaluate.gate import gate_drops, gate_table, text_table
from serve_demo.evaluate.plots import plot_compare
from serve_demo.serve.management import DEFAULT_MANAGEMENT_URL, Management, ManagementError
from serve_demo.serve.versions import (
    EXIT_REFUSED,
    Registry,
    VersionError,
    archive_identity,
    archive_runtime,
    find_archive,
    version_key,
)


def _mgmt(args: argparse.Namespace) -> Management:
    return Management(args.management_url, token=args.token, home=args.home)


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
    return head + "\n" + text_table(rows)


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


def _evaluate_versions(args: argparse.Namespace, mgmt: Management, versions: list[str]) -> list[dict]:
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
    add_dataset_arguments(p)
    p.add_argument("--fresh", action="store_true", help="evaluate again even if a matching report exists")
    p.add_argument("--samples", type=int, default=6, help="annotated sample images per report")
