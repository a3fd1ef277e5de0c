"""A deterministic detector honouring torchvision's contract (tests of the model-file path).

For an image of size W x H it always answers three boxes whose coordinates follow the size, so
expected outputs are exact numbers: label 1 (score 0.9), label 2 (0.6) and label 7 (0.3), where
7 is missing from the test label map (reported by its number, never a 500).
"""

import torch
from torch import nn


class FixedDetector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, images):
        out = []
        for im in images:
            h, w = im.shape[-2:]
            boxes = torch.tensor([[0.0, 0.0, w / 2, h / 2], [w / 4, h / 4, w - 1, h - 1],
                                  [1.0, 2.0, 3.0, 4.0]]) * self.scale
            out.append({"boxes": boxes, "labels": torch.tensor([1, 2, 7]),
                        "scores": torch.tensor([0.9, 0.6, 0.3])})
        return out
