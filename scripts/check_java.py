#!/usr/bin/env python3
"""Fail early, before the big install, when Java 11+ is missing (TorchServe's frontend is Java)."""

import re
import shutil
import subprocess
import sys

HELP = ("TorchServe needs Java 11 or newer. Install it with "
        "`sudo apt-get install -y openjdk-17-jre-headless` (Debian/Ubuntu) or "
        "`brew install openjdk@17` (macOS), then run make again.")

java = shutil.which("java")
if not java:
    sys.exit(f"error: java not found. {HELP}")
out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
major = int(m.group(1)) if m else 0
if major == 1 and m and m.group(2):
    major = int(m.group(2))
if major < 11:
    sys.exit(f"error: java {major or '?'} found at {java}. {HELP}")
print(f"java {major}: ok")
