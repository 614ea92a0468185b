"""Registry of segmentation architectures, keyed by name (as torchvision does)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from wsiseg.errors import ModelConfigError
from wsiseg.models.backbones import available_backbones
from wsiseg.models.base import SegmentationModel
from wsiseg.config import DEFAULT_BACKBONE, INPUT_TRANSFORMS
from wsiseg.stain import InputTransform

ModelClass = TypeVar("ModelClass", bound=type[SegmentationModel])

_REGISTRY: dict[str, type[SegmentationModel]] = {}


def register_model(name: str) -> Callable[[ModelClass], ModelClass]:
    """Class decorator adding an architecture to :func:`build_model`'s registry.

    The class is called as ``cls(num_classes, backbone=..., backbone_weights=...)``.
    """

    def decorate(cls: ModelClass) -> ModelClass:
        if name in _REGISTRY:
            raise RuntimeError(f"architecture {name!r} registered twice")
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(_REGISTRY)


def build_model(
    arch: str,
    num_classes: int,
    backbone: str = DEFAULT_BACKBONE,
    backbone_weights: str | Path | None = None,
    input_transform: str = "rgb",
) -> SegmentationModel:
    """Build a segmentation model by name.

    Parameters
    ----------
    arch : str
        One of :func:`available_models` (``"fcn"``, ``"deeplabv3"``,
        ``"unet"``, ``"segnet"``, ...).
    num_classes : int
        1 for a binary task (sigmoid), K >= 2 for K-class softmax.
    backbone : str
        One of :func:`~wsiseg.models.backbones.available_backbones`.
    backbone_weights : path, optional
        Local file of backbone weights; nothing is ever downloaded.
    input_transform : str
        ``"rgb"`` or ``"hematoxylin"`` (:class:`~wsiseg.stain.InputTransform`).

    Returns
    -------
    SegmentationModel
        With ``model.spec == {"arch", "backbone", "num_classes"}`` (and
        ``"input"`` unless RGB) recorded so that a bundle can rebuild it.
    """
    if arch not in _REGISTRY:
        raise ModelConfigError(
            f"unknown architecture {arch!r}; choose one of {', '.join(available_models())}"
        )
    if backbone not in available_backbones():
        raise ModelConfigError(
            f"unknown backbone {backbone!r}; choose one of {', '.join(available_backbones())}"
        )
    if input_transform not in INPUT_TRANSFORMS:
        raise ModelConfigError(
            f"unknown input transform {input_transform!r}; choose one of {', '.join(INPUT_TRANSFORMS)}"
        )
    model = _REGISTRY[arch](num_classes, backbone=backbone, backbone_weights=backbone_weights)
    model.spec = {"arch": arch, "backbone": backbone, "num_classes": num_classes}
    if input_transform != "rgb":
        model.input_transform = InputTransform(input_transform)
        model.spec["input"] = input_transform
    return model
