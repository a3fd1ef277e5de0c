"""``serve_demo serve`` / ``stop``: start TorchServe or the KServe server on the recorded versions.

The work is in :mod:`serve_demo.serve` (the servers, the registry's start-up plan); this module
only reads the command line and prints.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from serve_demo.core import defaults
from serve_demo.serve.kserve_local import KServeServer
from serve_demo.serve.management import Management
from serve_demo.serve.torchserve import TorchServe
from serve_demo.serve.versions import (
    VersionError,
    archive_runtime,
    register_new_models,
    start_from_registry,
)

log = logging.getLogger(__name__)


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", default=defaults.HOME, help="state folder: config, temp, logs")
    p.add_argument("--model-store", default=defaults.MODEL_STORE)
    p.add_argument("--inference-port", type=int, default=defaults.port("INFERENCE_PORT"),
                   help="TorchServe's inference API; the KServe server's HTTP port")
    p.add_argument("--management-port", type=int, default=defaults.port("MANAGEMENT_PORT"))
    p.add_argument("--metrics-port", type=int, default=defaults.port("METRICS_PORT"))
    p.add_argument("--grpc-ports", type=int, nargs=2, metavar=("INFERENCE", "MANAGEMENT"),
                   default=[defaults.port("GRPC_INFERENCE_PORT"), defaults.port("GRPC_MANAGEMENT_PORT")],
                   help="TorchServe's gRPC ports; the first is the KServe server's OIP v2 gRPC port")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--server", default=defaults.SERVER, choices=defaults.SERVERS,
                   help="torchserve (default) or kserve: KServe's ModelServer over the same archives")
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for READY workers")
    p.add_argument("--bind", default=defaults.BIND,
                   help=f"address the inference API (HTTP, gRPC) and metrics listen on (default {defaults.BIND}); "
                        "0.0.0.0 publishes them. Management stays on loopback")


def from_args(args: argparse.Namespace) -> TorchServe:
    return TorchServe(home=Path(args.home), model_store=Path(args.model_store),
                      inference_port=args.inference_port, management_port=args.management_port,
                      metrics_port=args.metrics_port, grpc_inference_port=args.grpc_ports[0],
                      grpc_management_port=args.grpc_ports[1], bind=getattr(args, "bind", defaults.BIND))


def kserve_from_args(args: argparse.Namespace):
    """The local KServe server of ``make serve SERVER=kserve`` (every recorded version, management on loopback)."""
    return KServeServer(Path(args.home), Path(args.model_store), http_port=args.inference_port,
                        grpc_port=args.grpc_ports[0], management_port=args.management_port,
                        bind=getattr(args, "bind", defaults.BIND))


def main_serve(args: argparse.Namespace) -> int:
    """``make serve``: start TorchServe or the KServe server on the recorded versions and defaults, wait
    until every version answers, print them and a curl line."""
    kserve = args.server == "kserve"
    server, other = (kserve_from_args(args), from_args(args)) if kserve else (from_args(args), kserve_from_args(args))
    what, other_what = ("the KServe server", "TorchServe") if kserve else ("TorchServe", "the KServe server")
    if other.pid():
        print(f"{other_what} runs from {args.home}: `make stop` first (both use port {args.inference_port})",
              file=sys.stderr)
        return 2
    try:
        if server.pid():
            print(f"{what} already runs (pid {server.pid()}); `make stop` to restart it")
            added = register_new_models(server, server.wait_ready(args.timeout))
            if added:
                print(f"registered the new archives {', '.join(added)}")
            status = server.wait_ready(args.timeout)
        else:
            status = start_from_registry(server, args.timeout)
    except VersionError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except (TimeoutError, RuntimeError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if kserve:
        print(f"KServe ModelServer ready at {server.url} (OIP v2 gRPC {server.grpc_target}, management "
              f"{server.management_url}, metrics {server.url}/metrics, log {server.log_file})")
    else:
        print(f"TorchServe ready at {server.inference_url} (management {server.management_url}, "
              f"metrics {server.metrics_url}, logs {server.home / 'logs'})")
    mgmt = Management(server.management_url, home=server.home)
    for name, versions in status.items():
        default = mgmt.default_version(name)
        for v in versions:
            workers = ", ".join(w["status"] for w in v["workers"])
            mark = " (default)" if str(v["modelVersion"]) == default else ""
            runtime = archive_runtime(server.model_store / v["modelUrl"]) if v.get("modelUrl") else "?"
            print(f"  {name} {v['modelVersion']}{mark}: {runtime}, batch {v['batchSize']}, workers [{workers}]")
    first = next(iter(status))
    key = server.key("inference")
    auth = f' -H "Authorization: Bearer {key}"' if key else ""
    print(f"try:\n  curl -X POST {server.inference_url}/predictions/{first} -T IMAGE.jpg{auth}")
    if kserve:
        print(f"  curl {server.url}/v2/models/{first}{auth}   (OIP v2 metadata)")
    if key:
        print(f"  (token authorization is on: keys in {server.home / 'key_file.json'}, new at each start; `make key` "
              "prints the inference key; serve_demo predict/evaluate read it from there)")
    if server.bind != "127.0.0.1":
        print(f"  inference listens on {server.bind}: reachable from other machines (PUBLISH={server.bind}); "
              "management stays on loopback")
    return 0


def main_stop(args: argparse.Namespace) -> int:
    """``make stop``: the TorchServe and the KServe server of ``HOME``, whichever runs."""
    stopped = [name for name, server in (("TorchServe", from_args(args)), ("KServe server", kserve_from_args(args)))
               if server.stop()]
    print(f"{' and '.join(stopped)} stopped" if stopped else f"no server running from {args.home}")
    return 0
