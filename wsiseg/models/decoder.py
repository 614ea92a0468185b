"""A progressive upsampling decoder shared by U-Net and SegNet.

Both architectures take the encoder's five stages (strides 2 to 32) and
upsample back to full resolution in five steps of two 3x3 conv-BN-ReLU
layers each. U-Net concatenates the encoder stage of the same stride before
each step; SegNet does not.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wsiseg.models.backbones import build_encoder
from wsiseg.models.base import SegmentationModel, conv_bn_relu

DECODER_CHANNELS = (256, 128, 64, 32, 16)
#: A narrower decoder for encoders whose deepest stage has at most 256 channels.
LIGHT_DECODER_CHANNELS = (96, 48, 32, 24, 16)


class DecoderBlock(nn.Module):
    """Upsample to a target size, optionally concatenate a skip, two conv-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            conv_bn_relu(in_channels + skip_channels, out_channels),
            conv_bn_relu(out_channels, out_channels),
        )

    def forward(
        self, x: torch.Tensor, size: tuple[int, int], skip: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.convs(x)


class EncoderDecoder(SegmentationModel):
    """Encoder + five :class:`DecoderBlock` steps; features at full resolution.

    Subclasses set ``use_skips``. The decoder widths are ``DECODER_CHANNELS``,
    or ``LIGHT_DECODER_CHANNELS`` for light encoders; features are the last
    block's 16 channels at stride 1.
    """

    use_skips: bool = True

    def __init__(
        self, num_classes: int, backbone: str = "resnet50", backbone_weights: str | Path | None = None
    ) -> None:
        super().__init__(num_classes)
        self.encoder = build_encoder(backbone, dilated=False, weights=backbone_weights)
        stage_channels = self.encoder.channels
        widths = LIGHT_DECODER_CHANNELS if stage_channels[-1] <= 256 else DECODER_CHANNELS
        if len(stage_channels) != len(widths):
            raise RuntimeError(f"backbone {backbone!r} must have {len(widths)} stages")
        # Skips for the first four steps: encoder stages 3, 2, 1, 0; none for the last.
        skips = [*reversed(stage_channels[:-1]), 0] if self.use_skips else [0] * len(widths)
        in_channels = [stage_channels[-1], *widths[:-1]]
        self.blocks = nn.ModuleList(
            DecoderBlock(c_in, c_skip, c_out) for c_in, c_skip, c_out in zip(in_channels, skips, widths)
        )
        self.classifier = nn.Conv2d(widths[-1], num_classes, kernel_size=1)
        self.feature_channels = widths[-1]
        self.feature_stride = 1

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        stages = self.encoder(x)
        # Target sizes: the encoder stages of stride 16, 8, 4, 2, then the input.
        targets = [s.shape[-2:] for s in reversed(stages[:-1])] + [x.shape[-2:]]
        skips = list(reversed(stages[:-1])) + [None]
        y = stages[-1]
        for block, size, skip in zip(self.blocks, targets, skips):
            y = block(y, tuple(size), skip if self.use_skips else None)
        return y
