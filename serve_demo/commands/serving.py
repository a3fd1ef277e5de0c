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
    Registry,
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
    """The local KServe server of ``make serve SERVER=kserve`` (serving each model's default version)."""
    return KServeServer(Path(args.home), Path(args.model_store), http_port=args.inference_port,
                        grpc_port=args.grpc_ports[0], bind=getattr(args, "bind", defaults.BIND))


def main_serve_kserve(args: argparse.Namespace) -> int:
    """``make serve SERVER=kserve``: each model's default archive on KServe's ModelServer."""
    ks = kserve_from_args(args)
    if ks.pid():
        print(f"the KServe server already runs (pid {ks.pid()}); `make stop` to restart it")
    else:
        if from_args(args).pid():
            print(f"TorchServe runs from {args.home}: `make stop` first (both use port {args.inference_port})",
                  file=sys.stderr)
            return 2
        registry = Registry.load(ks.model_store)
        for w in registry.sync(ks.model_store):
            log.warning(w)
        registry.save()
        ks.archives = registry.load_plan()[0]
        if not ks.archives:
            print(f"no archives in {ks.model_store}: run `make archive` (or `make demo`) first", file=sys.stderr)
            return 2
        ks.start()
    try:
        status = ks.wait_ready(args.timeout)
    except (TimeoutError, RuntimeError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"KServe ModelServer ready at {ks.url} (OIP v2 gRPC {ks.grpc_target}, log {ks.log_file}); "
          f"models: {', '.join(status)}")
    first = next(iter(status))
    key = ks.key()
    auth = f' -H "Authorization: Bearer {key}"' if key else ""
    print(f"try:\n  curl -X POST {ks.url}/predictions/{first} -T IMAGE.jpg{auth}\n"
          f"  curl {ks.url}/v2/models/{first}{auth}   (OIP v2 metadata)")
    if key:
        print(f"  (token authorization is on: keys in {ks.key_file}, new at each start; `make key` prints the "
              "inference key; serve_demo predict/evaluate read it from there)")
    if ks.bind != "127.0.0.1":
        print(f"  listening on {ks.bind}: reachable from other machines (PUBLISH={ks.bind})")
    return 0


def main_serve(args: argparse.Namespace) -> int:
    """``make serve``: start, wait for READY workers, print models and a curl line."""
    if args.server == "kserve":
        return main_serve_kserve(args)
    ts = from_args(args)
    if kserve_from_args(args).pid():
        print(f"the KServe server runs from {args.home}: `make stop` first", file=sys.stderr)
        return 2
    try:
        if ts.pid():
            print(f"TorchServe already running (pid {ts.pid()}); `make stop` to restart it")
            added = register_new_models(ts, ts.wait_ready(args.timeout))
            if added:
                print(f"registered the new archives {', '.join(added)}")
            status = ts.wait_ready(args.timeout)
        else:
            status = start_from_registry(ts, args.timeout)
    except VersionError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except TimeoutError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"TorchServe ready at {ts.inference_url} (management {ts.management_url}, "
          f"metrics {ts.metrics_url}, logs {ts.home / 'logs'})")
    default_of = {name: Management(ts.management_url, home=ts.home).default_version(name) for name in status}
    for name, versions in status.items():
        for v in versions:
            workers = ", ".join(w["status"] for w in v["workers"])
            default = " (default)" if str(v["modelVersion"]) == default_of[name] else ""
            runtime = archive_runtime(ts.model_store / v["modelUrl"]) if v.get("modelUrl") else "?"
            print(f"  {name} {v['modelVersion']}{default}: {runtime}, batch {v['batchSize']}, workers [{workers}]")
    first = next(iter(status))
    key = ts.key("inference")
    auth = f' -H "Authorization: Bearer {key}"' if key else ""
    print(f"try:\n  curl -X POST {ts.inference_url}/predictions/{first} -T IMAGE.jpg{auth}")
    if key:
        print(f"  (token authorization is on: keys in {ts.home / 'key_file.json'}; `make key` prints the "
              "inference key; serve_demo predict/evaluate read it from there)")
    return 0


def main_stop(args: argparse.Namespace) -> int:
    """``make stop``: the TorchServe and the KServe server of ``HOME``, whichever runs."""
    stopped = [name for name, server in (("TorchServe", from_args(args)), ("KServe server", kserve_from_args(args)))
               if server.stop()]
    print(f"{' and '.join(stopped)} stopped" if stopped else f"no server running from {args.home}")
    return 0
