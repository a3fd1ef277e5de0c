"""``python -m serve_demo <command>``: the package's command line (the Makefile calls it).

Only the module of the command that runs is imported (``serve_demo stop`` does not load torch).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NamedTuple


class Command(NamedTuple):
    help: str
    module: str  # under serve_demo
    add: str  # the module's function adding the command's arguments
    run: str  # the module's function running it: (args) -> exit code


COMMANDS: dict[str, Command] = {
    "data": Command("generate the synthetic COCO-format dataset", "data.synth", "add_arguments", "main"),
    "convert-pennfudan": Command("PennFudanPed (images + instance mask PNGs) -> COCO folder",
                                "data.convert", "add_arguments", "main"),
    "train": Command("train a detector on a COCO-format folder", "train.trainer", "add_arguments", "main"),
    "archive": Command("check and bundle weights + labels into model-store/NAME-VERSION.mar",
                       "archive.builder", "add_arguments", "main"),
    "serve": Command("start TorchServe (or SERVER=kserve: KServe's ModelServer) and wait until ready",
                     "commands.serving", "add_serve_arguments", "main_serve"),
    "stop": Command("stop the background server and wait for it to exit", "commands.serving",
                    "add_common_arguments", "main_stop"),
    "predict": Command("post images to the server and print detections", "serve.client", "add_arguments", "main"),
    "ui": Command("a browser page for the running server, on 127.0.0.1 (the keys stay server-side)",
                  "serve.ui", "add_arguments", "main"),
    "video": Command("a video file or stream through the server -> annotated video + JSON lines",
                     "stream.video", "add_arguments", "main"),
    "stream": Command("live sources (cameras, RTSP, files) through the server: tracks, counts, MP4, JSON lines, "
                      "MJPEG, metrics", "stream.cli", "add_arguments", "main"),
    "clip": Command("a clip of moving shapes with its truth (tracks, line crossings) for make stream and the tests",
                    "stream.clip", "add_arguments", "main"),
    "track-score": Command("MOTA, IDF1, ID switches and line counts of a stream's JSON lines against a clip's truth",
                           "evaluate.tracking", "add_arguments", "main"),
    "evaluate": Command("COCO mAP and F2 of a model on a dataset split", "evaluate.evaluator",
                        "add_arguments", "main"),
    "versions": Command("list a model's versions: default, served or not, workers, archive",
                        "commands.versions", "add_versions_arguments", "main_versions"),
    "register": Command("load MODEL-VERSION.mar into the running server beside other versions",
                        "commands.versions", "add_register_arguments", "main_register"),
    "promote": Command("make VERSION the default if it passes the mAP gate against the default",
                       "commands.versions", "add_promote_arguments", "main_promote"),
    "rollback": Command("return MODEL's default to the previous default", "commands.versions",
                        "add_versions_arguments", "main_rollback"),
    "compare": Command("evaluate two served versions on one split; table + plot", "commands.versions",
                       "add_compare_arguments", "main_compare"),
    "bench": Command("in-process limits vs our servers vs the stock handler vs LitServe (one run)",
                     "bench.command", "add_arguments", "main"),
    "bench-streams": Command("1, 2 and 4 live RTSP cameras into the running server: fps, drops, latency, MOTA",
                             "bench.streams", "add_arguments", "main"),
    "drift": Command("PSI of live traffic (from Prometheus) against the evaluation baseline; exit 1 on drift",
                     "monitor.drift", "add_arguments", "main"),
    "collect": Command("captured uncertain images + predictions -> a COCO dataset to label",
                       "monitor.collect", "add_arguments", "main"),
    "dashboard": Command("draw the operators' dashboard from Prometheus into a PNG (or --grafana: its JSON)",
                         "monitor.dashboard", "add_arguments", "main"),
    "prometheus": Command("a local Prometheus (the shipped config) scraping the server's metrics API",
                          "monitor.prometheus", "add_arguments", "main"),
    "check-env": Command("check Python packages and Java 11+", "envcheck", "add_arguments", "main"),
}


def _module(cmd: Command):
    return importlib.import_module(f"{__package__}.{cmd.module}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser, with arguments only for the command named in ``argv`` (its module imported)."""
    parser = argparse.ArgumentParser(prog="serve_demo", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if name == chosen:
            getattr(_module(cmd), cmd.add)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cmd = COMMANDS[args.command]
    try:
        return int(getattr(_module(cmd), cmd.run)(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
