"""Object scores: AJI and PQ on hand-made id images with known values."""

from __future__ import annotations

import numpy as np
import pytest

from wsiseg.metrics import instance_scores


def _square(shape, y, x, side, value, into=None):
    image = np.zeros(shape, np.int32) if into is None else into
    image[y : y + side, x : x + side] = value
    return image


def test_identical_objects_score_one() -> None:
    truth = _square((20, 20), 2, 2, 4, 1)
    _square((20, 20), 10, 10, 5, 2, truth)
    scores = instance_scores(truth * 3, truth)  # other ids, same objects
    assert (scores.aji, scores.pq, scores.dq, scores.sq) == (1.0, 1.0, 1.0, 1.0)
    assert (scores.matched, scores.true_objects, scores.predicted_objects) == (2, 2, 2)


def test_an_iou_of_exactly_one_half_is_no_match() -> None:
    truth = _square((10, 10), 0, 0, 2, 1)  # 4 pixels
    prediction = np.zeros((10, 10), np.int32)
    prediction[0:2, 0:4] = 7  # 8 pixels holding the 4: IoU 0.5
    scores = instance_scores(prediction, truth)
    assert scores.matched == 0 and scores.pq == 0.0 and scores.dq == 0.0
    assert scores.aji == pytest.approx(4 / 8)


def test_a_merged_pair_a_miss_and_a_false_object() -> None:
    shape = (30, 30)
    truth = _square(shape, 0, 0, 4, 1)  # 16 px
    _square(shape, 0, 4, 4, 2, truth)  # 16 px, touching the first
    _square(shape, 20, 20, 3, 3, truth)  # 9 px, missed
    prediction = np.zeros(shape, np.int32)
    prediction[0:4, 0:8] = 1  # both as one object: IoU 16/32 = 0.5 with each
    _square(shape, 10, 10, 2, 2, prediction)  # 4 px, nothing there
    scores = instance_scores(prediction, truth)
    assert scores.matched == 0 and scores.pq == 0.0
    # AJI: 1 -> merged (16 / 32), 2 -> merged (16 / 32; the merged object counted once more), 3 -> none (9),
    # the false object unused (4): (16 + 16) / (32 + 32 + 9 + 4).
    assert scores.aji == pytest.approx(32 / 77)


def test_pq_is_detection_times_segmentation_quality() -> None:
    shape = (20, 20)
    truth = _square(shape, 0, 0, 4, 1)  # 16 px
    _square(shape, 10, 10, 4, 2, truth)
    prediction = _square(shape, 0, 0, 4, 5)
    prediction[0, 0] = 0  # 15 of 16: IoU 15/16
    _square(shape, 15, 0, 2, 6, prediction)  # a false object
    scores = instance_scores(prediction, truth)
    assert scores.matched == 1 and scores.dq == pytest.approx(2 * 1 / (2 + 2))
    assert scores.sq == pytest.approx(15 / 16) and scores.pq == pytest.approx(0.5 * 15 / 16)
    # AJI: 1 -> 5 (15 / 16); 2 overlaps nothing (16); 6 unused (4).
    assert scores.aji == pytest.approx(15 / (16 + 16 + 4))


def test_ignored_pixels_and_empty_images() -> None:
    truth = _square((10, 10), 0, 0, 3, 1)
    ignore = np.zeros((10, 10), bool)
    ignore[:5, :5] = True
    assert instance_scores(np.zeros_like(truth), truth, ignore).pq == 1.0  # nothing left to find
    assert instance_scores(np.zeros_like(truth), truth).pq == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        instance_scores(truth[:5], truth)
