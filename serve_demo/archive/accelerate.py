"""Archive time: export the dense parts for a runtime, gate them by parity, pick the fastest.

``make archive RUNTIME=openvino`` exports, loads the result exactly as a worker will (from the
staging folder), runs the validation images through both, and refuses the archive with the
numbers when the answers differ beyond :mod:`serve_demo.archive.parity`'s limits.
``RUNTIME=auto`` tries every installed runtime and keeps the fastest that passes here (eager when
none is faster). bf16 / int8 are recorded with their parity figures but gated by
``make promote``'s live mAP instead.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import torch

from serve_demo.core.config import HandlerConfig
from serve_demo.core.layout import cpu_layout
from serve_demo.core.loader import load_detector
from serve_demo.core.runtime import RUNTIME_DIR, RuntimeConfig, RuntimeManifest, accelerate

from .export import export_parts
from .parity import ParityReport, check_parity, validation_images
from .spec import ArchiveError, ArchiveSpec, importable

log = logging.getLogger(__name__)

AUTO_CANDIDATES = ("openvino", "onnxruntime")
MIN_SPEEDUP = 1.05  # auto keeps eager unless a runtime is at least this much faster per image


def installed(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def sample_images(images: list[torch.Tensor]) -> list[torch.Tensor]:
    """Two export samples of different shapes (a wide and a tall crop of the first validation image), so
    every dimension the model's transform lets vary is exported as dynamic."""
    first = images[0].float() / 255
    h, w = first.shape[1:]
    return [first[:, : max(32, h // 2), :], first[:, :, : max(32, w // 2)]]


def choose(spec: ArchiveSpec, stage: Path, weights: Path, model_file: Path | None, cfg: HandlerConfig,
           labels: dict[int, str], build_dir: Path) -> RuntimeConfig:
    """Export for ``spec.runtime`` (every candidate for ``auto``) into ``stage/runtime``; the runtime
    the archive will name (eager when auto found nothing faster).

    Raises:
        ArchiveError: no parity data, a runtime not installed, or parity failed (with the figures).
    """
    if not spec.parity_data:
        raise ArchiveError(f"runtime {spec.runtime} needs validation images for its parity gate: give "
                           "--parity-data DATASET (make archive PARITY_DATA=data/yours), or RUNTIME=eager")
    try:
        images = validation_images(spec.parity_data, spec.parity_split, spec.parity_images)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ArchiveError(f"parity images: {exc}") from None
    if spec.runtime == "auto":
        candidates = [RuntimeConfig(n) for n in AUTO_CANDIDATES if installed(n)]
    else:
        if not installed(spec.runtime):
            raise ArchiveError(f"runtime {spec.runtime} is not installed here: pip install {spec.runtime}")
        if spec.precision == "int8" and not installed("nncf"):
            raise ArchiveError("precision int8 needs NNCF: pip install nncf")
        try:
            candidates = [RuntimeConfig.from_yaml({"name": spec.runtime, "precision": spec.precision})]
        except ValueError as exc:
            raise ArchiveError(str(exc)) from None
    layout = cpu_layout(workers=spec.workers)
    threads = spec.threads or layout.threads
    rt_threads = spec.threads or layout.runtime_threads  # what a worker of the default layout will use
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # timed as a worker of the default layout runs
    try:
        eager = _load(stage, weights, model_file, cfg, labels)
        results: list[tuple[RuntimeConfig, Path, ParityReport]] = []
        for rt in candidates:
            folder = build_dir / f"runtime-{rt.label}"
            shutil.rmtree(folder, ignore_errors=True)
            try:
                manifest = export_parts(_load(stage, weights, model_file, cfg, labels), sample_images(images), folder,
                                        rt, threads, calibration=[im.float() / 255 for im in images])
            except (ValueError, RuntimeError) as exc:
                if spec.runtime != "auto":
                    raise ArchiveError(f"{rt.label}: {exc}") from None
                log.warning("auto: %s skipped: %s", rt.label, exc)
                continue
            accelerated = _load(stage, weights, model_file, cfg, labels)
            accelerate(accelerated, folder, rt, rt_threads, torch.device("cpu"))
            report = check_parity(eager, accelerated, images)
            manifest.parity = {**report.as_dict(), "threads": threads, "runtime_threads": rt_threads,
                               "gate": "pixel parity" if rt.precision == "fp32" else "promotion mAP gate"}
            manifest.write(folder)
            log.info("%s (%s): %s", rt.label, ", ".join(p.path for p in manifest.exported), report.summary())
            for part in manifest.eager:
                log.warning("%s: %s stays eager: %s", rt.label, part.path, part.eager_reason)
            if rt.precision != "fp32":
                log.warning("%s is not bit-close to eager (%s); it becomes a default only through make promote's "
                            "mAP gate", rt.label, report.summary())
            elif not report.passed:
                if spec.runtime != "auto":
                    raise ArchiveError(f"{rt.label} fails the parity gate: {report.summary()}; archive with "
                                       "RUNTIME=eager, or report the model and runtime versions")
                log.warning("auto: %s fails parity: %s", rt.label, report.summary())
                continue
            results.append((rt, folder, report))
    finally:
        torch.set_num_threads(before)
    if not results:
        if spec.runtime == "auto":
            log.warning("auto: no runtime passed here; the archive runs eager")
            return RuntimeConfig()
        raise ArchiveError(f"{spec.runtime}: nothing to archive")
    rt, folder, report = max(results, key=lambda r: r[2].speedup)
    if spec.runtime == "auto" and report.speedup < MIN_SPEEDUP:
        log.warning("auto: the fastest runtime, %s, is only %.2fx eager here; the archive runs eager",
                    rt.label, report.speedup)
        return RuntimeConfig()
    shutil.copytree(folder, stage / RUNTIME_DIR)
    manifest = RuntimeManifest.read(stage / RUNTIME_DIR)
    log.info("runtime %s: %d of %d parts exported, %.2fx eager per image (torch %d thread(s), runtime %d)",
             rt.label, len(manifest.exported), len(manifest.parts), report.speedup, threads, rt_threads)
    return rt


def _load(stage: Path, weights: Path, model_file: Path | None, cfg: HandlerConfig,
          labels: dict[int, str]) -> torch.nn.Module:
    """The eager model as a worker loads it (the archive's files, imported from the stage)."""
    eager_cfg = dataclasses.replace(cfg, runtime=None)
    with importable(stage, model_file):
        return load_detector(stage, str(weights), str(model_file) if model_file else None, eager_cfg,
                             len(labels), torch.device("cpu"))
