"""SegNet-style encoder-decoder (Badrinarayanan et al.) on a ResNet / MobileNetV3 encoder."""

from __future__ import annotations

from wsiseg.models.decoder import EncoderDecoder
from wsiseg.models.registry import register_model


@register_model("segnet")
class SegNet(EncoderDecoder):
    """SegNet: a mirrored decoder that upsamples without encoder skip connections.

    The original SegNet reuses max-pooling indices; with a ResNet encoder
    (as in the two-stage paper) only the stem pools, so the decoder upsamples
    by nearest-neighbour interpolation and relies on its convolutions alone.
    """

    use_skips = False
