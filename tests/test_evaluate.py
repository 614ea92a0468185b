"""Evaluation: object scores where the truth has instances, and the pixel size images are scored at."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from conftest import constant_model
from test_datasets import make_release
from wsiseg.bundle import Bundle
from wsiseg.config import BundleSettings, TwoStageConfig
from wsiseg.errors import InputError
from wsiseg.evaluate import PixelSizes, _pixel_steps, _Steps, _segment_at, evaluate, format_table, resize_labels
from wsiseg.instances import whole_image_instances
from wsiseg.metrics import instance_scores
from wsiseg.run.objects import object_sizes
from wsiseg.train.datasets import open_dataset


@pytest.mark.training
def test_object_scores_are_those_of_the_objects_segment_makes(tmp_path) -> None:
    make_release(tmp_path / "r")
    data = open_dataset("nuinsseg", tmp_path / "r")
    everything, nothing = constant_model(50.0), constant_model(-50.0)
    bundle = Bundle({"model1": nothing, "model2": everything, "model": everything},
                    {"ratio": 2, "tile_size": 16, "halo": 8})
    rows = evaluate(bundle, data, data.samples, thresholds=(1.0, 0.0), device="cpu")
    # Model 1 alone marks nothing: no object found.
    assert (rows[1].aji, rows[1].pq, rows[1].dq) == (0.0, 0.0, 0.0)
    # Everything marked: the objects --objects makes of an all-foreground mask, scored against the truth.
    max_size, min_distance, min_area = object_sizes(512, data.mpp, None)
    assert (max_size, min_distance, min_area) == (200, 10, 200)  # 40 um, 2 um and 8 um^2 at 0.2 um
    expected = []
    for sample in data.samples:
        image, mask = data.load(sample)
        found, _ = whole_image_instances(np.ones(mask.shape, np.uint8), max_size, min_distance, min_area=min_area)
        scores = instance_scores(found, data.instances(sample), ignore=mask == 255)
        expected.append((scores.aji, scores.pq))
    assert rows[0].aji == pytest.approx(np.mean([e[0] for e in expected]))
    assert rows[0].pq == pytest.approx(np.mean([e[1] for e in expected])) and rows[2].pq == rows[0].pq
    assert format_table(rows)[0].split()[-4:] == ["AJI", "PQ", "DQ", "SQ"]


def test_images_are_scored_at_the_pixel_sizes_a_slide_would_be_segmented_at() -> None:
    ranged = BundleSettings(TwoStageConfig(), mpp=0.316, mpp_range=(0.2, 0.5))
    fixed = BundleSettings(TwoStageConfig(), mpp=0.4)
    # Finer than the model: down to its pixel size; coarser, within its range or not: never upsampled.
    assert _pixel_steps(0.2, ranged, PixelSizes()) == _Steps(0.2, 0.2, 0.316)
    assert _pixel_steps(None, ranged, PixelSizes()) == _Steps()  # unknown: nothing resampled
    with pytest.raises(InputError, match="records no pixel size"):
        _pixel_steps(None, ranged, PixelSizes(scan_mpp=0.5))
    with pytest.raises(InputError, match="positive"):
        PixelSizes(work_mpp=0)
    assert _pixel_steps(0.1, ranged, PixelSizes()).work == pytest.approx(0.316)
    assert _pixel_steps(0.31, ranged, PixelSizes()).work == 0.31  # within 5 %
    assert _pixel_steps(0.2, ranged, PixelSizes(scan_mpp=0.5)).work == 0.5
    assert _pixel_steps(0.2, ranged, PixelSizes(scan_mpp=1.0)).work == 1.0
    assert _pixel_steps(0.2, fixed, PixelSizes()).work == pytest.approx(0.4)
    assert _pixel_steps(0.2, ranged, PixelSizes(scan_mpp=0.5, work_mpp=0.25)).work == 0.25

    seen = []

    def run(x):
        seen.append(x.shape)
        return SimpleNamespace(mask=(x[..., 0] > 127).astype(np.uint8), tiles=SimpleNamespace(refined_fraction=0.5))

    image = np.zeros((40, 60, 3), np.uint8)
    image[:, 30:] = 255
    # Scanned at 0.5 (20x) from 0.2, then worked at 0.25: 16 x 24, then 32 x 48; scored back at 40 x 60.
    mask, objects, refined = _segment_at(image, _pixel_steps(0.2, ranged, PixelSizes(0.5, 0.25)), run, False)
    assert seen == [(32, 48, 3)] and mask.shape == (40, 60) and objects is None and refined == 0.5
    assert (mask[:, :29] == 0).all() and (mask[:, 31:] == 1).all()
    np.testing.assert_array_equal(resize_labels(np.array([[1, 2], [3, 4]]), (4, 4)),
                                  np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]))
