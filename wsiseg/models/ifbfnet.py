"""IFBFNet (Li et al., "Inter-Level Feature Balanced Fusion Network for Street
Scene Segmentation", Sensors 2021).

Layout, at output stride 16::

    image -> dilated ResNet (last stage: stride 1, dilation 2)
          -> ASPP (1x1, 3x3 rates 6 / 12 / 18, image pooling; 256 ch)
          -> x4 upsampling to stride 4
    stage-1 features (stride 4) -> 3x3 conv to 64 ch
    balance(ASPP, stage 1) -> two 3x3 convs to 256 ch                    (fusion 1)
    spatial stream: image -> 7x7 s2 -> 3x3 s2 -> 1x1 to 128 ch (stride 4)
    balance(decoder, spatial) -> 1x1 conv to 256 ch                      (fusion 2)
    head: 1x1 conv to 128 ch (the features) -> 1x1 classifier -> x4 upsampling
    auxiliary head on stage 1: 3x3 conv to 64 -> 1x1 to K (training only)

A feature-balanced fusion block concatenates its two inputs, pools the
concatenation globally, maps it through a 1x1 convolution and a sigmoid to
one weight per channel, multiplies the concatenation by those weights and
adds the unweighted concatenation back (a residual).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wsiseg.models.backbones import ResNetEncoder, _dilate_basic_stage, build_encoder
from wsiseg.errors import ModelConfigError
from wsiseg.models.base import SegmentationModel, conv_bn_relu
from wsiseg.models.registry import register_model


class BalancedFusion(nn.Module):
    """Feature-balanced fusion of two maps of equal size.

    ``forward(a, b)`` returns ``(N, Ca + Cb, H, W)``: ``cat * w + cat`` with
    ``w = sigmoid(conv1x1(global_avg_pool(cat)))`` in (0, 1), one per channel.
    The last weights are kept in ``self.last_weights`` for inspection.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weigh = nn.Conv2d(channels, channels, kernel_size=1)
        self.last_weights: torch.Tensor | None = None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([a, b], dim=1)
        weights = torch.sigmoid(self.weigh(F.adaptive_avg_pool2d(joined, 1)))
        self.last_weights = weights.detach()
        return joined * weights + joined


@register_model("ifbfnet")
class IFBFNet(SegmentationModel):
    """IFBFNet with the shared ``forward(x, context) -> (logits, features)`` contract.

    Features are the 128-channel head output at stride 4. In training mode the
    auxiliary logits of the stage-1 head (input size) are left in
    ``self.aux_logits``; in eval mode that attribute is None.
    """

    aux_logits: torch.Tensor | None

    def __init__(
        self, num_classes: int, backbone: str = "resnet50", backbone_weights: str | Path | None = None
    ) -> None:
        super().__init__(num_classes)
        self.encoder = _ifbf_encoder(backbone, backbone_weights)
        stage1, deepest = self.encoder.channels[1], self.encoder.channels[-1]
        from torchvision.models.segmentation.deeplabv3 import ASPP  # lazily: torchvision is large

        self.aspp = ASPP(deepest, [6, 12, 18], out_channels=256)
        self.reduce = conv_bn_relu(stage1, 64)
        self.fusion1 = BalancedFusion(256 + 64)
        self.decode = nn.Sequential(conv_bn_relu(256 + 64, 256), conv_bn_relu(256, 256))
        self.spatial = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.Conv2d(64, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
        )
        self.fusion2 = BalancedFusion(256 + 128)
        self.merge = conv_bn_relu(256 + 128, 256, kernel_size=1)
        self.head = conv_bn_relu(256, 128, kernel_size=1)
        self.classifier = nn.Conv2d(128, num_classes, kernel_size=1)
        self.aux_head = nn.Sequential(conv_bn_relu(stage1, 64), nn.Conv2d(64, num_classes, kernel_size=1))
        self.feature_channels = 128
        self.feature_stride = 4
        self.aux_logits = None

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        stages = self.encoder(x)
        low = stages[1]  # stride 4
        size = low.shape[-2:]
        context = F.interpolate(self.aspp(stages[-1]), size=size, mode="bilinear", align_corners=False)
        decoded = self.decode(self.fusion1(context, self.reduce(low)))
        spatial = self.spatial(x)
        if spatial.shape[-2:] != size:
            spatial = F.interpolate(spatial, size=size, mode="bilinear", align_corners=False)
        features = self.head(self.merge(self.fusion2(decoded, spatial)))
        if self.training:
            aux = self.aux_head(low)
            self.aux_logits = F.interpolate(aux, scale_factor=4, mode="bilinear", align_corners=False)[
                ..., : x.shape[-2], : x.shape[-1]
            ]
        else:
            self.aux_logits = None
        return features


def _ifbf_encoder(backbone: str, weights: str | Path | None) -> ResNetEncoder:
    """A ResNet at output stride 16: dilations (1, 2), strides (2, 1) in the last two stages."""
    encoder = build_encoder(backbone, dilated=False, weights=weights)
    if not isinstance(encoder, ResNetEncoder):
        raise ModelConfigError(f"IFBFNet needs a ResNet backbone, not {backbone!r}")
    layer4 = encoder.body.layer4
    if hasattr(layer4[0], "conv3"):
        # Bottleneck blocks: the first block's 3x3 (conv2) carries the stride, as in torchvision.
        for index, block in enumerate(layer4):
            d = 1 if index == 0 else 2
            block.conv2.stride, block.conv2.dilation, block.conv2.padding = (1, 1), (d, d), (d, d)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
    else:
        _dilate_basic_stage(layer4, previous_dilation=1, dilation=2)
    encoder._record_shapes()
    return encoder
