# The model file of TorchServe's object-detection tutorial (examples/object_detector/fast-rcnn), as users
# copy it: the backbone asks for ImageNet weights (`True`) that the fine-tuned state_dict then overwrites.
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FasterRCNN


class FRCNNObjectDetector(FasterRCNN):
    def __init__(self, num_classes=91, **kwargs):
        backbone = resnet_fpn_backbone('resnet50', True)
        super(FRCNNObjectDetector, self).__init__(backbone, num_classes, **kwargs)  # noqa: UP008 (the tutorial's line)
