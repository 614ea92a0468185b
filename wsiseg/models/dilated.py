"""Shared shape of FCN and DeepLabv3: a dilated backbone and a torchvision head.

The head's last layer (a 1x1 convolution to the classes) becomes the
model's ``classifier``; everything before it produces the features.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from wsiseg.models.backbones import build_encoder
from wsiseg.models.base import SegmentationModel


class DilatedHeadModel(SegmentationModel):
    """Dilated encoder (output stride 8 for ResNets, 16 for MobileNetV3) + ``build_head``."""

    @staticmethod
    def build_head(in_channels: int, num_classes: int) -> nn.Sequential:
        """A torchvision head whose last layer is the 1x1 classifier convolution."""
        raise NotImplementedError

    def __init__(
        self, num_classes: int, backbone: str = "resnet50", backbone_weights: str | Path | None = None
    ) -> None:
        super().__init__(num_classes)
        self.encoder = build_encoder(backbone, dilated=True, weights=backbone_weights)
        head = self.build_head(self.encoder.channels[-1], num_classes)
        self.head = nn.Sequential(*list(head)[:-1])
        self.classifier = head[-1]
        self.feature_channels = self.classifier.in_channels
        self.feature_stride = self.encoder.output_stride

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)[-1])
