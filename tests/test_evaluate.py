"""Evaluation: object scores where the truth has instances, and the pixel size images are scored at."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import constant_model
from test_datasets import make_release
from wsiseg.bundle import Bundle
from wsiseg.config import BundleSettings, TwoStageConfig
from wsiseg.errors import InputError
from wsiseg.evaluate import (
    PixelSizes, _as_scanned, describe_setting, evaluate, format_table, resize_labels, run_as_segment, scoring_setting,
)
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
    at_40x = scoring_setting(ranged, 0.2)
    assert at_40x.downsample == pytest.approx(1.58) and at_40x.work_mpp == pytest.approx(0.316)
    assert at_40x.config.tile_size is None and at_40x.config.ratio == 4  # tiles chosen as on slides
    unknown = scoring_setting(ranged, None)
    assert (unknown.downsample, unknown.work_mpp) == (1.0, None)  # unknown: nothing resampled
    with pytest.raises(InputError, match="positive"):
        PixelSizes(work_mpp=0)
    assert scoring_setting(ranged, 0.31).work_mpp == 0.31  # within 5 %
    at_20x = scoring_setting(ranged, 0.5)
    assert at_20x.work_mpp == 0.5 and at_20x.config.ratio == 3 and at_20x.note["model1_ratio"] == 3
    assert scoring_setting(ranged, 0.5, {"ratio": 4}).config.ratio == 4  # a ratio given is run as given
    assert scoring_setting(ranged, 1.0).work_mpp == 1.0
    assert scoring_setting(fixed, 0.2).work_mpp == pytest.approx(0.4)
    assert scoring_setting(ranged, 0.5, pixel_sizes=PixelSizes(0.5, 0.25)).downsample == 0.5
    assert scoring_setting(ranged, 0.5, full_resolution=True).config.ratio == 4  # no Model 1 to adapt
    assert "tiles of about 512 pixels, halo 32, Model 1 at 1/3, 0.5 um" in describe_setting(at_20x)

    image = np.zeros((40, 60, 3), np.uint8)
    with pytest.raises(InputError, match="records no pixel size"):
        _as_scanned(image, None, PixelSizes(scan_mpp=0.5))
    scanned, mpp = _as_scanned(image, 0.2, PixelSizes(scan_mpp=0.5))
    assert scanned.shape == (16, 24, 3) and mpp == 0.5
    np.testing.assert_array_equal(resize_labels(np.array([[1, 2], [3, 4]]), (4, 4)),
                                  np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]))


@pytest.mark.slow
def test_evaluate_scores_the_mask_segment_writes(tmp_path) -> None:
    """The same image at 0.2 um: evaluation's mask (in memory) equals wsiseg segment's (OME-Zarr), for
    a bundle at 0.316 um: area-resampled by 1.58, Model 1's ratio, the tile given, the tissue mask."""
    import zarr
    from PIL import Image

    from conftest import centred_model, structured_image
    from wsiseg.bundle import load_bundle, save_bundle
    from wsiseg.config import RunOptions
    from wsiseg.run import prepare_run, run_segment
    from wsiseg.tiling import downsample_mean

    image = structured_image(np.random.default_rng(3), 700, 900)
    image[:, :200] = 235  # glass: no tissue there
    models = {"model1": centred_model("unet", "resnet_lite", downsample_mean(image, 4), 1),
              "model2": centred_model("unet", "resnet_lite", image, 2)}
    path = save_bundle(tmp_path / "b.safetensors", models,
                       {"ratio": 4, "halo": 32, "threshold": 0.3, "mpp": 0.316, "mpp_range": [0.2, 0.5]})
    Image.fromarray(image).save(tmp_path / "image.png")
    overrides = {"tile_size": 128}
    run = prepare_run([tmp_path / "image.png"], tmp_path / "out.zarr", overrides,
                      RunOptions(model=str(path), mpp=0.2, device="cpu"))
    (outcome,) = run_segment(run)  # what wsiseg segment IMAGE --mpp 0.2 --tile-size 128 runs
    report = outcome.report
    written = np.asarray(zarr.open_array(str(tmp_path / "out.zarr" / "labels" / "mask" / "0"), mode="r")[...])

    bundle = load_bundle(path)
    setting = scoring_setting(BundleSettings.from_config(bundle.config), 0.2, overrides)
    result, _ = run_as_segment(image, setting, bundle, None, "two-stage", 0.3, "cpu", tissue=True)
    assert report.scheduler["address"].startswith("inline")  # a small image runs without a cluster
    assert written.shape == result.mask.shape == (444, 570)  # 700 x 900 at 0.2 um, worked at 0.316 um (ceil)
    assert 0 < report.tiles.refined < report.tiles.total  # some tiles refined, not all
    np.testing.assert_array_equal(result.mask, written)
    assert not written[:, :100].any() and written[:, 140:].any()  # glass stays background
