"""The contract every wsiseg segmentation model follows.

A model maps an RGB batch to class logits and exposes its penultimate feature
map, into which a *context* of the same shape can be added before the final
classifier. This is the path by which Model 1's features reach Model 2 in the
two-stage framework (Cruz et al., Sensors 2023).
"""

from __future__ import annotations

import copy
import math
import threading
from typing import Any


import torch
import torch.nn.functional as F
from torch import nn

from wsiseg.errors import ModelConfigError
from wsiseg.stain import InputTransform

#: ImageNet channel statistics; models normalise their [0, 1] input with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SegmentationModel(nn.Module):
    """Base class: ``forward(x, context=None) -> (logits, features)``.

    Subclasses implement :meth:`extract_features` and set ``classifier`` (a
    1x1 convolution from ``feature_channels`` to ``num_classes``) and
    ``feature_stride`` (the input-to-feature downsampling factor).

    Inputs are RGB float tensors of shape ``(N, 3, H, W)`` with values in
    ``[0, 1]``; the model applies its :class:`~wsiseg.stain.InputTransform`
    (``input_transform``: RGB as it is, or a hematoxylin channel) and
    normalises with ImageNet statistics itself, so callers never need to know
    either.

    ``num_classes == 1`` means a binary task with one sigmoid logit;
    ``num_classes >= 2`` means softmax over that many classes.
    """

    num_classes: int
    feature_channels: int
    feature_stride: int
    classifier: nn.Module

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ModelConfigError(
                f"num_classes must be 1 (binary) or an integer >= 2, got {num_classes!r}"
            )
        self.num_classes = num_classes
        self.input_transform = InputTransform("rgb")
        self.register_buffer(
            "input_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "input_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False
        )

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features of a normalised batch.

        Parameters
        ----------
        x : torch.Tensor
            ``(N, 3, H, W)`` float, already normalised.

        Returns
        -------
        torch.Tensor
            ``(N, feature_channels, *feature_shape(H, W))`` float.
        """
        raise NotImplementedError

    @property
    def grid_stride(self) -> int:
        """The largest stride of any layer (the encoder's output stride, or ``feature_stride``).

        Windows whose origins are multiples of it sample the image on the
        same grid as one pass over the whole image does: tiles and halos that
        are multiples of it (and halos that cover the receptive field) make
        tiled inference equal whole-image inference.
        """
        strides = [max(m.strides) for m in self.modules() if isinstance(getattr(m, "strides", None), tuple) and m.strides]
        return max([int(self.feature_stride), *(int(s) for s in strides)])

    def feature_shape(self, height: int, width: int) -> tuple[int, int]:
        """Spatial shape of the feature map for an ``height x width`` input."""
        stride = self.feature_stride
        return math.ceil(height / stride), math.ceil(width / stride)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        class_context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment a batch.

        Parameters
        ----------
        x : torch.Tensor
            ``(N, 3, H, W)`` float RGB in ``[0, 1]``.
        context : torch.Tensor, optional
            ``(N, feature_channels, h, w)`` with ``(h, w) == feature_shape(H, W)``,
            added to the penultimate features before the classifier.
        class_context : torch.Tensor, optional
            ``(N, num_classes, h, w)``: a context already passed through the
            classifier's weights (:meth:`project_context`), added to the
            classifier's output. ``classifier(f + c) == classifier(f) +
            project_context(c)`` because the classifier is one linear 1x1
            convolution, so this is the same model at K instead of F channels.

        Returns
        -------
        logits : torch.Tensor
            ``(N, num_classes, H, W)`` float.
        features : torch.Tensor
            ``(N, feature_channels, h, w)``: the map the classifier saw, that
            is the penultimate features plus ``context`` when one was given.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an (N, 3, H, W) batch, got shape {tuple(x.shape)}")
        features = self.extract_features((self.input_transform(x) - self.input_mean) / self.input_std)
        if context is not None:
            features = features + _same_shape("context", context, "the feature", features)
        logits = self.classifier(features)
        if class_context is not None:
            logits = logits + _same_shape("class context", class_context, "the classifier's output", logits)
        if self.feature_stride > 1:
            # Upsample by exactly the stride, then crop: the same input pixel
            # gets the same logit whether the model sees the whole image or a
            # window starting at a multiple of the stride (seamless tiling).
            logits = F.interpolate(
                logits, scale_factor=self.feature_stride, mode="bilinear", align_corners=False
            )
        return logits[..., : x.shape[-2], : x.shape[-1]], features

    def project_context(self, features: torch.Tensor) -> torch.Tensor:
        """The classifier's linear part applied to a feature map (no bias).

        Parameters
        ----------
        features : torch.Tensor
            ``(N, feature_channels, h, w)``, e.g. Model 1's features.

        Returns
        -------
        torch.Tensor
            ``(N, num_classes, h, w)``: what ``features`` add to this model's
            logits when given as ``context``. Bilinear resampling commutes with
            it, so a context can be projected at low resolution and resampled
            at ``num_classes`` channels instead of ``feature_channels``.
        """
        classifier = self.classifier
        if not (isinstance(classifier, nn.Conv2d) and classifier.kernel_size == (1, 1) and classifier.groups == 1):
            raise ModelConfigError(
                f"{type(self).__name__}'s classifier is not a single 1x1 convolution; its context "
                "cannot be projected"
            )
        return F.conv2d(features, classifier.weight)


def _same_shape(name: str, tensor: torch.Tensor, target_name: str, target: torch.Tensor) -> torch.Tensor:
    """``tensor``, after checking that its shape equals ``target``'s (a clear error otherwise)."""
    if tensor.shape != target.shape:
        raise ValueError(f"{name} shape {tuple(tensor.shape)} must equal {target_name} shape {tuple(target.shape)}")
    return tensor


#: Block classes (module, name) whose ``forward`` applies ``bnN`` right after ``convN``: the ResNet blocks and
#: stems of :mod:`wsiseg.models.backbones` and of torchvision (named, so that folding never imports torchvision).
NAMED_PAIR_BLOCKS = frozenset({
    ("wsiseg.models.backbones", "_BasicBlock"), ("wsiseg.models.backbones", "_LiteResNet"),
    ("torchvision.models.resnet", "BasicBlock"), ("torchvision.models.resnet", "Bottleneck"),
    ("torchvision.models.resnet", "ResNet"),
})


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` (eval mode) whose batch norms are folded into the convolutions before them.

    A convolution followed by a batch norm in eval mode is one affine map, so
    the pair becomes a single convolution with a bias and the batch norm an
    identity (``benchmarks/RESULTS.md``, "Paying less per tile"). Pairs are
    adjacent ``Conv2d, BatchNorm2d`` in an ``nn.Sequential``, and the
    ``convN`` / ``bnN`` attributes of the ResNet blocks whose ``forward``
    applies one right after the other (:data:`NAMED_PAIR_BLOCKS`).
    ``model`` itself is left as it is (it may be in training). A model that
    cannot be copied (``copy.deepcopy`` refuses tensors made inside a graph)
    is returned itself, unfolded.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    try:
        folded = copy.deepcopy(model).eval()
    except RuntimeError:
        return model
    for module in folded.modules():
        if isinstance(module, nn.Sequential):
            for index in range(len(module) - 1):
                conv, norm = module[index], module[index + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    module[index], module[index + 1] = fuse_conv_bn_eval(conv, norm), nn.Identity()
        if (type(module).__module__, type(module).__qualname__) in NAMED_PAIR_BLOCKS:
            for number in (1, 2, 3):
                conv, norm = getattr(module, f"conv{number}", None), getattr(module, f"bn{number}", None)
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    setattr(module, f"conv{number}", fuse_conv_bn_eval(conv, norm))
                    setattr(module, f"bn{number}", nn.Identity())
    return folded


def forward_gflop(model: nn.Module, height: int, width: int) -> float:
    """Floating-point work (GFLOP) of one forward pass of ``model`` on a ``1 x 3 x height x width`` batch.

    Counts what torch's ``FlopCounterMode`` counts for these networks (2 per
    multiply-add of every convolution and linear layer; additions of biases,
    activations and resampling are not counted), from forward hooks during
    one pass of a zero batch (:class:`FlopCount`). Where a real batch is run
    anyway, count on it instead (``with FlopCount(model) as count``): the
    count costs no extra pass.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), FlopCount(model) as count:
            model(torch.zeros(1, 3, height, width, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
    return count.gflop


class FlopCount:
    """Floating-point work of the forward passes run inside ``with FlopCount(model) as count``.

    ``count.gflop`` after the block: 2 per multiply-add of every convolution,
    transposed convolution and linear layer, summed over the batches run (the
    rule of :func:`forward_gflop`), from forward hooks, which only read shapes.
    Only the passes of the thread that entered the block count (the threads of
    a Dask worker share one model).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flop = 0
        self._hooks: list[Any] = []
        self._thread = threading.get_ident()

    @property
    def gflop(self) -> float:
        return self.flop / 1e9

    def __enter__(self) -> FlopCount:
        self._thread = threading.get_ident()
        layers = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
        self._hooks = [m.register_forward_hook(self._count) for m in self.model.modules() if isinstance(m, layers)]
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _count(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if threading.get_ident() != self._thread:
            return
        if isinstance(module, nn.Linear):
            self.flop += 2 * output.numel() * module.in_features
        elif isinstance(module, nn.ConvTranspose2d):
            kh, kw = module.kernel_size
            self.flop += 2 * inputs[0].numel() * module.out_channels // module.groups * kh * kw
        else:  # nn.Conv2d
            kh, kw = module.kernel_size
            self.flop += 2 * output.numel() * module.in_channels // module.groups * kh * kw


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """``kernel_size`` convolution (same padding, no bias), batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def logits_to_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """``(N, K, H, W)`` logits to probabilities: sigmoid for ``K == 1``, else softmax over K."""
    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)
