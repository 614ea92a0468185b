"""Dice, IoU and confusion counts of label masks (255 in the truth is ignored); AJI and PQ of object ids."""

from __future__ import annotations

from dataclasses import dataclass

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


# --------------------------------------------------------------------------- instances


@dataclass(frozen=True)
class InstanceScores:
    """Object-level scores of one image.

    Attributes
    ----------
    aji : float
        Aggregated Jaccard index (Kumar et al. 2017): each true object with the
        predicted one it overlaps best (intersections over unions summed), the
        unmatched predicted objects added to the union.
    pq, dq, sq : float
        Panoptic quality (Kirillov et al. 2019) = detection quality (F1 of the
        objects matched at IoU > 0.5) x segmentation quality (mean IoU of the matches).
    matched, true_objects, predicted_objects : int
    """

    aji: float
    pq: float
    dq: float
    sq: float
    matched: int
    true_objects: int
    predicted_objects: int


def _overlaps(truth: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Areas of the true and predicted objects and their pairwise intersections.

    Returns ``(true_ids, true_areas, pred_ids, pred_areas, intersections)``,
    ``intersections[i, j]`` the pixels of true object ``true_ids[i]`` in predicted ``pred_ids[j]``.
    """
    true_ids, true_index = np.unique(truth, return_inverse=True)
    pred_ids, pred_index = np.unique(prediction, return_inverse=True)
    pairs = np.bincount(true_index.ravel() * len(pred_ids) + pred_index.ravel(),
                        minlength=len(true_ids) * len(pred_ids)).reshape(len(true_ids), len(pred_ids))
    true_areas, pred_areas = pairs.sum(axis=1), pairs.sum(axis=0)
    keep_true, keep_pred = true_ids != 0, pred_ids != 0
    return (true_ids[keep_true], true_areas[keep_true], pred_ids[keep_pred], pred_areas[keep_pred],
            pairs[np.ix_(keep_true, keep_pred)])


def instance_scores(prediction: np.ndarray, truth: np.ndarray, ignore: np.ndarray | None = None) -> InstanceScores:
    """AJI and PQ of predicted object ids against true ones.

    Parameters
    ----------
    prediction, truth : np.ndarray
        ``(H, W)`` integer object ids, 0 background.
    ignore : np.ndarray, optional
        ``(H, W)`` bool: pixels scored as background in both (ambiguous areas).

    An image with no object in either scores 1 everywhere (nothing to find, nothing found).
    """
    prediction, truth = np.asarray(prediction), np.asarray(truth)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    if ignore is not None:
        prediction, truth = np.where(ignore, 0, prediction), np.where(ignore, 0, truth)
    _, true_areas, _, pred_areas, inter = _overlaps(truth, prediction)
    n_true, n_pred = len(true_areas), len(pred_areas)
    if n_true == 0 and n_pred == 0:
        return InstanceScores(1.0, 1.0, 1.0, 1.0, 0, 0, 0)
    union = true_areas[:, None] + pred_areas[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros(inter.shape, float), where=union > 0)
    # PQ: at IoU > 0.5 a true object matches at most one predicted object and vice versa.
    matches = iou > 0.5
    matched = int(matches.sum())
    dq = 2 * matched / (n_true + n_pred)
    sq = float(iou[matches].mean()) if matched else 0.0
    # AJI: each true object with its best predicted one; the predicted objects used by none add their areas.
    # A true object that overlaps no predicted one adds its own area.
    total_inter, total_union = 0.0, float(true_areas.sum() + pred_areas.sum())
    if n_true and n_pred:
        best = iou.argmax(axis=1)
        hit = iou[np.arange(n_true), best] > 0
        used = np.zeros(n_pred, bool)
        used[best[hit]] = True
        total_inter = float(inter[np.flatnonzero(hit), best[hit]].sum())
        total_union = (float(union[np.flatnonzero(hit), best[hit]].sum()) + float(true_areas[~hit].sum())
                       + float(pred_areas[~used].sum()))
    aji = total_inter / total_union if total_union else 1.0
    return InstanceScores(aji, dq * sq, dq, sq, matched, n_true, n_pred)
