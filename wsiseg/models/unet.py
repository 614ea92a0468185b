"""U-Net (Ronneberger et al.) on a ResNet / MobileNetV3 encoder, with skip concatenation."""

from __future__ import annotations

from wsiseg.models.decoder import EncoderDecoder
from wsiseg.models.registry import register_model


@register_model("unet")
class UNet(EncoderDecoder):
    """U-Net: each decoder step concatenates the encoder stage of the same stride."""

    use_skips = True
