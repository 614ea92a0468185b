"""FCN (Long et al.) as torchvision builds it: dilated backbone + ``FCNHead``."""

from __future__ import annotations

from torch import nn

from wsiseg.models.dilated import DilatedHeadModel
from wsiseg.models.registry import register_model


@register_model("fcn")
class FCN(DilatedHeadModel):
    """Fully convolutional network on a dilated backbone.

    Features are the output of torchvision's ``FCNHead`` before its final 1x1
    convolution: ``in_channels // 4`` channels at the backbone's output stride.
    """

    @staticmethod
    def build_head(in_channels: int, num_classes: int) -> nn.Sequential:
        from torchvision.models.segmentation.fcn import FCNHead

        return FCNHead(in_channels, num_classes)
