"""Segmentation losses. Binary models have one logit channel; K-class models K.

Every loss takes ``logits`` ``(N, C, H, W)`` and ``target`` ``(N, H, W)``
integer class indices, skips pixels equal to ``ignore_index`` and returns a
scalar mean over the valid pixels (0 when there are none).
"""

from __future__ import annotations

import math

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


def foreground_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """``1 -`` soft Dice of the foreground over the batch's valid pixels.

    The foreground probability is the sigmoid of the one logit, or ``1 - p(class 0)``
    for K classes (so every nucleus class of an instance output counts as nucleus):
    the quantity ``wsiseg evaluate``'s mean Dice scores, made differentiable.
    """
    valid = (target != ignore_index).to(logits.dtype)
    if logits.shape[1] == 1:
        foreground = torch.sigmoid(logits[:, 0])
    else:
        foreground = 1.0 - torch.softmax(logits, dim=1)[:, 0]
    truth = ((target > 0) & (target != ignore_index)).to(logits.dtype)
    overlap = (foreground * truth * valid).sum()
    total = (foreground * valid).sum() + truth.sum()
    return 1.0 - (2.0 * overlap + 1.0) / (total + 1.0)


def focal_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Focal loss plus the foreground's soft Dice loss (nucleus models' usual pair: the per-pixel
    term learns the classes, the Dice term the mask's overlap that scoring counts)."""
    return focal_loss(logits, target, ignore_index=ignore_index) + foreground_dice_loss(logits, target, ignore_index)


def ohem_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    threshold: float = 0.7,
    keep_fraction: float = 0.75,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Online hard example mining, as IFBFNet trains: cross-entropy over the hard pixels.

    Over the valid pixels of the batch, keeps every pixel whose true-class
    probability is below ``threshold`` and, if they are fewer, the hardest
    ``ceil(keep_fraction * valid)`` pixels (largest loss) instead: the kept
    set is the hardest ``max(#{p < threshold}, ceil(keep_fraction * valid))``.
    Ties at the cut are broken by pixel order. Returns their mean loss.
    """
    ce, valid = _per_pixel_ce(logits, target, ignore_index)
    losses = ce[valid]
    if losses.numel() == 0:
        return logits.sum() * 0.0
    kept = ohem_keep_count(losses, threshold, keep_fraction)
    hardest = torch.topk(losses, kept, sorted=False).values
    return hardest.mean()


def ohem_keep_count(losses: torch.Tensor, threshold: float, keep_fraction: float) -> int:
    """How many of ``losses`` (per valid pixel) OHEM keeps; see :func:`ohem_loss`."""
    below = int((torch.exp(-losses.detach()) < threshold).sum())
    return max(below, math.ceil(keep_fraction * losses.numel()))


def _standardise(logits: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per pixel, subtract the mean over classes and divide by the (population) std."""
    mean = logits.mean(dim=1, keepdim=True)
    var = logits.var(dim=1, keepdim=True, unbiased=False)
    return (logits - mean) / torch.sqrt(var + eps)


def chessboard_weights(window: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(window, window)`` weights ``2 ** (1 - d)``, d the chessboard distance to the centre."""
    r = window // 2
    offsets = torch.arange(-r, r + 1)
    distance = torch.maximum(offsets[:, None].abs(), offsets[None, :].abs())
    return (2.0 ** (1 - distance)).to(dtype)


def locally_adaptive_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    window: int = 5,
    power: float = 3.0,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Locally adaptive learning loss (Guo et al., arXiv 1802.08290).

    1. Standardise each pixel's prediction vector (subtract its mean over
       classes, divide by its standard deviation).
    2. At every valid pixel, sum the standardised vectors of the neighbours in
       a ``window x window`` box that share its label, weighted
       ``2 ** (1 - d)`` (d: chessboard distance; 2 at the centre, 1 at d = 1,
       1/2 at d = 2, ...), and divide by the number of such neighbours (the
       centre included).
    3. Softmax cross-entropy of that pooled vector against the centre's label.
    4. Minkowski mean over valid pixels: ``mean(loss ** power) ** (1 / power)``.

    Binary models (one logit ``v``) are scored as two classes ``(0, v)``;
    after standardisation only the sign of ``v`` remains, so the loss cannot
    sharpen a binary model's confidence: prefer it for three or more classes.

    Vectorised: a loop over the ``window ** 2`` offsets of shifted label and
    prediction maps, never over pixels; the graph keeps one boolean-like mask
    per offset, so memory is linear in pixels x window ** 2.

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, C, H, W)``.
    target : torch.Tensor
        ``(N, H, W)`` class indices; ``ignore_index`` pixels are neither
        centres nor neighbours.
    window : int
        Odd box side.
    power : float
        Minkowski exponent (the paper: 3).
    """
    if window < 1 or window % 2 == 0:
        raise InputError(f"the window must be an odd number >= 1, got {window}")
    if logits.shape[1] == 1:
        logits = torch.cat([torch.zeros_like(logits), logits], dim=1)
    z = _standardise(logits)
    n, _, height, width = z.shape
    r = window // 2
    valid = target != ignore_index
    z_padded = F.pad(z, (r, r, r, r))
    labels_padded = F.pad(target, (r, r, r, r), value=ignore_index)
    pooled = torch.zeros_like(z)
    count = torch.zeros((n, 1, height, width), dtype=z.dtype, device=z.device)
    for dy in range(-r, r + 1):  # a loop over window offsets, never over pixels
        for dx in range(-r, r + 1):
            weight = 2.0 ** (1 - max(abs(dy), abs(dx)))
            rows, cols = slice(r + dy, r + dy + height), slice(r + dx, r + dx + width)
            same = ((labels_padded[:, rows, cols] == target) & valid).unsqueeze(1).to(z.dtype)
            pooled = pooled + (weight * same) * z_padded[:, :, rows, cols]
            count = count + same
    if not valid.any():
        return logits.sum() * 0.0
    vectors = (pooled / count.clamp(min=1)).permute(0, 2, 3, 1)[valid]  # (P, C)
    labels = target[valid].long()
    pixel_losses = -F.log_softmax(vectors, dim=1).gather(1, labels[:, None])[:, 0]
    return pixel_losses.pow(power).mean().pow(1.0 / power)


LOSSES = {"focal": focal_loss, "ce": cross_entropy_loss, "ohem": ohem_loss, "lad": locally_adaptive_loss,
          "focal_dice": focal_dice_loss}


def get_loss(name: str, **options: float):
    """The loss registered under ``name``, with options bound (e.g. ``window``, ``power``)."""
    if name not in LOSSES:
        raise InputError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    function = LOSSES[name]
    if not options:
        return function
    return lambda logits, target: function(logits, target, **options)
