# The demo detector as a TorchServe example's model file: one class with a no-argument constructor, for
# the stock `object_detector` handler. Its layers come from an extra file of the archive (shapes_layers.py,
# a copy of serve_demo/core/models.py), as users ship their own helper modules.
import shapes_layers
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead


class ShapesDetector(FCOS):
    def __init__(self, num_classes=6):
        backbone = shapes_layers.TinyBackbone()
        anchors = AnchorGenerator(sizes=((4,), (8,), (16,)), aspect_ratios=((1.0,),) * 3)
        head = FCOSHead(backbone.out_channels, 1, num_classes, num_convs=2)
        super().__init__(backbone, num_classes, min_size=288, max_size=480, anchor_generator=anchors, head=head,
                         score_thresh=0.05, nms_thresh=0.5, detections_per_img=100, center_sampling_radius=3.0,
                         topk_candidates=1000)
