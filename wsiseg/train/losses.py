"""Segmentation losses. Binary models have one logit channel; K-class models K.

Every loss takes ``logits`` ``(N, C, H, W)`` and ``target`` ``(N, H, W)``
integer class indices, skips pixels equal to ``ignore_index`` and returns a
scalar mean over the valid pixels (0 when there are none).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsiseg.errors import InputError


def _per_pixel_ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy per pixel (binary: BCE with the one logit) and the valid-pixel mask."""
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    if logits.shape[1] == 1:
        ce = F.binary_cross_entropy_with_logits(logits[:, 0], safe.to(logits.dtype), reduction="none")
    else:
        ce = F.cross_entropy(logits, safe.long(), reduction="none")
    return ce, valid


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    count = valid.sum()
    return (values * valid).sum() / count.clamp(min=1)


def cross_entropy_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Softmax cross-entropy (sigmoid binary cross-entropy for one channel)."""
    ce, valid = _per_pixel_ce(logits, target, ignore_index)
    return _masked_mean(ce, valid)


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, ignore_index: int = 255
) -> torch.Tensor:
    """Focal loss (Lin et al.): ``(1 - p_t) ** gamma * CE``, the two-stage paper's loss."""
    ce, valid = _per_pixel_ce(logits, target, ignore_index)
    p_true = torch.exp(-ce)
    return _masked_mean((1.0 - p_true) ** gamma * ce, valid)


LOSSES = {"focal": focal_loss, "ce": cross_entropy_loss}


def get_loss(name: str):
    """The loss function registered under ``name``."""
    if name not in LOSSES:
        raise InputError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]
