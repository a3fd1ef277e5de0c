"""Detector architectures, chosen by name. Nothing is ever downloaded.

Every model returned here follows torchvision's detection contract: in eval mode
``model(list_of_CHW_float_tensors_in_0_1)`` returns ``[{"boxes", "labels", "scores", ...}]``,
one dict per image, boxes in input-pixel ``[x1, y1, x2, y2]``. The handler relies on that
contract alone, so any user ``nn.Module`` that honours it can be served too.

This module is imported inside TorchServe workers: it depends on torch/torchvision only.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Callable

import torch
from torch import nn
from torchvision.models.detection import FCOS, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign

log = logging.getLogger(__name__)

DEMO_ARCH = "fcos_tiny"

# torchvision's detection builders that this project serves (built with weights=None).
TORCHVISION_ARCHS = (
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
    "ssd300_vgg16",
    "ssdlite320_mobilenet_v3_large",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "keypointrcnn_resnet50_fpn",
)


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class _Residual(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True),
            nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm2d(ch),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class TinyBackbone(nn.Module):
    """A small residual CNN with an FPN: feature maps at strides 8, 16 and 32."""

    def __init__(self, widths: tuple[int, ...] = (24, 32, 64, 112, 160), out_channels: int = 64) -> None:
        super().__init__()
        w = widths
        self.stem = nn.Sequential(_conv_bn(3, w[0], 2), _conv_bn(w[0], w[1], 2), _Residual(w[1]))
        self.c3 = nn.Sequential(_conv_bn(w[1], w[2], 2), _Residual(w[2]), _Residual(w[2]))
        self.c4 = nn.Sequential(_conv_bn(w[2], w[3], 2), _Residual(w[3]), _Residual(w[3]))
        self.c5 = nn.Sequential(_conv_bn(w[3], w[4], 2), _Residual(w[4]))
        self.fpn = FeaturePyramidNetwork([w[2], w[3], w[4]], out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        c3 = self.c3(x)
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        feats: dict[str, torch.Tensor] = OrderedDict()  # an ordered dict, also under TorchScript
        feats["p3"], feats["p4"], feats["p5"] = c3, c4, c5
        return self.fpn(feats)


def fcos_tiny(num_classes: int, min_size: int = 288, max_size: int = 480, **kwargs) -> FCOS:
    """The demo detector: FCOS (anchor-free, GIoU box loss) on a 1.4M-parameter backbone.

    Levels p3/p4/p5 (strides 8/16/32) take objects whose centre-to-edge distance is
    below 32, 32-64 and above 64 pixels: sizes match 15-250 px objects, not COCO's range.
    """
    backbone = TinyBackbone()
    anchors = AnchorGenerator(sizes=((4,), (8,), (16,)), aspect_ratios=((1.0,),) * 3)
    head = FCOSHead(backbone.out_channels, 1, num_classes, num_convs=2)
    params = {"score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_img": 100,
              "center_sampling_radius": 3.0, "topk_candidates": 1000}
    params.update(kwargs)
    return FCOS(backbone, num_classes, min_size=min_size, max_size=max_size,
                anchor_generator=anchors, head=head, **params)


def maskrcnn_tiny(num_classes: int, min_size: int = 288, max_size: int = 480, **kwargs) -> MaskRCNN:
    """A small Mask R-CNN: the demo's backbone (so it can start from the demo's weights),
    anchors for 15-250 px objects, a 256-wide box head and a 2-layer 64-channel mask head.
    """
    backbone = TinyBackbone()
    ch = backbone.out_channels
    levels = ["p3", "p4", "p5"]
    anchors = AnchorGenerator(sizes=((16, 24), (32, 48), (64, 128)), aspect_ratios=((0.5, 1.0, 2.0),) * 3)
    params = {"rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300,
              "rpn_pre_nms_top_n_test": 500, "rpn_post_nms_top_n_test": 300,
              "box_batch_size_per_image": 128, "box_score_thresh": 0.05, "box_detections_per_img": 100}
    params.update(kwargs)
    return MaskRCNN(
        backbone, num_classes=None, min_size=min_size, max_size=max_size,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(levels, 7, 2),
        box_head=TwoMLPHead(ch * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, num_classes),
        mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
        mask_head=MaskRCNNHeads(ch, [64, 64], 1), mask_predictor=MaskRCNNPredictor(64, 64, num_classes),
        **params,
    )


_LOCAL: dict[str, Callable[..., nn.Module]] = {"fcos_tiny": fcos_tiny, "maskrcnn_tiny": maskrcnn_tiny}


def task_of(arch: str | None) -> str:
    """What an architecture predicts: ``"boxes"``, ``"masks"`` (+ boxes) or ``"keypoints"`` (+ boxes)."""
    if arch and arch.startswith("maskrcnn"):
        return "masks"
    if arch and arch.startswith("keypointrcnn"):
        return "keypoints"
    return "boxes"


def available_archs() -> list[str]:
    """Every architecture name :func:`build_model` accepts."""
    return sorted(_LOCAL) + list(TORCHVISION_ARCHS)


def parse_model_kwargs(raw: str | None) -> dict:
    """``--model-kwargs`` JSON (the builder's extra keyword arguments) as a dict.

    Raises:
        ValueError: not a JSON object, with an example of one.
    """
    if not raw:
        return {}
    import json

    try:
        kwargs = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"--model-kwargs must be a JSON object: {exc}") from None
    if not isinstance(kwargs, dict):
        raise ValueError("--model-kwargs must be a JSON object such as '{\"min_size\": 512}'")
    return kwargs


def build_model(arch: str, num_classes: int, **kwargs) -> nn.Module:
    """Build ``arch`` with ``num_classes`` outputs (background included), randomly initialised.

    Raises:
        ValueError: unknown architecture or a class count below 2.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must count the background too (>= 2), got {num_classes}")
    if arch in _LOCAL:
        return _LOCAL[arch](num_classes, **kwargs)
    if arch in TORCHVISION_ARCHS:
        import torchvision

        return torchvision.models.get_model(
            arch, weights=None, weights_backbone=None, num_classes=num_classes, **kwargs
        )
    raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(available_archs())}")


def load_state_dict_file(path: str, map_location: str | torch.device = "cpu",
                         raw: Any = None) -> dict[str, torch.Tensor]:
    """A state_dict as float32 tensors, from a plain state_dict file, a training checkpoint holding
    one under ``"model"`` (torchvision's references) or ``"state_dict"`` (PyTorch Lightning).

    ``raw``: the file's already-loaded content, to avoid reading it twice.
    """
    obj = torch.load(path, map_location=map_location, weights_only=True) if raw is None else raw
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = type(obj).__name__ if not isinstance(obj, dict) else f"a dict with keys {sorted(obj)[:6]}"
        raise ValueError(f"{path} does not hold a state_dict (found {found}); save model.state_dict(), "
                         "or a checkpoint with it under 'model' or 'state_dict'")
    return {k: (v.float() if torch.is_floating_point(v) else v) for k, v in obj.items()}


def _ignorable(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def fit_state_dict(model_keys: Iterable[str], state: dict[str, torch.Tensor],
                   prefix: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """``state`` with the key prefix that maps it onto ``model_keys`` stripped, and that prefix.

    A Lightning module keeps the detector as an attribute (``self.model``), so its checkpoint's
    keys read ``model.backbone...``. ``prefix`` None finds the prefix that covers every model key
    (``""`` when the keys already fit); a given one is used as is.

    When nothing fits, ``state`` comes back as is (:func:`load_weights` then names the mismatch).

    Raises:
        ValueError: the given ``prefix`` does not make the keys fit, with both sides' first keys.
    """
    needed = [k for k in model_keys if not _ignorable(k)]
    if prefix is None:
        candidates = {""} | {key[:-len(k)] for key in state for k in needed[:1] if key.endswith(k)}
    else:
        candidates = {prefix}
    best, best_cover = "", -1
    for p in sorted(candidates, key=len):
        cover = sum(1 for k in needed if p + k in state)
        if cover > best_cover:
            best, best_cover = p, cover
    if best_cover < len(needed):
        if prefix is None:  # nothing fits whole: load_weights names the missing and unexpected keys
            return state, ""
        raise ValueError(f"the prefix {prefix!r} maps {best_cover} of the model's {len(needed)} keys: file "
                         f"keys start {sorted(state)[:3]}, model keys {needed[:3]}; fix --weights-prefix "
                         "(make archive WEIGHTS_PREFIX=...) or leave it out to have it found")
    return {k[len(best):]: v for k, v in state.items() if k.startswith(best)}, best


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state_dict") -> None:
    """Load ``state`` strictly, naming missing/unexpected keys and shape mismatches on failure."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    # FrozenBatchNorm2d drops BatchNorm's counters itself: a state_dict trained with BatchNorm fits
    unexpected = [k for k in state if k not in own and not _ignorable(k)]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (first: {'; '.join(shapes[:3])})")
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
        raise ValueError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict({k: v for k, v in state.items() if k in own})
