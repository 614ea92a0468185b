"""DeepLabv3 (Chen et al.) as torchvision builds it: dilated backbone + ASPP head."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from wsiseg.models.backbones import build_encoder
from wsiseg.models.base import SegmentationModel
from wsiseg.models.registry import register_model


@register_model("deeplabv3")
class DeepLabV3(SegmentationModel):
    """DeepLabv3 with torchvision's ``DeepLabHead`` (ASPP rates 12, 24, 36).

    Features are the 256-channel map after ASPP and the 3x3 convolution, at
    the backbone's output stride (8 for ResNets, 16 for MobileNetV3).
    """

    def __init__(
        self, num_classes: int, backbone: str = "resnet50", backbone_weights: str | Path | None = None
    ) -> None:
        super().__init__(num_classes)
        self.encoder = build_encoder(backbone, dilated=True, weights=backbone_weights)
        head = DeepLabHead(self.encoder.channels[-1], num_classes)
        self.head = nn.Sequential(*list(head)[:-1])
        self.classifier = head[-1]
        self.feature_channels = self.classifier.in_channels
        self.feature_stride = self.encoder.output_stride

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)[-1])
