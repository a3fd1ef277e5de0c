"""Building a user's model never downloads: pretrained-weight downloads are intercepted.

Tutorial model files build their backbone with ImageNet weights
(``resnet_fpn_backbone('resnet50', True)``, ``weights="DEFAULT"``) and then load the fine-tuned
state_dict over them. Served, that downloads ~100 MB at archive time and again in every worker at
every start, and fails offline with a ``URLError`` traceback. While the model is constructed,
:func:`intercept_downloads` answers every ``torch.hub`` / torchvision weight download with an empty
placeholder that ``load_state_dict`` accepts as a no-op, and records the URL, the model file's line
and the modules that would have been filled. :meth:`Downloads.check_covered` then insists that the
archive's state_dict fills those modules itself; if so the model serves offline (one warning with
the fix, ``weights=None``), else it is refused naming the keys only the download would have given.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

log = logging.getLogger(__name__)

# (module, attribute) pairs through which torch and torchvision fetch weights
_TARGETS = (("torch.hub", "load_state_dict_from_url"), ("torch.hub", "download_url_to_file"),
            ("torch.utils.model_zoo", "load_url"),
            ("torchvision._internally_replaced_utils", "load_state_dict_from_url"),
            ("torchvision.models._api", "load_state_dict_from_url"))


class ModelFileError(ValueError):
    """A user's model file fails to import or build, or leans on a download; the message names its line."""


class SkippedDownload(dict):
    """The empty stand-in for a downloaded state_dict; ``load_state_dict`` of it changes nothing."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url


@dataclass
class Download:
    url: str
    where: str  # "model.py:12" (the user's line), else the outermost non-library frame
    modules: list[nn.Module] = field(default_factory=list)  # what the download would have filled


@dataclass
class Downloads:
    """The downloads a model's construction asked for (none, usually)."""

    source: Path | None = None
    seen: list[Download] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.seen)

    def keys_filled(self, model: nn.Module) -> list[str]:
        """The model's state_dict keys that the skipped downloads would have filled (matched by tensor:
        torchvision re-wraps a downloaded backbone's children, e.g. in an ``IntermediateLayerGetter``)."""
        filled = {id(t) for d in self.seen for m in d.modules for t in m.state_dict(keep_vars=True).values()}
        return [k for k, t in model.state_dict(keep_vars=True).items() if id(t) in filled]

    def describe(self) -> str:
        return "; ".join(f"{d.where} downloads {d.url}" for d in self.seen)

    def check_covered(self, model: nn.Module, state: dict, weights_name: str) -> None:
        """Raise ValueError when ``state`` leaves keys that only the downloads would have filled;
        else warn once that the download was skipped, with the fix."""
        if not self:
            return
        missing = [k for k in self.keys_filled(model) if k not in state]
        if missing:
            raise ModelFileError(
                f"{self.describe()} while the model is built (skipped: nothing is downloaded here), and "
                f"{weights_name} does not hold {len(missing)} of the keys that download would have filled "
                f"(first: {', '.join(missing[:4])}). Archive the state_dict of the whole trained model "
                "(torch.save(model.state_dict(), PATH)), or build with weights=None if those layers "
                "should start random")
        log.warning("%s while the model is built: skipped, %s covers every parameter and buffer, so the "
                    "archive serves offline. Fix: build it with weights=None (e.g. resnet_fpn_backbone("
                    "backbone_name='resnet50', weights=None)) so nothing tries to download",
                    self.describe(), weights_name)


def _caller(source: Path | None) -> str:
    """``file:line`` of the model file's frame that led to the download (else the user's outermost)."""
    frames = traceback.extract_stack()[:-2]
    if source is not None:
        for fr in reversed(frames):
            if Path(fr.filename).resolve() == source:
                return f"{source.name}:{fr.lineno}"
    for fr in reversed(frames):
        if "site-packages" not in fr.filename and "/lib/python" not in fr.filename:
            return f"{Path(fr.filename).name}:{fr.lineno}"
    return "the model's constructor"


_LOCK = threading.RLock()  # the patches are process-wide: one model is built at a time under them


@contextlib.contextmanager
def intercept_downloads(source: str | Path | None = None) -> Iterator[Downloads]:
    """Within the block no weight download happens; what was asked for is in the yielded record.

    The patches are process-wide, so blocks are serialised (the KServe server builds models in
    several threads)."""
    with _LOCK, _intercepting(Path(source).resolve() if source else None) as record:
        yield record


@contextlib.contextmanager
def _intercepting(source: Path | None) -> Iterator[Downloads]:
    record = Downloads(source)

    def fetch_state(url, *args, **kwargs):
        record.seen.append(Download(str(url), _caller(record.source)))
        return SkippedDownload(str(url))

    def fetch_file(url, *args, **kwargs):
        where = _caller(record.source)
        raise ModelFileError(f"{where} downloads {url} to a file while the model is built: nothing is "
                         "downloaded here; build the model with weights=None and archive its state_dict")

    original_load = nn.Module.load_state_dict

    def load_state_dict(self, state_dict, *args, **kwargs):
        if isinstance(state_dict, SkippedDownload):
            for d in record.seen:
                if d.url == state_dict.url:
                    d.modules.append(self)
            return nn.modules.module._IncompatibleKeys([], [])
        return original_load(self, state_dict, *args, **kwargs)

    saved = []
    for mod_name, attr in _TARGETS:
        mod = sys.modules.get(mod_name)
        if mod is None:
            with contextlib.suppress(ImportError):
                mod = __import__(mod_name, fromlist=[attr])
        if mod is not None and hasattr(mod, attr):
            saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, fetch_file if attr == "download_url_to_file" else fetch_state)
    nn.Module.load_state_dict = load_state_dict
    try:
        with warnings.catch_warnings():  # torchvision's "pretrained is deprecated": the one warning is ours
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision.models._utils")
            yield record
    finally:
        nn.Module.load_state_dict = original_load
        for mod, attr, value in saved:
            setattr(mod, attr, value)
