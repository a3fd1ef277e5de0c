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
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from serve_demo.core import defaults
from serve_demo.core.config import GRAPHS, LABEL_FILE, HandlerConfig
from serve_demo.core.loader import ModelFileError, duplicate_labels, load_detector, program_kind, read_label_map
from serve_demo.core.models import DEMO_ARCH, available_archs, fit_state_dict, load_state_dict_file, task_of
from serve_demo.core.pipeline import keypoint_names_for
from serve_demo.core.runtime import PRECISIONS, RUNTIMES, RuntimeConfig

from . import accelerate
from .spec import CORE, PACKAGE, VALID_ID, ArchiveError, ArchiveSpec, importable

log = logging.getLogger(__name__)

_D = ArchiveSpec("", "", "")  # the defaults, for the command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Archive options (``python -m serve_demo archive``, ``make archive``)."""
    p.add_argument("--name", required=True, help="model name (URL path /predictions/NAME)")
    p.add_argument("--version", default=_D.version,
                   help="model version (letters, digits, . _ -); the archive is model-store/NAME-VERSION.mar")
    p.add_argument("--weights", required=True,
                   help="state_dict file (.pt/.pth), a checkpoint holding one under 'model' or 'state_dict', "
                        "or a PyTorch Lightning .ckpt (the module's attribute prefix is found and stripped)")
    p.add_argument("--weights-prefix", default=_D.weights_prefix, metavar="PREFIX",
                   help="strip this key prefix (e.g. 'model.') instead of finding it")
    p.add_argument("--labels", required=True, help="label map JSON {\"0\": \"__background__\", ...}")
    p.add_argument("--keep-duplicate-labels", action="store_true",
                   help="archive a label map in which two ids share a name (refused by default)")
    p.add_argument("--arch", default=_D.arch, choices=available_archs(),
                   help=f"architecture name (default {DEMO_ARCH} unless --model-file is given)")
    p.add_argument("--model-file", default=_D.model_file,
                   help="a .py defining one detector class with a no-argument constructor")
    p.add_argument("--handler", default=_D.handler)
    p.add_argument("--threshold", type=float, default=_D.threshold, help="default score threshold")
    p.add_argument("--response-format", default=_D.response_format, choices=defaults.FORMATS)
    p.add_argument("--batch-size", type=int, default=_D.batch_size, help="TorchServe batchSize")
    p.add_argument("--max-batch-delay", type=int, default=_D.max_batch_delay, help="TorchServe maxBatchDelay (ms)")
    p.add_argument("--workers", type=int, default=_D.workers,
                   help="workers for this model (default 0: one per CPU of the serving machine up to 16, "
                        "one per GPU)")
    p.add_argument("--threads", type=int, default=_D.threads,
                   help="torch/runtime threads per worker (default 0: the serving machine's CPUs / workers)")
    rt = p.add_argument_group("runtime (docs/performance.md): the dense layers in an accelerated CPU runtime, "
                              "gated by parity with eager on validation images")
    rt.add_argument("--runtime", default=_D.runtime, choices=(*RUNTIMES, "auto"),
                    help="eager (torch), onnxruntime, openvino, or auto: the fastest that passes parity on "
                         f"this machine when --parity-data is given, else eager (default {_D.runtime})")
    rt.add_argument("--precision", default=_D.precision, choices=(*PRECISIONS, "auto"),
                    help="openvino only: bf16 or int8 (post-training quantization on the parity images: NNCF for "
                         "the dense parts, ONNX Runtime's quantizer for --graph whole) are not bit-close, so they "
                         "skip pixel parity and must pass make promote's mAP gate; auto: the fastest of the fp32 "
                         "runtime and OpenVINO bf16 and int8 (dense parts and whole graph) whose COCO mAP on "
                         "--gate-images labelled --parity-split images is within --gate-tolerance of fp32's "
                         f"(fp32 when the split has no labels; default {_D.precision})")
    rt.add_argument("--gate-tolerance", type=float, default=_D.gate_tolerance,
                    help=f"precision auto: the largest mAP drop accepted (default {_D.gate_tolerance})")
    rt.add_argument("--gate-images", type=int, default=_D.gate_images,
                    help=f"precision auto: labelled images each candidate is scored on (default {_D.gate_images}; "
                         "after the int8 calibration images)")
    rt.add_argument("--graph", default=_D.graph, choices=GRAPHS,
                    help="parts: the dense parts in the runtime, torch keeps the transform, RoIAlign, NMS and box "
                         "decoding (default); whole: the whole model([image]) call in the runtime (classic ONNX "
                         "exporter), kept only if it answers a second image size like eager (docs/performance.md)")
    rt.add_argument("--parity-data", default=_D.parity_data, metavar="DATASET",
                    help="COCO dataset root whose --parity-split images gate the runtime (required with one)")
    rt.add_argument("--parity-split", default=_D.parity_split)
    rt.add_argument("--parity-images", type=int, default=_D.parity_images, help="images the parity gate "
                    f"compares (and int8 calibrates on; default {_D.parity_images}; more for a stricter gate)")
    p.add_argument("--mask-threshold", type=float, default=_D.mask_threshold,
                   help=f"mask models: pixel probability kept in the RLE mask (default {_D.mask_threshold})")
    p.add_argument("--keypoint-names", default=_D.keypoint_names, metavar="JSON",
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
    p.add_argument("--capture-rate", type=float, default=_D.capture_rate, metavar="SHARE",
                   help="opt-in: keep this share (0-1) of the images the model is unsure about, with its "
                        "predictions, for labelling (a privacy decision: docs/monitoring.md). Default 0: off")
    p.add_argument("--export-path", default=_D.export_path)
    p.add_argument("--build-dir", default=_D.build_dir)
    p.add_argument("--no-check", action="store_true", help="skip loading and running the model")


def model_config(spec: ArchiveSpec, arch: str | None, runtime: RuntimeConfig | None = None) -> dict:
    """The archive's ``model-config.yaml``: TorchServe keys plus the handler's section.

    Workers and threads left at 0 are decided where the archive is served: TorchServe starts
    ``default_workers_per_model`` workers (written from :func:`serve_demo.core.layout.cpu_layout`
    by ``make serve`` and the image), and each worker takes its share of the CPUs.
    """
    handler = {"threshold": spec.threshold, "response_format": spec.response_format,
               "threads": spec.threads}
    if arch:
        handler["arch"] = arch
    if task_of(arch) == "masks":
        handler["mask_threshold"] = spec.mask_threshold
    names = keypoint_names_arg(spec) if task_of(arch) == "keypoints" else None
    if names:
        handler["keypoint_names"] = names
    if spec.model_kwargs:
        handler["model_kwargs"] = dict(spec.model_kwargs)
    for option in ("fp16", "gpu_decode", "channels_last", "pin_memory"):
        if getattr(spec, option):
            handler[option] = True
    if spec.capture_rate:
        handler["capture"] = {"enabled": True, "rate": spec.capture_rate}
    if runtime is not None and runtime.accelerated:
        handler["runtime"] = {"name": runtime.name, "precision": runtime.precision,
                              **({"graph": runtime.graph} if runtime.graph != "parts" else {})}
    HandlerConfig.from_yaml(handler)  # same validation as the worker
    workers = {"minWorkers": spec.workers, "maxWorkers": spec.workers} if spec.workers > 0 else {}
    return {**workers, "batchSize": spec.batch_size, "maxBatchDelay": spec.max_batch_delay, "responseTimeout": 120,
            "handler": handler}


def keypoint_names_arg(spec: ArchiveSpec) -> list[str] | None:
    """``--keypoint-names`` (or ``LABELS`` beside it as ``.keypoints.json``), validated."""
    path = spec.keypoint_names
    if path is None:
        guess = Path(spec.labels).with_suffix(".keypoints.json")
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


def bare_model(stage: Path, model_file: Path | None, cfg: HandlerConfig, labels: dict[int, str]) -> torch.nn.Module:
    """The architecture without weights, to match the weights file's keys against."""
    try:
        with importable(stage, model_file):
            return load_detector(stage, None, str(model_file) if model_file else None, cfg, len(labels),
                                 torch.device("cpu"))
    except ModelFileError as exc:
        raise ArchiveError(str(exc)) from None
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, TypeError) as exc:
        raise ArchiveError(f"{exc} (the label map names {len(labels)} classes, background included)") from None


def check_model(stage: Path, weights: Path, model_file: Path | None, cfg: HandlerConfig,
                labels: dict[int, str]) -> float:
    """Load and run the model as a worker would (importing from ``stage``); return seconds."""
    keys = sorted(labels)
    if keys != list(range(len(keys))):
        raise ArchiveError(f"label map ids must be 0..{len(keys) - 1} without gaps, got {keys}")
    try:
        with importable(stage, model_file):
            model = load_detector(stage, str(weights), str(model_file) if model_file else None, cfg,
                                  len(labels), torch.device("cpu"))
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model([torch.rand(3, 240, 320)])
            elapsed = time.perf_counter() - t0
    except ModelFileError as exc:
        raise ArchiveError(str(exc)) from None
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, TypeError) as exc:
        raise ArchiveError(f"{exc} (the label map names {len(labels)} classes, background included)") from None
    if not (isinstance(out, list) and len(out) == 1 and isinstance(out[0], dict)
            and {"boxes", "labels", "scores"} <= set(out[0])):
        raise ArchiveError("the model must return [{'boxes', 'labels', 'scores'}] per image in eval "
                           f"mode (torchvision's detection contract); got {type(out).__name__}")
    if "keypoints" in out[0]:
        try:
            keypoint_names_for(int(out[0]["keypoints"].shape[1]), cfg.keypoint_names)
        except ValueError as exc:
            raise ArchiveError(str(exc)) from None
    return elapsed


def stage_extra_files(stage: Path, labels: Path) -> None:
    """The archive's extra files: the worker core package (as a folder) and the label map."""
    (stage / "serve_demo").mkdir(parents=True)
    shutil.copy2(PACKAGE / "__init__.py", stage / "serve_demo" / "__init__.py")
    shutil.copytree(PACKAGE / CORE, stage / "serve_demo" / CORE,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(labels, stage / LABEL_FILE)


def prepare_weights(spec: ArchiveSpec, model: torch.nn.Module | None, out: Path) -> Path:
    """The weights to archive: the file itself when it is a plain state_dict that fits, else a
    clean ``state_dict`` written to ``out`` (a Lightning ``.ckpt``, a checkpoint, a prefix stripped).
    """
    path = Path(spec.weights)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    try:
        state = load_state_dict_file(str(path), raw=raw)
        if model is None:
            return path
        fitted, prefix = fit_state_dict(model.state_dict().keys(), state, spec.weights_prefix)
    except ValueError as exc:
        raise ArchiveError(f"{path}: {exc}") from None
    plain = isinstance(raw, dict) and all(isinstance(v, torch.Tensor) for v in raw.values())
    if plain and not prefix:
        return path
    log.info("%s: %s; archiving the state_dict alone", path.name,
             f"stripped the key prefix {prefix!r}" if prefix else "a checkpoint")
    torch.save(fitted, out)
    return out


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


def build(spec: ArchiveSpec) -> Path:
    """Stage, check and archive; return the ``.mar`` path (``EXPORT/NAME-VERSION.mar``)."""
    filename = archive_filename(spec.name, str(spec.version))
    weights, labels_path = Path(spec.weights), Path(spec.labels)
    for what, path in (("weights", weights), ("label map", labels_path), ("handler", Path(spec.handler))):
        if not path.is_file():
            raise ArchiveError(f"{what} file {path} not found")
    if spec.model_file and not Path(spec.model_file).is_file():
        raise ArchiveError(f"model file {spec.model_file} not found")
    if spec.model_file and spec.arch:
        raise ArchiveError("give --arch or --model-file, not both")
    kind = program_kind(weights)
    if kind:  # TorchScript / exported: the file is the model; --arch / --model-file only name its eager twin
        return build_program(spec, kind, weights, labels_path)
    arch = None if spec.model_file else (spec.arch or DEMO_ARCH)
    try:
        labels = read_label_map(labels_path)
    except ValueError as exc:
        raise ArchiveError(str(exc)) from None
    repeated = duplicate_labels(labels)
    if repeated and not spec.keep_duplicate_labels:
        named = "; ".join(f"{name!r} is ids {', '.join(map(str, ids))}" for name, ids in repeated.items())
        raise ArchiveError(f"label map {labels_path} repeats names ({named}): answers could not tell those "
                           "classes apart and evaluation would merge them. Rename them, or archive as is "
                           "with --keep-duplicate-labels (make archive KEEP_DUPLICATE_LABELS=1)")

    build_dir, stage, tmp = staging(spec, labels_path)
    model_file = Path(spec.model_file).resolve() if spec.model_file else PACKAGE / CORE / "models.py"
    if spec.runtime not in (*RUNTIMES, "auto"):
        raise ArchiveError(f"runtime {spec.runtime!r} is not one of {', '.join((*RUNTIMES, 'auto'))}")
    config = model_config(spec, arch)
    (build_dir / "model-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cfg = HandlerConfig.from_yaml(config["handler"])
    weights = prepare_weights(spec, None if spec.no_check else
                              bare_model(stage, model_file if spec.model_file else None, cfg, labels),
                              build_dir / f"{weights.stem}.pt").resolve()

    if not spec.no_check:
        elapsed = check_model(stage, weights, model_file if spec.model_file else None, cfg, labels)
        log.info("checked: %s loads from %s and answers one 320x240 image in %.0f ms",
                 arch or model_file.name, weights.name, elapsed * 1000)
    if spec.precision == "auto" and spec.runtime == "eager":
        raise ArchiveError("PRECISION=auto chooses among the fp32 runtime and OpenVINO's bf16 / int8: give "
                           "RUNTIME=auto (or openvino / onnxruntime), or PRECISION=fp32 with RUNTIME=eager")
    if spec.runtime == "auto" and (spec.no_check or not spec.parity_data):
        log.info("runtime auto: eager (an accelerated runtime is only chosen by its parity gate, which needs "
                 "--parity-data DATASET and the check)%s",
                 "; precision auto: fp32 (no labelled images to score bf16 / int8 on)" if spec.precision == "auto"
                 else "")
    elif spec.runtime != "eager":
        if spec.no_check:
            raise ArchiveError("an accelerated runtime needs the check (its parity gate): drop --no-check")
        chosen = accelerate.choose(spec, stage, weights, model_file if spec.model_file else None, cfg, labels,
                                   build_dir)
        if chosen.accelerated:
            config = model_config(spec, arch, chosen)
            (build_dir / "model-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    return archive_spec(spec, weights, model_file, stage, build_dir, tmp, filename)


def run_archiver(name: str, version: str, weights: Path, handler: str, stage: Path, config_file: Path,
                 tmp: Path, mar: Path, model_file: Path | None = None) -> Path:
    """``torch-model-archiver`` with a private ``TMPDIR`` (it deletes ``$TMPDIR/NAME``); the archive moved to
    ``mar``. The one call of the archiver: our archives and the benchmark's stock-handler ones.

    Raises:
        ArchiveError: the archiver failed (its stderr's tail).
    """
    mar.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [shutil.which("torch-model-archiver") or str(Path(sys.executable).parent / "torch-model-archiver"),
           "--model-name", name, "--version", str(version), "--serialized-file", str(weights),
           *(["--model-file", str(model_file.resolve())] if model_file else []),
           "--handler", handler, "--extra-files", str(stage), "--config-file", str(config_file),
           "--export-path", str(tmp), "--force"]
    log.debug("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, env={**os.environ, "TMPDIR": str(tmp)}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ArchiveError(f"torch-model-archiver failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    shutil.move(str(tmp / f"{name}.mar"), str(mar))
    return mar


def archive_spec(spec: ArchiveSpec, weights: Path, model_file: Path | None, stage: Path, build_dir: Path,
                 tmp: Path, filename: str) -> Path:
    """:func:`run_archiver` for ``spec``: its handler, the staged config, ``EXPORT/filename``."""
    return run_archiver(spec.name, spec.version, weights, str(Path(spec.handler).resolve()), stage,
                        build_dir / "model-config.yaml", tmp, Path(spec.export_path).resolve() / filename, model_file)


def build_program(spec: ArchiveSpec, kind: str, weights: Path, labels_path: Path) -> Path:
    """Archive a TorchScript / exported detector: loaded and run as a worker will, and, when
    ``--arch`` or ``--model-file`` names the eager model it came from (and the program's weights fit
    it), parity-checked against that model on the parity images (else on the check image)."""
    filename = archive_filename(spec.name, str(spec.version))
    if spec.runtime not in ("eager", "auto"):
        raise ArchiveError(f"{weights.name} is a {kind} program: its layers cannot be re-exported to "
                           f"{spec.runtime}; archive it with RUNTIME=eager, or archive the state_dict and model "
                           "code for an accelerated runtime")
    from serve_demo.core.loader import load_program

    labels = read_label_map(labels_path)
    build_dir, stage, tmp = staging(spec, labels_path)
    config = model_config(spec, None)
    (build_dir / "model-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cfg = HandlerConfig.from_yaml(config["handler"])
    weights = weights.resolve()
    if not spec.no_check:
        elapsed = check_model(stage, weights, None, cfg, labels)  # as a worker loads it
        log.info("checked: the %s program %s answers one 320x240 image in %.0f ms", kind, weights.name,
                 elapsed * 1000)
        program = load_program(weights, torch.device("cpu"))
        if kind == "exported":
            program_sizes(program, weights.name)
        program_parity(spec, kind, stage, program, cfg, labels)
    return archive_spec(spec, weights, None, stage, build_dir, tmp, filename)


def staging(spec: ArchiveSpec, labels_path: Path) -> tuple[Path, Path, Path]:
    """A clean ``build_dir/NAME`` with the extra files staged: ``(build_dir, stage, tmp)``."""
    build_dir = Path(spec.build_dir).resolve() / spec.name
    stage, tmp = build_dir / "extra", build_dir / "tmp"
    shutil.rmtree(build_dir, ignore_errors=True)
    stage_extra_files(stage, labels_path)
    tmp.mkdir()
    return build_dir, stage, tmp


def program_sizes(program: torch.nn.Module, name: str) -> None:
    """An exported program must take images of any size (clients send any): refuse a static export."""
    try:
        with torch.inference_mode():
            program([torch.rand(3, 200, 296)])
    except Exception as exc:  # noqa: BLE001 - a guard on the traced size, or any failure
        raise ArchiveError(f"{name} was exported for one input size: it fails on a 296x200 image "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}). Export it with dynamic "
                           "height and width: torch.export.export(model, ([image],), dynamic_shapes=([{1: "
                           "Dim('h'), 2: Dim('w')}],))") from None


def program_parity(spec: ArchiveSpec, kind: str, stage: Path, program: torch.nn.Module, cfg: HandlerConfig,
                   labels: dict[int, str]) -> None:
    """Compare the program with its eager twin (``spec.arch`` / ``spec.model_file`` with the program's
    own weights); refuse the archive when they differ. Skipped, saying why, when no twin fits."""
    from dataclasses import replace

    from .parity import check_parity, validation_images

    state = program.program.state_dict()
    model_file = Path(spec.model_file).resolve() if spec.model_file else None
    twin_cfg = replace(cfg, arch=None if model_file else (spec.arch or DEMO_ARCH))
    try:
        with importable(stage, model_file):
            eager = load_detector(stage, None, str(model_file) if model_file else None, twin_cfg, len(labels),
                                  torch.device("cpu"))
        fitted, _ = fit_state_dict(eager.state_dict().keys(), state, None)
        eager.load_state_dict(fitted)
    except (ValueError, RuntimeError, ImportError, TypeError, FileNotFoundError) as exc:
        log.warning("no parity check: the %s program's weights do not fit %s (%s); name its eager model with "
                    "--arch or --model-file to check that both answer alike", kind,
                    spec.model_file or spec.arch or DEMO_ARCH, str(exc)[:200])
        return
    eager.eval()
    images = (validation_images(spec.parity_data, spec.parity_split, spec.parity_images) if spec.parity_data
              else assorted_images())
    report = check_parity(eager, program, images)
    twin = spec.model_file or spec.arch or DEMO_ARCH
    if not report.passed:
        hint = (" torchvision's scripted detectors compute the resize scale in float32 (eager: float64), so "
                "images of some sizes are resized a pixel differently: serve the eager model instead (its "
                "state_dict with ARCH or MODEL_FILE), or script a model with a fixed input size (SSD)"
                if kind == "torchscript" else " re-export it from the eval-mode model")
        raise ArchiveError(f"the {kind} program does not answer like {twin} with its own weights: "
                           f"{report.summary()}.{hint}")
    log.info("parity with %s: %s", twin, report.summary())


def assorted_images() -> list[torch.Tensor]:
    """Synthetic scenes at assorted sizes (uint8 CHW), for a parity check without validation data."""
    import numpy as np

    from serve_demo.data.synth import SynthConfig, render_image

    rng = np.random.default_rng(0)
    out = []
    for size in ((320, 240), (368, 373), (500, 333), (640, 480), (301, 457), (999, 601)):
        img, _ = render_image(rng, SynthConfig())
        out.append(torch.from_numpy(np.array(img.convert("RGB").resize(size))).permute(2, 0, 1).contiguous())
    return out




def main(args: argparse.Namespace) -> int:
    """CLI entry: 0 on success, 2 with the reason on a bad combination."""
    try:
        spec = ArchiveSpec.from_args(args)
        mar = build(spec)
    except ArchiveError as exc:
        print(f"archive: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {mar} ({mar.stat().st_size / 1e6:.1f} MB): model {spec.name} version {spec.version}")
    return 0
