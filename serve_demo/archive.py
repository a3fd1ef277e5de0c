"""Check a (weights, architecture or model file, label map) combination, then archive it.

The check loads the model exactly as the TorchServe worker will (same code, same files, from a
staging folder) and runs it once, so a wrong combination fails here, naming the mismatch,
instead of at serve time. ``torch-model-archiver`` runs with a private ``TMPDIR``: it deletes
``$TMPDIR/<model-name>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from .models import DEMO_ARCH, available_archs, task_of
from .serving import LABEL_FILE, HandlerConfig, load_detector, read_label_map

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parent
# the modules a worker imports: the archive carries them, so it runs on any TorchServe
WORKER_MODULES = ("__init__.py", "envelopes.py", "imaging.py", "masks.py", "models.py", "schema.py",
                  "serving.py")


VALID_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ArchiveError(RuntimeError):
    """The inputs do not make a servable archive; the message names what to fix."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Archive options (``python -m serve_demo archive``, ``make archive``)."""
    p.add_argument("--name", required=True, help="model name (URL path /predictions/NAME)")
    p.add_argument("--version", default="1.0",
                   help="model version (letters, digits, . _ -); the archive is model-store/NAME-VERSION.mar")
    p.add_argument("--weights", required=True, help="state_dict file (.pt/.pth)")
    p.add_argument("--labels", required=True, help="label map JSON {\"0\": \"__background__\", ...}")
    p.add_argument("--arch", default=None, choices=available_archs(),
                   help=f"architecture name (default {DEMO_ARCH} unless --model-file is given)")
    p.add_argument("--model-file", default=None,
                   help="a .py defining one detector class with a no-argument constructor")
    p.add_argument("--handler", default="handlers/detector_handler.py")
    p.add_argument("--threshold", type=float, default=0.5, help="default score threshold")
    p.add_argument("--response-format", default="stock", choices=("stock", "detailed"))
    p.add_argument("--batch-size", type=int, default=1, help="TorchServe batchSize")
    p.add_argument("--max-batch-delay", type=int, default=20, help="TorchServe maxBatchDelay (ms)")
    p.add_argument("--workers", type=int, default=1, help="workers for this model")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: cores / workers)")
    p.add_argument("--mask-threshold", type=float, default=0.5,
                   help="mask models: pixel probability kept in the RLE mask (default 0.5)")
    p.add_argument("--keypoint-names", default=None, metavar="JSON",
                   help="keypoint models: a JSON list of names (default: LABELS with .keypoints.json "
                        "if it exists, else COCO's 17 names)")
    p.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help="extra builder arguments, e.g. '{\"min_size\": 512, \"box_score_thresh\": 0.01}'")
    gpu = p.add_argument_group("GPU options (CUDA workers only; off by default, check them with "
                               "scripts/verify_gpu.py and scripts/bench_gpu.py on your GPU)")
    gpu.add_argument("--fp16", action="store_true", help="float16 autocast for the forward pass")
    gpu.add_argument("--gpu-decode", action="store_true", help="decode plain JPEGs with nvjpeg on the GPU")
    gpu.add_argument("--channels-last", action="store_true", help="NHWC convolution weights")
    gpu.add_argument("--pin-memory", action="store_true", help="page-locked host copies before the upload")
    p.add_argument("--export-path", default="model-store")
    p.add_argument("--build-dir", default="build/archive")
    p.add_argument("--no-check", action="store_true", help="skip loading and running the model")


def namespace(**values) -> argparse.Namespace:
    """The archive options with their command-line defaults and ``values`` applied (for Python callers).

    Raises:
        TypeError: a name that is not an archive option.
    """
    p = argparse.ArgumentParser()
    add_arguments(p)
    ns = p.parse_args(["--name", "", "--weights", "", "--labels", ""])
    for key, value in values.items():
        if not hasattr(ns, key):
            raise TypeError(f"unknown archive option {key!r}")
        setattr(ns, key, value)
    return ns


def model_config(args: argparse.Namespace, arch: str | None) -> dict:
    """The archive's ``model-config.yaml``: TorchServe keys plus the handler's section."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.workers))
    handler = {"threshold": args.threshold, "response_format": args.response_format,
               "threads": threads}
    if arch:
        handler["arch"] = arch
    if task_of(arch) == "masks":
        handler["mask_threshold"] = args.mask_threshold
    names = keypoint_names_arg(args) if task_of(arch) == "keypoints" else None
    if names:
        handler["keypoint_names"] = names
    kwargs = model_kwargs_arg(args)
    if kwargs:
        handler["model_kwargs"] = kwargs
    for option in ("fp16", "gpu_decode", "channels_last", "pin_memory"):
        if getattr(args, option):
            handler[option] = True
    HandlerConfig.from_yaml(handler)  # same validation as the worker
    return {"minWorkers": args.workers, "maxWorkers": args.workers, "batchSize": args.batch_size,
            "maxBatchDelay": args.max_batch_delay, "responseTimeout": 120, "handler": handler}


def keypoint_names_arg(args: argparse.Namespace) -> list[str] | None:
    """``--keypoint-names`` (or ``LABELS`` beside it as ``.keypoints.json``), validated."""
    path = args.keypoint_names
    if path is None:
        guess = Path(args.labels).with_suffix(".keypoints.json")
        path = str(guess) if guess.is_file() else None
    if path is None:
        return None
    try:
        names = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ArchiveError(f"--keypoint-names {path}: {exc}") from None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ArchiveError(f"--keypoint-names {path} must hold a JSON list of names")
    return names


def model_kwargs_arg(args: argparse.Namespace) -> dict:
    """``--model-kwargs`` as a dict."""
    raw = args.model_kwargs
    if not raw:
        return {}
    try:
        kwargs = json.loads(raw)
    except ValueError as exc:
        raise ArchiveError(f"--model-kwargs must be a JSON object: {exc}") from None
    if not isinstance(kwargs, dict):
        raise ArchiveError("--model-kwargs must be a JSON object such as '{\"min_size\": 512}'")
    return kwargs


def check_model(stage: Path, weights: Path, model_file: Path | None, cfg: HandlerConfig,
                labels: dict[int, str]) -> float:
    """Load and run the model as a worker would (importing from ``stage``); return seconds."""
    keys = sorted(labels)
    if keys != list(range(len(keys))):
        raise ArchiveError(f"label map ids must be 0..{len(keys) - 1} without gaps, got {keys}")
    paths = [str(stage)] + ([str(model_file.parent)] if model_file else [])
    sys.path[:0] = paths
    try:
        model = load_detector(stage, str(weights), str(model_file) if model_file else None, cfg,
                              len(labels), torch.device("cpu"))
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model([torch.rand(3, 240, 320)])
        elapsed = time.perf_counter() - t0
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, TypeError) as exc:
        hint = f" (the label map names {len(labels)} classes, background included)"
        raise ArchiveError(f"{exc}{hint}") from None
    finally:
        for p in paths:
            sys.path.remove(p)
        if model_file:
            sys.modules.pop(model_file.stem, None)
    if not (isinstance(out, list) and len(out) == 1 and isinstance(out[0], dict)
            and {"boxes", "labels", "scores"} <= set(out[0])):
        raise ArchiveError("the model must return [{'boxes', 'labels', 'scores'}] per image in eval "
                           f"mode (torchvision's detection contract); got {type(out).__name__}")
    if "keypoints" in out[0]:
        from .serving import keypoint_names_for
        try:
            keypoint_names_for(int(out[0]["keypoints"].shape[1]), cfg.keypoint_names)
        except ValueError as exc:
            raise ArchiveError(str(exc)) from None
    return elapsed


def stage_extra_files(stage: Path, labels: Path) -> None:
    """The archive's extra files: the worker-side ``serve_demo`` modules and the label map."""
    (stage / "serve_demo").mkdir(parents=True)
    for mod in WORKER_MODULES:
        shutil.copy2(PACKAGE / mod, stage / "serve_demo" / mod)
    shutil.copy2(labels, stage / LABEL_FILE)


def archive_filename(name: str, version: str) -> str:
    """``NAME-VERSION.mar``: versions of one model sit side by side in the model store."""
    for what, value in (("model name", name), ("version", version)):
        if not VALID_ID.fullmatch(value):
            raise ArchiveError(f"{what} {value!r} must be letters, digits, '.', '_' or '-' "
                               "(it becomes part of the URL /predictions/NAME/VERSION)")
    if "-" in name:
        raise ArchiveError(f"model name {name!r} must not contain '-' (NAME-VERSION.mar is split at it); "
                           "use '_' instead")
    return f"{name}-{version}.mar"


def build(args: argparse.Namespace) -> Path:
    """Stage, check and archive; return the ``.mar`` path (``EXPORT/NAME-VERSION.mar``)."""
    filename = archive_filename(args.name, str(args.version))
    weights, labels_path = Path(args.weights), Path(args.labels)
    for what, path in (("weights", weights), ("label map", labels_path), ("handler", Path(args.handler))):
        if not path.is_file():
            raise ArchiveError(f"{what} file {path} not found")
    if args.model_file and not Path(args.model_file).is_file():
        raise ArchiveError(f"model file {args.model_file} not found")
    if args.model_file and args.arch:
        raise ArchiveError("give --arch or --model-file, not both")
    arch = None if args.model_file else (args.arch or DEMO_ARCH)
    try:
        labels = read_label_map(labels_path)
    except ValueError as exc:
        raise ArchiveError(str(exc)) from None

    build_dir = Path(args.build_dir).resolve() / args.name
    stage, tmp = build_dir / "extra", build_dir / "tmp"
    shutil.rmtree(build_dir, ignore_errors=True)
    stage_extra_files(stage, labels_path)
    tmp.mkdir()
    model_file = Path(args.model_file).resolve() if args.model_file else PACKAGE / "models.py"
    config = model_config(args, arch)
    (build_dir / "model-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    if not args.no_check:
        cfg = HandlerConfig.from_yaml(config["handler"])
        elapsed = check_model(stage, weights.resolve(), model_file if args.model_file else None,
                              cfg, labels)
        log.info("checked: %s loads from %s and answers one 320x240 image in %.0f ms",
                 arch or model_file.name, weights.name, elapsed * 1000)

    export = Path(args.export_path).resolve()
    export.mkdir(parents=True, exist_ok=True)
    cmd = [shutil.which("torch-model-archiver") or str(Path(sys.executable).parent / "torch-model-archiver"),
           "--model-name", args.name, "--version", str(args.version),
           "--serialized-file", str(weights.resolve()), "--model-file", str(model_file.resolve()),
           "--handler", str(Path(args.handler).resolve()),
           "--extra-files", str(stage), "--config-file", str(build_dir / "model-config.yaml"),
           "--export-path", str(tmp), "--force"]
    env = {**os.environ, "TMPDIR": str(tmp)}
    log.debug("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ArchiveError(f"torch-model-archiver failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    mar = export / filename
    shutil.move(str(tmp / f"{args.name}.mar"), str(mar))
    return mar


def main(args: argparse.Namespace) -> int:
    """CLI entry: 0 on success, 2 with the reason on a bad combination."""
    try:
        mar = build(args)
    except ArchiveError as exc:
        print(f"archive: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {mar} ({mar.stat().st_size / 1e6:.1f} MB): model {args.name} version {args.version}")
    return 0
