"""Encoders (ResNet, MobileNetV3) that return one feature map per stage.

Weights never download: a backbone starts from random initialisation unless
the caller passes the path of a local weights file (safetensors, or a torch
checkpoint read with ``weights_only=True``), for example torchvision's
ImageNet ``resnet50-*.pth`` copied onto the machine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from wsiseg.errors import ModelConfigError, WeightsError


#: Stage widths of the ``resnet_lite`` backbone.
LITE_WIDTHS = (32, 32, 64, 128, 256)


class Encoder(nn.Module):
    """A backbone split into stages of increasing stride.

    Attributes
    ----------
    name : str
        Backbone name, e.g. ``"resnet18"``.
    channels : tuple[int, ...]
        Channels of each stage's output.
    strides : tuple[int, ...]
        Input-to-output downsampling factor of each stage (non-decreasing).
    body : nn.Module
        The torchvision network whose ``state_dict`` keys match torchvision's
        published checkpoints (classification head removed).
    """

    name: str
    channels: tuple[int, ...]
    strides: tuple[int, ...]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the output of every stage for a normalised ``(N, 3, H, W)`` batch."""
        raise NotImplementedError

    @property
    def output_stride(self) -> int:
        """Stride of the last stage."""
        return self.strides[-1]

    def _record_shapes(self) -> None:
        """Find each stage's channels and stride with one small dry run."""
        was_training = self.training
        self.eval()
        size = 64
        with torch.no_grad():
            outputs = self(torch.zeros(1, 3, size, size))
        self.train(was_training)
        self.channels = tuple(int(o.shape[1]) for o in outputs)
        self.strides = tuple(size // int(o.shape[-1]) for o in outputs)


class ResNetEncoder(Encoder):
    """torchvision ResNet as five stages (strides 2, 4, 8, 16, 32).

    With ``dilated=True`` the last two stages keep stride 8 and use dilation
    2 and 4 instead, as torchvision's FCN and DeepLabv3 do (output stride 8).
    """

    def __init__(self, name: str, dilated: bool = False) -> None:
        from torchvision.models import resnet  # only here: importing torchvision costs ~170 MB per process

        super().__init__()
        builder: Callable[..., nn.Module] = getattr(resnet, name)
        bottleneck = name not in ("resnet18", "resnet34")
        if dilated and bottleneck:
            body = builder(weights=None, replace_stride_with_dilation=[False, True, True])
        else:
            body = builder(weights=None)
            if dilated:
                _dilate_basic_stage(body.layer3, previous_dilation=1, dilation=2)
                _dilate_basic_stage(body.layer4, previous_dilation=2, dilation=4)
        body.fc = nn.Identity()
        self.name = name
        self.body = body
        self._record_shapes()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b = self.body
        stem = b.relu(b.bn1(b.conv1(x)))
        c1 = b.layer1(b.maxpool(stem))
        c2 = b.layer2(c1)
        c3 = b.layer3(c2)
        c4 = b.layer4(c3)
        return [stem, c1, c2, c3, c4]


def _dilate_basic_stage(stage: nn.Sequential, previous_dilation: int, dilation: int) -> None:
    """Turn a strided BasicBlock stage into a dilated one, in place.

    Mirrors torchvision's ``replace_stride_with_dilation`` for Bottleneck
    stages: the first block keeps the previous dilation on its (formerly
    strided) convolution, every other 3x3 convolution gets ``dilation``.
    """
    for block_index, block in enumerate(stage):
        for conv_name in ("conv1", "conv2"):
            conv: nn.Conv2d = getattr(block, conv_name)
            conv.stride = (1, 1)
            d = previous_dilation if (block_index == 0 and conv_name == "conv1") else dilation
            conv.dilation = (d, d)
            conv.padding = (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
        block.stride = 1


class _BasicBlock(nn.Module):
    """A ResNet basic block: two 3x3 convolutions with batch norm and a residual.

    Parameter names (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``downsample``)
    match torchvision's ``BasicBlock``, so the dilation helper and saved
    weights treat both alike; defined here so that ``resnet_lite`` models
    never import torchvision.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class _LiteResNet(nn.Module):
    """A small ResNet: a 3x3 stem and one BasicBlock per stage, every stage strided.

    Attribute names follow torchvision's ResNet (``conv1``, ``bn1``, ``relu``,
    ``maxpool``, ``layer1`` .. ``layer4``) so :class:`ResNetEncoder` drives it.
    """

    def __init__(self, widths: tuple[int, int, int, int, int] = LITE_WIDTHS) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        for index in range(1, 5):
            c_in, c_out = widths[index - 1], widths[index]
            downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=2, bias=False), nn.BatchNorm2d(c_out))
            setattr(self, f"layer{index}", nn.Sequential(_BasicBlock(c_in, c_out, 2, downsample)))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


class LiteResNetEncoder(ResNetEncoder):
    """``resnet_lite``: five stages of widths 32, 32, 64, 128, 256 (about 1.2 M weights).

    Purely local (no global pooling anywhere), so tiled inference with a halo
    matches whole-image inference; fast enough to train from scratch on a CPU.
    """

    def __init__(self, dilated: bool = False) -> None:
        Encoder.__init__(self)
        body = _LiteResNet()
        if dilated:
            _dilate_basic_stage(body.layer3, previous_dilation=1, dilation=2)
            _dilate_basic_stage(body.layer4, previous_dilation=2, dilation=4)
        self.name = "resnet_lite"
        self.body = body
        self._record_shapes()


class MobileNetV3Encoder(Encoder):
    """torchvision MobileNetV3-Large features; stages end where the stride changes.

    ``dilated=True`` keeps the last stage at stride 16 (torchvision's
    DeepLabv3-MobileNetV3 setting); otherwise it reaches stride 32.
    """

    def __init__(self, name: str = "mobilenet_v3_large", dilated: bool = False) -> None:
        super().__init__()
        from torchvision.models import mobilenetv3

        body = mobilenetv3.mobilenet_v3_large(weights=None, dilated=dilated)
        body.avgpool = nn.Identity()
        body.classifier = nn.Identity()
        self.name = name
        self.body = body
        self._stage_ends = _stage_ends(body.features)
        self._record_shapes()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        ends = set(self._stage_ends)
        for index, layer in enumerate(self.body.features):
            x = layer(x)
            if index in ends:
                outputs.append(x)
        return outputs


def _stage_ends(features: nn.Sequential) -> list[int]:
    """Indices of the last layer of ``features`` at each distinct stride."""
    size = 64
    strides = []
    with torch.no_grad():
        x = torch.zeros(1, 3, size, size)
        was_training = features.training
        features.eval()
        for layer in features:
            x = layer(x)
            strides.append(size // x.shape[-1])
        features.train(was_training)
    return [i for i in range(len(strides)) if i == len(strides) - 1 or strides[i + 1] != strides[i]]


_BACKBONES: dict[str, Callable[[bool], Encoder]] = {
    "resnet18": lambda dilated: ResNetEncoder("resnet18", dilated),
    "resnet34": lambda dilated: ResNetEncoder("resnet34", dilated),
    "resnet50": lambda dilated: ResNetEncoder("resnet50", dilated),
    "resnet101": lambda dilated: ResNetEncoder("resnet101", dilated),
    "mobilenet_v3_large": lambda dilated: MobileNetV3Encoder("mobilenet_v3_large", dilated),
    "resnet_lite": lambda dilated: LiteResNetEncoder(dilated),
}


def available_backbones() -> list[str]:
    """Names accepted by :func:`build_encoder`."""
    return sorted(_BACKBONES)


def build_encoder(name: str, dilated: bool = False, weights: str | Path | None = None) -> Encoder:
    """Build a backbone, optionally loading local weights.

    Parameters
    ----------
    name : str
        One of :func:`available_backbones`.
    dilated : bool
        Replace the last strides by dilation (output stride 8 for ResNets,
        16 for MobileNetV3), as FCN / DeepLabv3 do.
    weights : path, optional
        Local weights file; see :func:`load_encoder_weights`.
    """
    if name not in _BACKBONES:
        raise ModelConfigError(
            f"unknown backbone {name!r}; choose one of {', '.join(available_backbones())}"
        )
    encoder = _BACKBONES[name](dilated)
    if weights is not None:
        load_encoder_weights(encoder, weights)
    return encoder


_HEAD_PREFIXES = ("fc.", "classifier.")
_WRAPPER_PREFIXES = ("module.", "backbone.", "encoder.body.", "encoder.", "body.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a tensor dictionary without ever unpickling code.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``. A checkpoint that nests its weights
    under ``"state_dict"`` or ``"model"`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist; give the path of a local file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means an unusable file
        raise WeightsError(
            f"cannot read weights file {str(path)!r} ({type(exc).__name__}); expected a "
            "safetensors file or a torch state_dict saved with torch.save"
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {str(path)!r} does not hold a dictionary of tensors")
    return state


def load_encoder_weights(encoder: Encoder, path: str | Path) -> None:
    """Load a local backbone checkpoint into ``encoder.body``.

    Accepts torchvision's classification checkpoints (the ``fc.`` /
    ``classifier.`` head is ignored) and encoder checkpoints whose keys carry
    a ``module.``, ``backbone.`` or ``encoder.`` prefix. Every remaining key
    must match in name and shape.
    """
    state = read_state_dict(path)
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        if key.startswith(_HEAD_PREFIXES):
            continue
        cleaned[key] = value
    expected = encoder.body.state_dict()
    missing = sorted(set(expected) - set(cleaned))
    unexpected = sorted(set(cleaned) - set(expected))
    wrong_shape = sorted(
        k for k in set(expected) & set(cleaned) if tuple(expected[k].shape) != tuple(cleaned[k].shape)
    )
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong_shape:
            details.append(f"{len(wrong_shape)} of the wrong shape (e.g. {wrong_shape[0]})")
        raise WeightsError(
            f"weights file {str(path)!r} does not fit backbone {encoder.name!r}: "
            f"{'; '.join(details)} keys; use a checkpoint of that same backbone"
        )
    encoder.body.load_state_dict(cleaned, strict=True)
