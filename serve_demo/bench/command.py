"""``serve_demo bench`` (``make bench``): the CPU benchmark (:mod:`.runner`), or with ``--device cuda`` the
GPU one (:mod:`.gpu`); both take :func:`add_arguments`'s options."""

from __future__ import annotations

import argparse

from . import gpu, runner

add_arguments = runner.add_arguments


def main(args: argparse.Namespace) -> int:
    return gpu.main(args) if args.device == "cuda" else runner.main(args)
