"""``python -m serve_demo <command>``: the package's command line (the Makefile calls it)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path


def _cmd_data(args: argparse.Namespace) -> int:
    from .synth import generate

    generate(Path(args.out), seed=args.seed, train=args.train, valid=args.valid, test=args.test,
             masks=args.masks)
    print(f"dataset ready in {args.out}")
    return 0


def _lazy(target: str):
    """A command that imports ``module:function`` only when it runs."""
    def run(args: argparse.Namespace) -> int:
        module, func = target.split(":")
        return getattr(importlib.import_module(f".{module}", __package__), func)(args)
    return run


def build_parser() -> argparse.ArgumentParser:
    from . import archive, bench, client, convert, envcheck, evaluate, server, train, versions

    parser = argparse.ArgumentParser(prog="serve_demo", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("data", help="generate the synthetic COCO-format dataset")
    p.add_argument("--out", default="data/shapes", help="dataset root (train/ valid/ test/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=3000, help="training images")
    p.add_argument("--valid", type=int, default=200, help="validation images")
    p.add_argument("--test", type=int, default=300, help="test images")
    p.add_argument("--masks", action="store_true",
                   help="add instance masks (COCO RLE segmentation; same images as without)")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("convert-pennfudan", help="PennFudanPed (images + instance mask PNGs) -> COCO folder")
    convert.add_arguments(p)
    p.set_defaults(func=_lazy("convert:main"))

    p = sub.add_parser("train", help="train a detector on a COCO-format folder")
    train.add_arguments(p)
    p.set_defaults(func=_lazy("train:main"))

    p = sub.add_parser("archive", help="check and bundle weights + labels into model-store/NAME.mar")
    archive.add_arguments(p)
    p.set_defaults(func=_lazy("archive:main"))

    p = sub.add_parser("serve", help="start TorchServe in the background and wait until ready")
    server.add_serve_arguments(p)
    p.set_defaults(func=_lazy("server:main_serve"))

    p = sub.add_parser("stop", help="stop the background TorchServe and wait for the JVM to exit")
    server.add_common_arguments(p)
    p.set_defaults(func=_lazy("server:main_stop"))

    p = sub.add_parser("predict", help="post images to the server and print detections")
    client.add_arguments(p)
    p.set_defaults(func=_lazy("client:main"))

    p = sub.add_parser("evaluate", help="COCO mAP and F2 of a model on a dataset split")
    evaluate.add_arguments(p)
    p.set_defaults(func=_lazy("evaluate:main"))

    p = sub.add_parser("versions", help="list a model's versions: default, served or not, workers, archive")
    versions.add_common(p, version=False)
    p.set_defaults(func=_lazy("versions:main_versions"))

    p = sub.add_parser("register", help="load MODEL-VERSION.mar into the running server beside other versions")
    versions.add_common(p)
    p.add_argument("--workers", type=int, default=1, help="initial workers")
    p.set_defaults(func=_lazy("versions:main_register"))

    p = sub.add_parser("promote", help="make VERSION the default if it passes the mAP gate against the default")
    versions.add_common(p, connection=False)
    versions.add_gate_arguments(p)
    p.add_argument("--tolerance", type=float, default=0.005,
                   help="largest mAP@[.5:.95] drop accepted (default 0.005)")
    p.add_argument("--force", action="store_true", help="promote even if the gate refuses")
    p.set_defaults(func=_lazy("versions:main_promote"))

    p = sub.add_parser("rollback", help="return MODEL's default to the previous default")
    versions.add_common(p, version=False)
    p.set_defaults(func=_lazy("versions:main_rollback"))

    p = sub.add_parser("compare", help="evaluate two served versions on one split; table + plot")
    p.add_argument("--model", required=True)
    p.add_argument("--a", required=True, help="first version (the baseline)")
    p.add_argument("--b", required=True, help="second version")
    p.add_argument("--out", default=None, help="output folder (default reports/compare-MODEL-A-vs-B)")
    versions.add_gate_arguments(p)
    p.set_defaults(func=_lazy("versions:main_compare"))

    p = sub.add_parser("bench", help="in-process limit vs this handler vs stock handler vs LitServe (one run)")
    bench.add_arguments(p)
    p.set_defaults(func=_lazy("bench:main"))

    p = sub.add_parser("check-env", help="check Python packages and Java 11+")
    envcheck.add_arguments(p)
    p.set_defaults(func=_lazy("envcheck:main"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
