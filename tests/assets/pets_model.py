"""The seed's way to bring a model: one detector class in a model file (Oxford Pets shape).

A Faster R-CNN ResNet-50 FPN with 3 classes (background, cat, dog), no pretrained weights.
"""

from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone


class FRCNNObjectDetector(FasterRCNN):
    def __init__(self, num_classes: int = 3, **kwargs) -> None:
        backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None)
        super().__init__(backbone, num_classes, min_size=320, max_size=512, **kwargs)
