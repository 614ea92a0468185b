"""FCN (Long et al.) as torchvision builds it: dilated backbone + ``FCNHead``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models.segmentation.fcn import FCNHead

from wsiseg.models.backbones import build_encoder
from wsiseg.models.base import SegmentationModel
from wsiseg.models.registry import register_model


@register_model("fcn")
class FCN(SegmentationModel):
    """Fully convolutional network on a dilated backbone (output stride 8 / 16).

    Features are the output of torchvision's ``FCNHead`` before its final 1x1
    convolution: ``in_channels // 4`` channels at the backbone's output stride.
    """

    def __init__(
        self, num_classes: int, backbone: str = "resnet50", backbone_weights: str | Path | None = None
    ) -> None:
        super().__init__(num_classes)
        self.encoder = build_encoder(backbone, dilated=True, weights=backbone_weights)
        head = FCNHead(self.encoder.channels[-1], num_classes)
        self.head = nn.Sequential(*list(head)[:-1])
        self.classifier = head[-1]
        self.feature_channels = self.classifier.in_channels
        self.feature_stride = self.encoder.output_stride

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)[-1])
