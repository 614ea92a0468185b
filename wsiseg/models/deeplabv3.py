"""DeepLabv3 (Chen et al.) as torchvision builds it: dilated backbone + ASPP head."""

from __future__ import annotations

from torch import nn

from wsiseg.models.dilated import DilatedHeadModel
from wsiseg.models.registry import register_model


@register_model("deeplabv3")
class DeepLabV3(DilatedHeadModel):
    """DeepLabv3 with torchvision's ``DeepLabHead`` (ASPP rates 12, 24, 36).

    Features are the 256-channel map after ASPP and the 3x3 convolution, at
    the backbone's output stride (8 for ResNets, 16 for MobileNetV3).
    """

    @staticmethod
    def build_head(in_channels: int, num_classes: int) -> nn.Sequential:
        from torchvision.models.segmentation.deeplabv3 import DeepLabHead

        return DeepLabHead(in_channels, num_classes)
