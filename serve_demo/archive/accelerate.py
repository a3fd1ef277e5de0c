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
import hashlib
import logging
import shutil
from pathlib import Path

import torch

from serve_demo.core import runtime as runtime_module
from serve_demo.core.config import HandlerConfig
from serve_demo.core.layout import cpu_layout
from serve_demo.core.loader import load_detector
from serve_demo.core.runtime import MANIFEST, RUNTIME_DIR, RuntimeConfig, RuntimeManifest, accelerate

from . import precision
from .export import export_parts, export_whole
from .parity import Answers, ParityReport, answer, compare_answers, validation_images
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


PROBE_IMAGES = 2  # images each candidate is timed on before the full gate runs on the fastest
CALIBRATION_IMAGES = 16  # int8 calibrates on at least this many validation images


def choose(spec: ArchiveSpec, stage: Path, weights: Path, model_file: Path | None, cfg: HandlerConfig,
           labels: dict[int, str], build_dir: Path) -> RuntimeConfig:
    """Export for ``spec.runtime`` (every candidate for ``auto``) into ``stage/runtime``; the runtime
    the archive will name (eager when auto found nothing faster).

    Each candidate is exported once (reused from ``BUILD_DIR/_exports/NAME`` when weights, model, images, runtime and
    exporter are unchanged) and timed on :data:`PROBE_IMAGES` images; the parity gate then runs on every
    validation image for the fastest one only, and on the next fastest if it fails. Eager answers are
    computed once and compared with each candidate that gets that far. ``spec.precision`` auto then
    scores the fp32 choice and OpenVINO's bf16 / int8 by mAP (:mod:`.precision`).

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
    auto_precision = spec.precision == "auto"
    fp32_precision = "fp32" if auto_precision else spec.precision
    # the whole graph only when asked (GRAPH=whole): fcos_tiny's and the MobileNet FPN's answer other sizes
    # 1.9 px off; R50-FPN's passed at 2 threads but not at the worker's 1 (1.72 px, 6 unmatched), and trying
    # it made the R50 archive 117 s instead of 84 (docs/performance.md, scripts/whole_graph.py)
    graphs = (spec.graph,) if spec.graph else ("parts",)
    if spec.runtime == "auto":
        candidates = [RuntimeConfig(n, graph=g) for n in AUTO_CANDIDATES if installed(n) for g in graphs]
    else:
        if not installed(spec.runtime):
            raise ArchiveError(f"runtime {spec.runtime} is not installed here: pip install {spec.runtime}")
        if spec.precision == "int8" and (spec.graph or "parts") == "parts" and not installed("nncf"):
            raise ArchiveError("precision int8 of the dense parts needs NNCF: pip install nncf (GRAPH=whole "
                               "quantizes with ONNX Runtime's quantizer instead)")
        try:
            candidates = [RuntimeConfig.from_yaml({"name": spec.runtime, "precision": fp32_precision,
                                                   "graph": spec.graph or "parts"})]
        except ValueError as exc:
            raise ArchiveError(str(exc)) from None
    lowered = precision.low_precision_candidates(installed) if auto_precision else []
    gate = _gate_set(spec, labels) if auto_precision else None
    if gate is None:
        lowered = []
    calibration = images
    if any(rt.precision == "int8" for rt in (*candidates, *lowered)) and len(images) < CALIBRATION_IMAGES:
        calibration = validation_images(spec.parity_data, spec.parity_split, CALIBRATION_IMAGES)
    layout = cpu_layout(workers=spec.workers)
    threads = spec.threads or layout.threads
    rt_threads = spec.threads or layout.runtime_threads  # what a worker of the default layout will use
    probe = images[:PROBE_IMAGES]
    steps = len(probe) + len(candidates) * (1 + len(probe)) + 2 * (len(images) - len(probe))
    steps += len(lowered) + (len(gate.images) * (1 + len(lowered)) if lowered else 0)
    chosen: tuple[RuntimeConfig, Path, ParityReport, torch.nn.Module] | bool | None = None
    record: precision.PrecisionRecord | None = None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # timed as a worker of the default layout runs
    try:
        with Progress(steps) as progress:
            progress.stage("eager: timing")
            eager = _load(stage, weights, model_file, cfg, labels)
            eager_answers = answer(eager, probe, tick=progress.tick)
            exports = _Exports(spec, stage, weights, model_file, cfg, labels, calibration, threads, rt_threads,
                               build_dir, probe, progress)
            timed = [t for t in map(exports.timed, candidates) if t]
            timed.sort(key=lambda t: t[3].median_ms)
            if timed:
                log.info("timed on %d image(s): eager %.0f ms; %s", len(probe), eager_answers.median_ms,
                         ", ".join(f"{rt.label} {a.median_ms:.0f} ms" for rt, _, _, a in timed))
            for rt, folder, accelerated, probed in timed:
                if spec.runtime == "auto" and eager_answers.median_ms / probed.median_ms < MIN_SPEEDUP:
                    break  # the fastest is not fast enough: eager
                if len(eager_answers.outputs) < len(images):  # once, for the first candidate gated
                    progress.stage("eager: parity images")
                    eager_answers = answer(eager, images, done=eager_answers, tick=progress.tick)
                progress.stage(f"{rt.label}: parity images")
                progress.extend(len(images) - len(probe) if chosen is False else 0)
                report = compare_answers(eager_answers, answer(accelerated, images, done=probed, tick=progress.tick))
                if _record(spec, rt, folder, report, threads, rt_threads):
                    chosen = (rt, folder, report, accelerated)
                    break
                chosen = False  # a fallback runs a second gate: the bar grows
            if not chosen and spec.runtime == "auto":
                if timed and chosen is None:
                    rt, _, _, probed = timed[0]
                    log.warning("auto: the fastest runtime, %s, is only %.2fx eager here; the archive runs eager",
                                rt.label, eager_answers.median_ms / probed.median_ms)
                else:
                    log.warning("auto: no runtime passed here; the archive runs eager")
            if auto_precision:
                record = _choose_precision(spec, gate, lowered, chosen or None, eager, exports, progress)
    finally:
        torch.set_num_threads(before)
    if record is not None:
        record.write(stage)
        log.info("precision auto: %s", record.summary())
        if record.precision != "fp32":
            low = next(c for c in record.candidates if c.runtime == record.chosen)
            rt = RuntimeConfig("openvino", precision=low.precision, graph=low.graph)
            shutil.copytree(exports.folders[rt.label], stage / RUNTIME_DIR)
            return rt
    if not chosen:
        if spec.runtime == "auto":
            return RuntimeConfig()
        raise ArchiveError(f"{spec.runtime}: nothing to archive")
    rt, folder, report, _ = chosen
    shutil.copytree(folder, stage / RUNTIME_DIR)
    manifest = RuntimeManifest.read(stage / RUNTIME_DIR)
    log.info("runtime %s: %d of %d parts exported, %.2fx eager per image (torch %d thread(s), runtime %d)",
             rt.label, len(manifest.exported), len(manifest.parts), report.speedup, threads, rt_threads)
    return rt


class _Exports:
    """Export (or reuse) a candidate, load it as a worker will and time it on the probe images."""

    def __init__(self, spec: ArchiveSpec, stage: Path, weights: Path, model_file: Path | None, cfg: HandlerConfig,
                 labels: dict[int, str], calibration: list[torch.Tensor], threads: int, rt_threads: int,
                 build_dir: Path, probe: list[torch.Tensor], progress: Progress) -> None:
        self.spec, self.stage, self.weights, self.model_file, self.cfg, self.labels = (
            spec, stage, weights, model_file, cfg, labels)
        self.calibration, self.threads, self.rt_threads, self.build_dir = calibration, threads, rt_threads, build_dir
        self.probe, self.progress = probe, progress
        self.folders: dict[str, Path] = {}

    def timed(self, rt: RuntimeConfig) -> tuple[RuntimeConfig, Path, torch.nn.Module, Answers] | None:
        """``(rt, export folder, accelerated model, probe answers)``; None when auto skips what did not export.

        Raises:
            ArchiveError: a named runtime did not export.
        """
        got = self.loaded(rt, len(self.probe))
        if got is None:
            return None
        self.progress.stage(f"{rt.label}: timing")
        return rt, got[0], got[1], answer(got[1], self.probe, tick=self.progress.tick)

    def loaded(self, rt: RuntimeConfig, skipped_ticks: int = 0,
               threads: int | None = None) -> tuple[Path, torch.nn.Module] | None:
        """``(export folder, accelerated model)``, loaded as a worker will (its runtime sessions with ``threads``,
        default the default layout's runtime threads); None when auto skips what did not export (the bar then
        skips ``skipped_ticks`` more).

        Raises:
            ArchiveError: a named runtime did not export.
        """
        self.progress.stage(f"{rt.label}: export")
        try:
            folder = _exported(self.spec, rt, self.stage, self.weights, self.model_file, self.cfg, self.labels,
                               self.calibration, self.threads, self.build_dir)
        except (ValueError, RuntimeError) as exc:
            optional = self.spec.runtime == "auto" or (self.spec.precision == "auto" and rt.precision != "fp32")
            if not optional:
                raise ArchiveError(f"{rt.label}: {exc}") from None
            log.warning("auto: %s skipped: %s", rt.label, exc)
            self.progress.tick(1 + skipped_ticks)
            return None
        self.folders[rt.label] = folder
        self.progress.tick()
        return folder, self.load(rt, folder, threads or self.rt_threads)

    def load(self, rt: RuntimeConfig, folder: Path, threads: int) -> torch.nn.Module:
        """The model with ``folder``'s export of ``rt`` in place, its sessions with ``threads`` threads."""
        accelerated = _load(self.stage, self.weights, self.model_file, self.cfg, self.labels)
        accelerate(accelerated, folder, rt, threads, torch.device("cpu"))
        return accelerated


def _gate_set(spec: ArchiveSpec, labels: dict[int, str]) -> precision.GateSet | None:
    """The labelled images ``PRECISION=auto`` scores on; None (fp32 only, said so) without labels."""
    try:
        skip = max(CALIBRATION_IMAGES, spec.parity_images)  # int8 calibrates on these: not scored on them
        gate = precision.gate_set(spec.parity_data, spec.parity_split, labels, skip, spec.gate_images)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ArchiveError(f"precision auto: {exc}") from None
    if gate is None:
        log.warning("precision auto: %s/%s has no annotations for this model's labels, so no mAP can judge "
                    "bf16 or int8: the archive stays fp32 (give PARITY_DATA a labelled COCO split)",
                    spec.parity_data, spec.parity_split)
    elif len(gate.images) < precision.MIN_GATE_IMAGES or not gate.skipped:
        log.warning("precision auto: only %d labelled images in %s/%s%s; the mAP gate is coarse (a split of %d or "
                    "more keeps the scored images apart)", len(gate.images), spec.parity_data, spec.parity_split,
                    ", int8's calibration images among them" if not gate.skipped else "",
                    skip + precision.MIN_GATE_IMAGES)
    return gate


def _choose_precision(spec: ArchiveSpec, gate: precision.GateSet | None, lowered: list[RuntimeConfig],
                      fp32: tuple[RuntimeConfig, Path, ParityReport, torch.nn.Module] | None,
                      eager: torch.nn.Module, exports: _Exports, progress: Progress) -> precision.PrecisionRecord:
    """Score the fp32 choice and the low-precision candidates on the gate set; the fastest within
    ``spec.gate_tolerance`` of fp32's mAP.

    Each is timed as a worker under load runs it: its runtime on the worker's own threads (1 per worker on
    CPUs), not the wider sessions a lone worker borrows its idle neighbours' cores for. The whole graph in
    bf16 and in int8 swapped places between those two (MobileNet FPN: 17.1 / 17.5 ms at 2 threads, 21.8 / 19.1
    at 1), and throughput is what the precision is chosen for."""
    fp32_rt = fp32[0] if fp32 else RuntimeConfig()
    record = precision.PrecisionRecord(fp32_rt.label, "fp32", spec.gate_tolerance)
    if gate is None or not lowered:
        record.reason = ("no labelled validation images" if gate is None else
                         "OpenVINO is not installed: no bf16 / int8 candidate")
        return record
    fp32_model = exports.load(fp32[0], fp32[1], exports.threads) if fp32 else eager
    record.dataset, record.split, record.images = str(spec.parity_data), gate.split, len(gate.images)
    progress.stage(f"{fp32_rt.label}: mAP")
    maps, ms = precision.score(fp32_model, gate, spec.mask_threshold, progress.tick)
    record.fp32 = precision.Scored(fp32_rt.label, "fp32", round(ms, 2), maps)
    for rt in lowered:
        got = exports.loaded(rt, threads=exports.threads)  # timed by the scoring run itself
        if got is None:
            record.candidates.append(precision.Scored(rt.label, rt.precision, 0.0, passed=False,
                                                      note="did not export", graph=rt.graph))
            progress.tick(len(gate.images))
            continue
        progress.stage(f"{rt.label}: mAP")
        maps, ms = precision.score(got[1], gate, spec.mask_threshold, progress.tick)
        scored = precision.Scored(rt.label, rt.precision, round(ms, 2), maps, graph=rt.graph)
        precision.judge(record.fp32, scored, spec.gate_tolerance)
        record.candidates.append(scored)
        _annotate(exports.folders[rt.label], record, scored)
    best = precision.fastest_within(record.fp32, record.candidates)
    record.chosen, record.precision = best.runtime, best.precision
    record.reason = ("the fastest within the tolerance" if best is not record.fp32 else
                     "no lower precision was both faster and within the tolerance")
    return record


def _annotate(folder: Path, record: precision.PrecisionRecord, scored: precision.Scored) -> None:
    """The mAP gate's figures in a low-precision export's manifest, beside its parity figures."""
    manifest = RuntimeManifest.read(folder)
    manifest.parity = {**manifest.parity, "gate": "precision auto: mAP within the tolerance of fp32",
                       "fp32_map": record.fp32.maps if record.fp32 else {}, "map": scored.maps,
                       "median_ms": scored.median_ms, "gate_images": record.images}
    manifest.write(folder)


def _record(spec: ArchiveSpec, rt: RuntimeConfig, folder: Path, report: ParityReport, threads: int,
            rt_threads: int) -> bool:
    """Write the gate's figures into the export's manifest; whether ``rt`` may be archived.

    Raises:
        ArchiveError: a named fp32 runtime failed its gate.
    """
    manifest = RuntimeManifest.read(folder)
    manifest.parity = {**report.as_dict(), "threads": threads, "runtime_threads": rt_threads,
                       "gate": "pixel parity" if rt.precision == "fp32" else "promotion mAP gate"}
    manifest.write(folder)
    log.info("%s (%s): %s", rt.label, ", ".join(p.path for p in manifest.exported), report.summary())
    for part in manifest.eager:
        log.warning("%s: %s stays eager: %s", rt.label, part.path, part.eager_reason)
    if rt.precision != "fp32":
        log.warning("%s is not bit-close to eager (%s); it becomes a default only through make promote's "
                    "mAP gate", rt.label, report.summary())
        return True
    if report.passed:
        return True
    if spec.runtime != "auto":
        raise ArchiveError(f"{rt.label} fails the parity gate: {report.summary()}; archive with "
                           "RUNTIME=eager, or report the model and runtime versions")
    log.warning("auto: %s fails parity: %s", rt.label, report.summary())
    return False


def _exported(spec: ArchiveSpec, rt: RuntimeConfig, stage: Path, weights: Path, model_file: Path | None,
              cfg: HandlerConfig, labels: dict[int, str], images: list[torch.Tensor], threads: int,
              build_dir: Path) -> Path:
    """The folder holding ``rt``'s export of this model: reused when the same inputs made it before.

    A whole graph in a lower precision is judged by mAP (``PRECISION=auto``), so its second-size check only
    records the difference; such exports are kept apart from the strict ones."""
    strict = rt.precision == "fp32"
    key = export_key(rt, weights, model_file, cfg, images)
    cache = build_dir.parent / "_exports" / spec.name  # build_dir is emptied at each build; no name starts with _
    folder = cache / f"{rt.label}-{key[:16]}"
    if (folder / MANIFEST).is_file():
        log.info("%s: reusing the export in %s (same weights, model, images, runtime and exporter)", rt.label, folder)
        return folder
    for old in cache.glob(f"{rt.label}-*"):  # one export per runtime is kept
        shutil.rmtree(old, ignore_errors=True)
    tmp = cache / f".{folder.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model = _load(stage, weights, model_file, cfg, labels)
    if rt.graph == "whole":
        export_whole(model, sample_images(images), tmp, rt, threads, strict=strict,
                     calibration=[im.float() / 255 for im in images])
    else:
        export_parts(model, sample_images(images), tmp, rt, threads,
                     calibration=[im.float() / 255 for im in images]).write(tmp)
    tmp.rename(folder)
    return folder


def export_key(rt: RuntimeConfig, weights: Path, model_file: Path | None, cfg: HandlerConfig,
               images: list[torch.Tensor]) -> str:
    """A digest of everything an export depends on: the runtime and its version, torch, the exporter's
    code, the weights, the model file, the model's configuration and the sample / calibration images."""
    h = hashlib.sha256()
    module = __import__(rt.name)
    h.update(f"{rt.label} {getattr(module, '__version__', '?')} torch {torch.__version__}".encode())
    for path in (Path(__file__).with_name("export.py"), Path(runtime_module.__file__), weights, model_file):
        if path is not None:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    h.update(repr(dataclasses.replace(cfg, runtime=None)).encode())
    for im in images:
        h.update(str(tuple(im.shape)).encode())
        h.update(im.contiguous().numpy().tobytes())
    return h.hexdigest()


class Progress:
    """A progress bar with the stage's name (shown on a terminal; the stages are logged either way)."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", desc="archive", disable=None, leave=False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def stage(self, name: str) -> None:
        log.info("archive: %s", name)
        self.bar.set_description(name)

    def tick(self, n: int = 1) -> None:
        self.bar.update(n)

    def extend(self, n: int) -> None:
        if n:
            self.bar.total += n
            self.bar.refresh()


def _load(stage: Path, weights: Path, model_file: Path | None, cfg: HandlerConfig,
          labels: dict[int, str]) -> torch.nn.Module:
    """The eager model as a worker loads it (the archive's files, imported from the stage)."""
    eager_cfg = dataclasses.replace(cfg, runtime=None)
    with importable(stage, model_file):
        return load_detector(stage, str(weights), str(model_file) if model_file else None, eager_cfg,
                             len(labels), torch.device("cpu"))
