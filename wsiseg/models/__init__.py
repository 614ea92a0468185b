"""Segmentation architectures behind one contract and one registry.

Every model is built with :func:`build_model` and follows
``forward(x, context=None) -> (logits, features)``; see
:class:`~wsiseg.models.base.SegmentationModel`.
"""

from wsiseg.models import deeplabv3, fcn, ifbfnet, segnet, unet  # noqa: F401  (registers the architectures)
from wsiseg.models.backbones import available_backbones, build_encoder, load_encoder_weights
from wsiseg.models.base import SegmentationModel
from wsiseg.models.registry import available_models, build_model, register_model

__all__ = [
    "SegmentationModel",
    "available_backbones",
    "available_models",
    "build_encoder",
    "build_model",
    "load_encoder_weights",
    "register_model",
]
