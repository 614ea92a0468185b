"""Dice, IoU and confusion counts of label masks (255 in the truth is ignored)."""

from __future__ import annotations

import numpy as np

IGNORE = 255


def confusion(prediction: np.ndarray, truth: np.ndarray, num_labels: int) -> np.ndarray:
    """``(num_labels, num_labels)`` int64 counts: rows are truth, columns prediction."""
    valid = truth != IGNORE
    index = truth[valid].astype(np.int64) * num_labels + prediction[valid].astype(np.int64)
    return np.bincount(index, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def dice_iou(counts: np.ndarray, labels: list[int] | None = None) -> tuple[float, float]:
    """Mean Dice and IoU over ``labels`` (default: every label but 0) from confusion counts.

    A label absent from both truth and prediction scores 1 (nothing to find,
    nothing found).
    """
    labels = labels if labels is not None else list(range(1, counts.shape[0]))
    dices, ious = [], []
    for label in labels:
        tp = counts[label, label]
        fp = counts[:, label].sum() - tp
        fn = counts[label, :].sum() - tp
        if tp + fp + fn == 0:
            dices.append(1.0)
            ious.append(1.0)
            continue
        dices.append(2 * tp / (2 * tp + fp + fn))
        ious.append(tp / (tp + fp + fn))
    return float(np.mean(dices)), float(np.mean(ious))


def dice(prediction: np.ndarray, truth: np.ndarray, num_labels: int = 2) -> float:
    """Mean foreground Dice of one prediction (labels ``1 .. num_labels - 1``)."""
    return dice_iou(confusion(prediction, truth, num_labels))[0]
