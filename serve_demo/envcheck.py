"""Check what serving needs: Java 11+ and the Python packages TorchServe forgets to declare."""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import subprocess
import sys

JAVA_HELP = ("TorchServe needs Java 11 or newer. Install it with "
             "`sudo apt-get install -y openjdk-17-jre-headless` (Debian/Ubuntu), "
             "`brew install openjdk@17` (macOS), or set JAVA_HOME to an existing JDK.")
MODULES = ("torch", "torchvision", "ts", "model_archiver", "yaml", "captum", "PIL", "requests")


def java_version() -> int | None:
    """The major version of ``java`` on PATH, or None when there is none."""
    java = shutil.which("java")
    if not java:
        return None
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2)) if major == 1 and m.group(2) else major


def check() -> list[str]:
    """Problems found, each with its fix; empty when all is well."""
    problems = []
    v = java_version()
    if v is None:
        problems.append(f"java not found. {JAVA_HELP}")
    elif v < 11:
        problems.append(f"java {v} is too old. {JAVA_HELP}")
    for mod in MODULES:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            problems.append(f"python module {mod} missing ({exc}): run `make setup`")
    return problems


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--java-only", action="store_true", help="check Java only")


def main(args: argparse.Namespace) -> int:
    if args.java_only:
        v = java_version()
        if v is None or v < 11:
            print(f"error: {'no java' if v is None else f'java {v}'}. {JAVA_HELP}", file=sys.stderr)
            return 1
        print(f"java {v}: ok")
        return 0
    problems = check()
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if not problems:
        print(f"environment ok: java {java_version()}, python {sys.version.split()[0]}")
    return 1 if problems else 0
