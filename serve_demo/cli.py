"""``python -m serve_demo <command>``: the package's command line (the Makefile calls it)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _cmd_data(args: argparse.Namespace) -> int:
    from .synth import generate

    generate(Path(args.out), seed=args.seed, train=args.train, valid=args.valid, test=args.test)
    print(f"dataset ready in {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import main

    return main(args)


def _cmd_archive(args: argparse.Namespace) -> int:
    from .archive import main

    return main(args)


def _cmd_predict(args: argparse.Namespace) -> int:
    from .client import main

    return main(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import main_serve

    return main_serve(args)


def _cmd_stop(args: argparse.Namespace) -> int:
    from .server import main_stop

    return main_stop(args)


def _cmd_check_env(args: argparse.Namespace) -> int:
    from .envcheck import main

    return main(args)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import main

    return main(args)


def build_parser() -> argparse.ArgumentParser:
    from . import archive, client, envcheck, evaluate, server, train

    parser = argparse.ArgumentParser(prog="serve_demo", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("data", help="generate the synthetic COCO-format dataset")
    p.add_argument("--out", default="data/shapes", help="dataset root (train/ valid/ test/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=3000, help="training images")
    p.add_argument("--valid", type=int, default=200, help="validation images")
    p.add_argument("--test", type=int, default=300, help="test images")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("train", help="train a detector on a COCO-format folder")
    train.add_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("archive", help="check and bundle weights + labels into model-store/NAME.mar")
    archive.add_arguments(p)
    p.set_defaults(func=_cmd_archive)

    p = sub.add_parser("serve", help="start TorchServe in the background and wait until ready")
    server.add_serve_arguments(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("stop", help="stop the background TorchServe and wait for the JVM to exit")
    server.add_common_arguments(p)
    p.set_defaults(func=_cmd_stop)

    p = sub.add_parser("predict", help="post images to the server and print detections")
    client.add_arguments(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("evaluate", help="COCO mAP and F2 of a model on a dataset split")
    evaluate.add_arguments(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("check-env", help="check Python packages and Java 11+")
    envcheck.add_arguments(p)
    p.set_defaults(func=_cmd_check_env)
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
