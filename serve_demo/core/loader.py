"""One way to load an archive's detector, for every server and tool.

:func:`open_archive` reads a ``.mar`` (or its unpacked folder): manifest, ``model-config.yaml``,
label map. :func:`load_detector` builds the model it names and loads its weights. The
TorchServe handler, the KServe server, the evaluator, the benchmark and the LitServe peer all
load through :class:`serve_demo.core.worker.Worker`, which calls these.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import os
import sys
import tempfile
import traceback
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import LABEL_FILE, HandlerConfig
from .models import build_model, load_state_dict_file, load_weights, task_of
from .offline import Downloads, ModelFileError, intercept_downloads
from .runtime import RUNTIME_DIR, accelerate

log = logging.getLogger(__name__)


@dataclass
class ArchiveFiles:
    """An archive's contents on disk: its folder, manifest ``model`` section and config."""

    model_dir: Path
    manifest: dict
    config: dict = field(default_factory=dict)  # the whole model-config.yaml
    _tmp: tempfile.TemporaryDirectory | None = None  # set when a .mar was extracted

    @functools.cached_property
    def handler(self) -> HandlerConfig:
        """The ``handler:`` section, parsed once for everything that serves this archive."""
        return HandlerConfig.from_yaml(self.config.get("handler"))

    @property
    def min_workers(self) -> int:
        """``minWorkers`` of ``model-config.yaml`` (0 when the server's layout decides)."""
        return int(self.config.get("minWorkers") or 0)

    @property
    def name(self) -> str:
        return self.manifest.get("modelName", "detector")

    @property
    def version(self) -> str:
        return str(self.manifest.get("modelVersion", "1.0"))

    def cleanup(self) -> None:
        """Remove the extracted copy of a ``.mar`` (a folder given as such is left alone)."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def open_archive(path: str | Path) -> ArchiveFiles:
    """A ``.mar`` (extracted to a private temp folder) or an unpacked archive folder.

    Raises:
        FileNotFoundError: no such file or folder, or no ``MAR-INF/MANIFEST.json`` in it.
    """
    import yaml

    path = Path(path)
    tmp = None
    if path.is_file():
        tmp = tempfile.TemporaryDirectory(prefix="serve_demo_mar_")
        with zipfile.ZipFile(path) as z:
            z.extractall(tmp.name)
        root = Path(tmp.name)
    elif path.is_dir():
        root = path
    else:
        raise FileNotFoundError(f"archive {path} not found: give a .mar file or its unpacked folder")
    manifest_path = root / "MAR-INF" / "MANIFEST.json"
    if not manifest_path.is_file():
        if tmp:
            tmp.cleanup()
        raise FileNotFoundError(f"{path} has no MAR-INF/MANIFEST.json: is it a torch-model-archiver archive?")
    manifest = json.loads(manifest_path.read_text())["model"]
    config_file = manifest.get("configFile")
    config = yaml.safe_load((root / config_file).read_text()) if config_file else {}
    return ArchiveFiles(root, manifest, config or {}, tmp)


def read_label_map(path: str | Path) -> dict[int, str]:
    """``index_to_name.json`` as ``{int id: name}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label map {path} is missing: archive it with --extra-files")
    raw = json.loads(path.read_text())
    try:
        return {int(k): (v[-1] if isinstance(v, list) else str(v)) for k, v in raw.items()}
    except (ValueError, AttributeError):
        raise ValueError(f"{path}: keys must be class ids (\"0\", \"1\", ...) mapped to names") from None


def duplicate_labels(names: dict[int, str]) -> dict[str, list[int]]:
    """Names that more than one id maps to (the background id 0 left out), with their ids."""
    ids: dict[str, list[int]] = {}
    for i, name in sorted(names.items()):
        if i != 0:
            ids.setdefault(name, []).append(i)
    return {name: found for name, found in ids.items() if len(found) > 1}


def user_error(model_file: Path, exc: BaseException, doing: str) -> ModelFileError:
    """``model.py:12: NameError: ...`` for an exception raised by a user's model file."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).name == model_file.name]
    if isinstance(exc, SyntaxError) and exc.lineno:
        where = f"{model_file.name}:{exc.lineno}"
    else:
        where = f"{model_file.name}:{frames[-1].lineno}" if frames else model_file.name
    return ModelFileError(f"{where}: {type(exc).__name__}: {exc} ({doing}); fix the model file")


def detector_class_from_file(model_file: str | Path) -> type[nn.Module]:
    """The single ``nn.Module`` class defined in a user's model file."""
    model_file = Path(model_file)
    sys.modules.pop(model_file.stem, None)
    try:
        module = importlib.import_module(model_file.stem)
    except Exception as exc:  # noqa: BLE001 - any error in the user's file: name its line
        raise user_error(model_file, exc, "while importing it") from None
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
               if issubclass(c, nn.Module) and c.__module__ == module.__name__]
    if len(classes) != 1:
        raise ValueError(f"{model_file.name} must define exactly one nn.Module class, found "
                         f"{[c.__name__ for c in classes] or 'none'}")
    return classes[0]


def num_classes_of(model: nn.Module) -> int | None:
    """The class count (background included) of torchvision-style detectors, else None."""
    probes = (("roi_heads", "box_predictor", "cls_score"), ("head", "classification_head"))
    for path in probes:
        obj = model
        for attr in path:
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.Linear):
            return obj.out_features
        if obj is not None and hasattr(obj, "num_classes"):
            return int(obj.num_classes)
    return None


PROGRAM_KINDS = ("torchscript", "exported")


def program_kind(path: str | Path) -> str | None:
    """``torchscript`` (``torch.jit.save``), ``exported`` (``torch.export.save``, a ``.pt2``) or None
    (a state_dict or checkpoint: weights for a model built from code)."""
    try:
        with zipfile.ZipFile(path) as z:
            tails = {n.split("/", 1)[-1] for n in z.namelist()}
    except (zipfile.BadZipFile, OSError):
        return None
    if "archive_format" in tails:
        return "exported"
    if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
        return "torchscript"
    return None


class ProgramDetector(nn.Module):
    """A TorchScript or exported detector behind the eager contract: a list of images in, one
    ``{"boxes", "labels", "scores", ...}`` per image out."""

    def __init__(self, program: nn.Module, kind: str) -> None:
        super().__init__()
        self.program, self.kind = program, kind

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        if self.kind == "exported":  # exported for a list of one image: one call per image
            return [self.program([im])[0] for im in images]
        out = self.program(images)
        return out[1] if isinstance(out, tuple) else out  # scripted torchvision detectors: (losses, detections)

    def train(self, mode: bool = True) -> ProgramDetector:
        if self.kind == "exported":  # an exported program is in eval mode for good (and refuses .train())
            self.training = mode
            return self
        return super().train(mode)


def load_program(path: str | Path, device: torch.device) -> ProgramDetector:
    """Load a TorchScript or exported detector.

    Raises:
        ValueError: the file does not load, naming it and what to do.
    """
    kind = program_kind(path)
    try:
        if kind == "torchscript":
            program = torch.jit.load(str(path), map_location=device)
        elif kind == "exported":
            program = torch.export.load(str(path)).module()
        else:
            raise ValueError("neither TorchScript (torch.jit.save) nor an exported program (torch.export.save)")
    except Exception as exc:  # noqa: BLE001 - any load failure: name the file
        raise ValueError(f"{Path(path).name} does not load as {kind or 'a serialized model'} "
                         f"({type(exc).__name__}: {str(exc)[:300]})") from None
    # scripted torchvision detectors warn at every call that they return (losses, detections): handled above
    warnings.filterwarnings("ignore", message=r".*always returns a \(Losses, Detections\) tuple in scripting")
    return ProgramDetector(program, kind)


def load_detector(model_dir: str | Path, weights: str | None, model_file: str | None,
                  cfg: HandlerConfig, num_labels: int, device: torch.device,
                  wide_threads: int | None = None) -> nn.Module:
    """Build the detector named by ``cfg.arch`` (or the model file's class), load weights, and put
    its exported parts in the archive's runtime (torch's threads; ``wide_threads``: also sessions with
    that many, for a worker running alone, :class:`serve_demo.core.runtime.Occupancy`).

    Raises:
        ValueError / FileNotFoundError: with the path and the mismatch named.
    """
    model_dir = Path(model_dir)
    downloads = Downloads()
    if cfg.arch:
        kwargs = dict(cfg.model_kwargs)
        if task_of(cfg.arch) == "keypoints" and cfg.keypoint_names:
            kwargs.setdefault("num_keypoints", len(cfg.keypoint_names))
        model = build_model(cfg.arch, num_classes=num_labels, **kwargs)
        source = f"architecture {cfg.arch}"
    elif model_file:
        cls = detector_class_from_file(model_dir / model_file)
        with intercept_downloads(model_dir / model_file) as downloads:
            try:
                model = cls()
            except Exception as exc:  # noqa: BLE001 - any error in the user's constructor: name its line
                raise user_error(Path(model_file), exc, f"while building {cls.__name__}()") from None
        source = f"{model_file}:{cls.__name__}"
        n = num_classes_of(model)
        if n is not None and n != num_labels:
            raise ValueError(f"{source} predicts {n} classes (background included) but the label "
                             f"map names {num_labels}: fix {LABEL_FILE} or the model")
    elif weights and program_kind(model_dir / weights):
        model = load_program(model_dir / weights, device).eval()
        log.info("%s: a %s detector (no model code; the runtime stays eager)", Path(weights).name,
                 "TorchScript" if model.kind == "torchscript" else "torch.export")
        return model
    else:
        raise ValueError("no detector: set handler.arch in model-config.yaml, archive a model file, or "
                         "archive a TorchScript / exported program as the serialized file")
    if weights:
        path = model_dir / weights
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} is missing from the archive")
        state = load_state_dict_file(str(path))
        downloads.check_covered(model, state, Path(weights).name)
        load_weights(model, state, source=f"{weights} for {source}")
    model = model.to(device).eval()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    runtime = cfg.runtime_config
    if runtime.accelerated:
        accelerate(model, model_dir / RUNTIME_DIR, runtime, torch.get_num_threads(), device, wide_threads)
    return model




def configure_threads(threads: int) -> None:
    """Set torch's intra-op threads once per worker (workers x threads should fit the cores)."""
    if threads > 0:
        torch.set_num_threads(threads)
    env = os.environ.get("OMP_NUM_THREADS")
    log.info("torch threads: %d (OMP_NUM_THREADS=%s)", torch.get_num_threads(), env)
