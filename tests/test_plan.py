"""Settings and planning, without models, pixels or a cluster."""

from __future__ import annotations

import numpy as np
import pytest

from wsiseg.config import BundleSettings, RunOptions, TwoStageConfig
from wsiseg.errors import BundleError, InputError
from wsiseg.config import model1_ratio
from wsiseg.run.driver import _batches
from wsiseg.run.plan import ModelFacts, auto_tile_size, make_plan, view_for, working_scale
from wsiseg.slide import Level, Slide
from wsiseg.ngff import CONTEXT, IMAGE, MASK, PROBABILITY, REFINED

FACTS = ModelFacts({"model1": 16, "model2": 32, "model": 32}, num_classes=1)


def _slide(levels=((40000, 30000), (10000, 7500), (2500, 1875)), tile=(240, 240), mpp=(0.25, 0.25)) -> Slide:
    base = levels[0]
    return Slide(
        "/slides/s.svs", "tifffile", "aperio",
        tuple(Level(shape, (base[0] / shape[0], base[1] / shape[1]), tile) for shape in levels), mpp,
    )


def test_bundle_settings_take_the_flows_defaults_for_absent_keys() -> None:
    settings = BundleSettings.from_config({"ratio": 8, "threshold": 0.5, "mpp": 0.4, "classes": ["bg", "nucleus"]})
    assert settings.flow == TwoStageConfig(ratio=8, selection=TwoStageConfig().selection.threshold(0.5))
    assert (settings.mpp, settings.classes, settings.image_size) == (0.4, ("bg", "nucleus"), None)
    assert settings.for_slides().tile_size is None and settings.for_slides().ratio == 8
    assert BundleSettings.from_config({}) == BundleSettings()


@pytest.mark.parametrize("config, word", [
    ({"ratio": "four"}, "ratio"), ({"halo": 2.5}, "halo"), ({"threshold": "high"}, "threshold"),
    ({"context": 1}, "context"), ({"uncertainty": "vibes"}, "uncertainty"), ({"mpp": -1.0}, "mpp"),
    ({"classes": "nuclei"}, "classes"), ({"ratio": 0}, "ratio"), ({"ratio": True}, "ratio"),
])
def test_bad_bundle_settings_are_one_line_errors(config, word) -> None:
    with pytest.raises(BundleError, match=word) as caught:
        BundleSettings.from_config(config, "model bundle 'x'")
    assert "\n" not in str(caught.value) and str(caught.value).startswith("model bundle 'x'")


def test_overrides_ignore_what_was_not_given_and_options_check_themselves() -> None:
    config = TwoStageConfig(halo=16)
    assert config.with_overrides(halo=None, ratio=2) == TwoStageConfig(halo=16, ratio=2)
    with pytest.raises(InputError, match="--overwrite or --resume"):
        RunOptions(overwrite=True, resume=True)
    with pytest.raises(InputError, match="batch-size"):
        RunOptions(batch_size=0)


def test_auto_tile_is_a_multiple_of_the_file_tile_and_the_stride() -> None:
    assert auto_tile_size((240, 240), 32) == 480  # lcm 480, the multiple nearest 512
    assert auto_tile_size((256, 256), 32) == 512
    assert auto_tile_size((1000, 1000), 32) == 512  # lcm 8000 > 1024: stride alone
    assert auto_tile_size(None, 32) == 512 and auto_tile_size(None, 48) == 528


def test_plan_of_a_40x_slide_for_a_20x_model() -> None:
    slide = _slide()
    working, note = working_scale(slide, 0.5, rescale=True)
    assert working == (0, 2) and note["decision"].startswith("downsampled by 2")  # no level at 2: block means
    plan = make_plan(slide, None, None, FACTS, TwoStageConfig(ratio=4), working=working)
    assert plan.work_shape == (20000, 15000) and plan.tile_size == 512  # coarsened: not file-tile aligned
    # Model 1 wants downsample 8 of level 0: level 1 (4x) coarsened by 2.
    assert (plan.stage1_level, plan.stage1_coarsen, plan.stage1_shape, plan.stage1_scale) == (1, 2, (5000, 3750), (4.0, 4.0))
    assert plan.halo == 32 and plan.stage1_block == 512 and plan.context_shape == (313, 235)
    specs = {spec.name: spec for spec in plan.arrays()}
    assert list(specs)[:2] == [MASK, REFINED] and {PROBABILITY, IMAGE, CONTEXT} <= set(specs)
    # The output's pixels are Model 1's view, written by stage 1 in its blocks.
    assert plan.image_from_stage1 and (specs[IMAGE].shape, specs[IMAGE].chunks) == ((3, 5000, 3750), (3, 512, 512))
    full = make_plan(slide, None, None, FACTS, TwoStageConfig(ratio=4), working=working, pixels="full")
    assert not full.image_from_stage1 and full.image_shape == (20000, 15000) and full.image_step == (2.0, 2.0)
    geometry = plan.geometry()
    assert "source" not in geometry and geometry["tile_size"] == 512


def test_plan_at_native_pixels_aligns_tiles_and_full_resolution_has_no_stage1() -> None:
    slide = _slide(mpp=None)
    working, note = working_scale(slide, 0.5, rescale=True)
    assert working == (0, 1) and note["decision"] == "native pixels"
    plan = make_plan(slide, None, None, FACTS, TwoStageConfig(halo=40), working=working)
    assert plan.tile_size == 480 and plan.halo == 64  # halo rounded up to Model 2's stride
    assert (plan.stage1_level, plan.stage1_coarsen) == (1, 1)  # level 1 is exactly the ratio
    baseline = make_plan(slide, None, None, FACTS, TwoStageConfig(), full_resolution=True)
    assert baseline.stage2_role == "model" and not baseline.context and baseline.stage1_shape == (1, 1)
    assert [spec.name for spec in baseline.arrays()] == [MASK, REFINED, IMAGE]
    # Without stage 1 the low view of the pixels is read from the slide's level 1 (the ratio, 4).
    assert not baseline.image_from_stage1 and (baseline.image_level, baseline.image_coarsen) == (1, 1)
    with pytest.raises(InputError, match="multiple of the model's feature stride 32"):
        make_plan(slide, None, None, FACTS, TwoStageConfig(tile_size=500))


def test_halo_is_rounded_to_the_grid_stride_so_windows_stay_on_the_whole_images_grid() -> None:
    from wsiseg.models import build_model

    assert build_model("unet", 1, backbone="resnet_lite").grid_stride == 32  # feature stride 1, encoder 32
    assert build_model("fcn", 1, backbone="resnet18").grid_stride == 8  # dilated: output stride 8
    facts = ModelFacts({"model1": 1, "model2": 1}, 1, grids={"model1": 32, "model2": 32})
    plan = make_plan(_slide(tile=None), None, None, facts, TwoStageConfig(halo=40))
    assert plan.halo == 64 and plan.tile_size == 512
    assert make_plan(_slide(tile=None), None, None, facts, TwoStageConfig(tile_size=500)).tile_size == 500


def test_a_non_integer_pixel_size_ratio_is_resampled_not_rounded() -> None:
    """A 0.25 um/pixel slide for a 0.4 um/pixel model: factor 1.6, area-resampled from level 0."""
    slide = _slide()
    working, note = working_scale(slide, 0.4, rescale=True)
    assert working == (0, pytest.approx(1.6)) and note["decision"] == "downsampled by 1.6 to the model's pixel size (0.4 um)"
    assert note["scale_mismatch"] == 1.0
    plan = make_plan(slide, None, None, FACTS, TwoStageConfig(ratio=4), working=working)
    assert plan.work_shape == (25000, 18750) and plan.work_downsample == pytest.approx((1.6, 1.6))
    # Model 1 wants 6.4 x level 0: level 1 (4x) resampled by 1.6, not level 0 by 6.
    assert (plan.stage1_level, plan.stage1_coarsen, plan.stage1_shape) == (1, pytest.approx(1.6), (6250, 4688))
    assert plan.stage1_scale == pytest.approx((4.0, 18750 / 7500 * 1.6))
    # Within 5 % of the model's pixel size: native pixels; a whole factor: block means.
    assert working_scale(slide, 0.26, rescale=True)[0] == (0, 1)
    assert working_scale(slide, 1.0, rescale=True)[0] == (1, 1)


def test_model1_keeps_its_trained_pixel_size_on_coarser_slides() -> None:
    """The shipped model (0.316 um, ratio 4): Model 1 trained at 1.26 um pixels."""
    assert model1_ratio(4, 0.316, 0.316) == 4      # a 40x slide, brought to the model's pixels
    assert model1_ratio(4, 0.316, 0.33) == 4       # within 5 %: as it is
    assert model1_ratio(4, 0.316, 0.499) == 3      # a 20x slide read as it is: 4 x 0.316 / 0.499 = 2.53
    assert model1_ratio(4, 0.316, 0.8) == 2
    assert model1_ratio(4, 0.316, 2.0) == 1        # never below 1
    assert model1_ratio(4, None, 0.5) == 4 and model1_ratio(4, 0.316, None) == 4


def test_model1_at_one_third_of_a_halving_pyramid_takes_block_means_of_level_0() -> None:
    """A 20x slide whose levels halve, Model 1 at 1/3: block means of 3 over level 0 (level 1 resampled by 1.5
    decodes a quarter of the pixels but scores lower: benchmarks/RESULTS.md, "Where stage 1 reads on 20x
    slides"); a level that divides the downsample gives block means of that level."""
    slide = _slide(levels=((12000, 9000), (6000, 4500), (3000, 2250)), tile=(256, 256), mpp=(0.5, 0.5))
    plan = make_plan(slide, None, None, FACTS, TwoStageConfig(ratio=3))
    assert (plan.stage1_level, plan.stage1_coarsen, plan.stage1_shape, plan.stage1_scale) == (0, 3, (4000, 3000), (3.0, 3.0))
    assert view_for(slide, 2) == (1, 1) and view_for(slide, 8) == (2, 2) and view_for(slide, 6) == (1, 3)
    assert view_for(slide, 1.005) == (0, 1) and view_for(slide, 2.01) == (1, 1) and view_for(slide, 5) == (0, 5) and view_for(slide, 2.5) == (1, 1.25)


def test_refine_batches_keep_to_one_row_of_neighbouring_tiles() -> None:
    """Tiles of one window shape at opposite ends of a slide (rows 1 and 22 of column 0) or far apart in a
    row go to separate batches; neighbours (at most BATCH_GAP columns apart) share one."""
    slide = _slide(levels=((12000, 9000), (6000, 4500)), tile=(256, 256), mpp=(0.5, 0.5))
    plan = make_plan(slide, None, None, FACTS, TwoStageConfig(ratio=3))
    refined = np.zeros(plan.grid.shape, bool)
    for row, col in ((1, 0), (1, 1), (1, 2), (1, 4), (1, 8), (22, 0)):
        refined[row, col] = True
    assert plan.grid.window(1, 0, plan.halo).shape == plan.grid.window(22, 0, plan.halo).shape
    refines = [tiles for kind, tiles in _batches(plan, refined, set(), 4) if kind == "refine"]
    assert refines == [[(1, 0)], [(1, 1), (1, 2), (1, 4)], [(1, 8)], [(22, 0)]]
    composed = sorted(t for kind, tiles in _batches(plan, refined, set(), 4) if kind == "compose" for t in tiles)
    assert len(composed) == plan.grid.num_tiles - 6


def test_an_image_in_memory_may_carry_its_own_reduced_levels() -> None:
    """ImageSource with ``coarser`` levels reads them as a slide's pyramid: stage 1 at 1/4 takes block means
    of 2 over the stored level 1, not of 4 over level 0; a level that is not RGB uint8 is a clear error."""
    from wsiseg.run.in_memory import ImageSource
    from wsiseg.tiling import Box, downsample_mean

    level0 = np.random.default_rng(0).integers(0, 200, (640, 800, 3)).astype(np.uint8)
    level1 = downsample_mean(level0, 2) + 1  # told apart from level 0's block means
    source = ImageSource(level0, coarser=(level1,))
    assert [level.downsample for level in source.levels] == [(1.0, 1.0), (2.0, 2.0)]
    np.testing.assert_array_equal(source.read_region(1, Box(3, 9, 5, 12)), level1[3:9, 5:12])
    plan = make_plan(source, None, None, ModelFacts({"model1": 1, "model2": 1}, 1), TwoStageConfig(ratio=4))
    assert (plan.stage1_level, plan.stage1_coarsen, plan.stage1_shape) == (1, 2, (160, 200))
    with pytest.raises(InputError, match="uint8"):
        ImageSource(level0, coarser=(level1.astype(np.float32),))
