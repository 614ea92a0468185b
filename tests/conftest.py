"""Shared test helpers: small models that follow the SegmentationModel contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from wsiseg.models.base import SegmentationModel


class TinyFCN(SegmentationModel):
    """A small fully convolutional model with a known receptive field.

    ``depth`` 3x3 convolutions (radius ``depth``) after an optional stride-2
    convolution; BatchNorm-free so that outputs do not depend on the batch.
    """

    def __init__(self, num_classes: int = 1, channels: int = 8, depth: int = 3, stride: int = 1) -> None:
        super().__init__(num_classes)
        layers: list[nn.Module] = []
        in_ch = 3
        if stride == 2:
            layers += [nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.ReLU()]
            in_ch = channels
        for _ in range(depth):
            layers += [nn.Conv2d(in_ch, channels, 3, padding=1), nn.ReLU()]
            in_ch = channels
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.feature_channels = channels
        self.feature_stride = stride

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth-ish random RGB uint8 image (so models give varied outputs)."""
    noise = rng.random((height // 8 + 2, width // 8 + 2, 3))
    big = np.kron(noise, np.ones((8, 8, 1)))[:height, :width]
    return (255 * (0.7 * big + 0.3 * rng.random((height, width, 3)))).astype(np.uint8)
