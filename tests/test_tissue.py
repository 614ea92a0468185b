"""Tissue detection: the thumbnail algorithm, tile fractions, and a slide run that keeps to tissue."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr

from conftest import structured_image, write_pyramid
from wsiseg.config import RunOptions, TwoStageConfig
from wsiseg.tiling import TileGrid
from wsiseg.tissue import detect_tissue, sample_tissue, tile_tissue
from wsiseg.uncertainty import TileSelection

PINK, PURPLE, GLASS = (235, 160, 200), (120, 70, 150), (242, 242, 240)


def _glass(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """White glass with a little noise (uint8 RGB)."""
    noise = rng.normal(0, 2, (height, width, 3))
    return np.clip(np.asarray(GLASS) + noise, 0, 255).astype(np.uint8)


def _he_tissue(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Pink stroma with purple nuclei (uint8 RGB)."""
    image = np.empty((height, width, 3), np.uint8)
    image[:] = PINK
    for _ in range(height * width // 200):
        y, x = rng.integers(0, height - 4), rng.integers(0, width - 4)
        image[y : y + 4, x : x + 4] = PURPLE
    return image


def test_glass_around_tissue_is_background_and_specks_are_dropped(rng) -> None:
    image = _glass(rng, 200, 300)
    image[50:150, 60:200] = _he_tissue(rng, 100, 140)
    image[10:13, 280:283] = PURPLE  # a 9-pixel speck of dust
    result = detect_tissue(image, min_area=64, margin=2)
    assert result.background == "bright"
    grown = np.zeros((200, 300), bool)
    grown[48:152, 58:202] = True  # the tissue grown by the 2-pixel margin
    assert result.mask[50:150, 60:200].all() and not result.mask[~grown].any()
    assert result.mask[48, 100] and result.mask[100, 201] and not result.mask[48, 58]  # edges grown, corners round
    # the rectangle grown by a radius-2 disk: 3 pixels short of the box at each corner
    assert result.mask.sum() == grown.sum() - 4 * 3


def test_an_image_that_is_all_tissue_keeps_all_of_it(rng) -> None:
    """Otsu would split pink from purple; the cap on the threshold keeps both."""
    result = detect_tissue(_he_tissue(rng, 128, 128))
    assert result.mask.all()
    assert result.threshold == pytest.approx(0.3)


def test_an_image_that_is_all_glass_has_no_tissue(rng) -> None:
    result = detect_tissue(_glass(rng, 128, 128))
    assert not result.mask.any()


def test_fluorescence_keeps_dim_and_bright_nuclei(rng) -> None:
    """Dark background: intensity is the signal; a dim nucleus (grey 30) is kept, not blanked."""
    image = np.clip(rng.normal(3, 1, (160, 160, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:160, :160]
    dim = (yy - 40) ** 2 + (xx - 40) ** 2 <= 100
    bright = (yy - 110) ** 2 + (xx - 110) ** 2 <= 144
    image[dim] = 30
    image[bright] = 200
    result = detect_tissue(image, min_area=16, margin=0)
    assert result.background == "dark"
    assert np.array_equal(result.mask, dim | bright)


def test_fluorescence_keeps_nuclei_smaller_than_the_speck_area(rng) -> None:
    """A fluorescence thumbnail at Model 1's downsample: sparse nuclei of 9 to 21 pixels, each below
    ``min_area``, are all kept (dropping them as specks blanked BOWL's sparse images)."""
    image = np.clip(rng.normal(3, 1, (64, 64, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:64, :64]
    nuclei = np.zeros((64, 64), bool)
    for y, x, r in ((10, 12, 1.5), (30, 40, 2.0), (50, 20, 2.5)):
        nuclei |= (yy - y) ** 2 + (xx - x) ** 2 <= r * r
    image[nuclei] = 120
    result = detect_tissue(image, min_area=64, margin=0)
    assert result.background == "dark"
    assert np.array_equal(result.mask, nuclei)


def test_tile_fractions_equal_the_sampled_mask(rng) -> None:
    tissue = rng.random((37, 53)) > 0.6
    grid = TileGrid(150, 211, 32)
    step = (150 / 37, 211 / 53)  # non-integer steps
    fractions = tile_tissue(tissue, grid, step)
    for row, col in grid.tiles():
        box = grid.tile(row, col)
        sampled = sample_tissue(tissue, box.y0, box.y1, box.x0, box.x1, step)
        assert fractions[row, col] == pytest.approx(sampled.mean(), abs=1e-12)
    assert sample_tissue(tissue, 0, 150, 0, 211, step).shape == (150, 211)


# --------------------------------------------------------------------------- a slide run


@pytest.fixture(scope="module")
def margin_slide(tmp_path_factory) -> Path:
    """768 x 1000: tissue-like texture on the left 600 columns, white glass on the rest."""
    rng = np.random.default_rng(7)
    image = _glass(rng, 768, 1000)
    image[:, :600] = structured_image(rng, 768, 600) // 2 + 60  # darker than glass everywhere
    return write_pyramid(tmp_path_factory.mktemp("tissue") / "margin.tif", image)


CONFIG = TwoStageConfig(tile_size=128, halo=32)


def test_glass_margin_gets_no_foreground_and_no_refinement(tmp_path, margin_slide, test_bundle, local_client) -> None:
    from wsiseg.run.slides import segment_slide

    options = RunOptions(model=str(test_bundle))
    report = segment_slide(margin_slide, tmp_path / "on.zarr", local_client, CONFIG, options)
    bare = segment_slide(margin_slide, tmp_path / "off.zarr", local_client, CONFIG,
                         RunOptions(model=str(test_bundle), tissue=False))
    mask = np.asarray(zarr.open_array(str(tmp_path / "on.zarr/labels/mask/0"), mode="r")[...])
    plain = np.asarray(zarr.open_array(str(tmp_path / "off.zarr/labels/mask/0"), mode="r")[...])
    tissue = np.asarray(zarr.open_array(str(tmp_path / "on.zarr/labels/tissue/0"), mode="r")[...])
    refined = np.asarray(zarr.open_array(str(tmp_path / "on.zarr/labels/refined/0"), mode="r")[...])
    # The tissue mask (Model 1's 1/4 view) ends where the texture does, plus its 2-pixel margin.
    assert tissue.shape == (192, 250)
    assert tissue[:, :150].all() and not tissue[:, 153:].any()
    # Past the margin nothing is foreground and no tile is refined; the model alone marks glass.
    assert not mask[:, 612:].any() and plain[:, 612:].any()
    assert np.array_equal(mask[:, :600], plain[:, :600])
    assert not refined[:, 5:].any()  # tiles from column 640 on are glass
    assert report.tissue["fraction"] == pytest.approx(tissue.mean(), abs=1e-4)
    assert report.tissue["tiles"] == 6 * 5  # 6 rows x tile columns 0-4 (the fifth holds columns 512-612)
    assert report.domain["tissue_tiles"] == 30
    assert bare.tissue is None and "tissue" not in json.loads(
        (tmp_path / "off.zarr/labels/.zattrs").read_text())["labels"]
    labels = json.loads((tmp_path / "on.zarr/labels/.zattrs").read_text())["labels"]
    assert labels == ["mask", "refined", "tissue"]

    # --full-resolution with the same tissue mask: the baseline runs on the tissue tiles only.
    full = segment_slide(margin_slide, tmp_path / "full.zarr", local_client, CONFIG,
                         RunOptions(model=str(test_bundle), full_resolution=True))
    full_mask = np.asarray(zarr.open_array(str(tmp_path / "full.zarr/labels/mask/0"), mode="r")[...])
    full_refined = np.asarray(zarr.open_array(str(tmp_path / "full.zarr/labels/refined/0"), mode="r")[...])
    assert full_refined[:, :5].all() and not full_refined[:, 5:].any()
    assert full.tiles.refined == 30 and not full_mask[:, 612:].any() and full_mask[:, :600].any()


def test_a_bundle_with_a_pixel_size_warns_on_a_slide_without_one(tmp_path, test_bundle, local_client, slide_image) -> None:
    from wsiseg.bundle import load_bundle, save_bundle
    from wsiseg.run.slides import segment_slide

    bundle = load_bundle(test_bundle)
    with_mpp = save_bundle(tmp_path / "mpp.safetensors", bundle.models, {**bundle.config, "mpp": 0.5})
    slide = write_pyramid(tmp_path / "nompp.tif", slide_image, mpp=None)
    report = segment_slide(slide, tmp_path / "out.zarr", local_client, CONFIG, RunOptions(model=str(with_mpp)))
    assert [w for w in report.warnings if "pixel size" in w] == [
        "the model was trained at 0.5 um/pixel but nompp.tif records no pixel size, so it is segmented at its "
        "own pixels; give --mpp UM (micrometres per pixel) to match"
    ]
    given = segment_slide(slide, tmp_path / "given.zarr", local_client, CONFIG,
                          RunOptions(model=str(with_mpp), mpp=0.5))
    assert not [w for w in given.warnings if "pixel size" in w]


def test_the_example_slides_glass_gets_no_foreground(tmp_path, local_client) -> None:
    """The shipped model on the example H&E slide: the white glass right of the tissue (where
    Model 1 alone marked the last columns as nuclei) is background; nuclei remain on tissue."""
    from wsiseg.run.slides import segment_slide

    example = Path(__file__).resolve().parents[1] / "examples" / "data" / "CMU-1-Small-Region.svs"
    out = tmp_path / "example.zarr"
    report = segment_slide(example, out, local_client, None, RunOptions())
    mask = np.asarray(zarr.open_array(str(out / "labels/mask/0"), mode="r")[...])
    tissue = np.asarray(zarr.open_array(str(out / "labels/tissue/0"), mode="r")[...])
    # A 0.499 um slide for the 0.316 um model: Model 1 (and the tissue thumbnail) at 1/3, not 1/4.
    assert report.working_resolution["model1_ratio"] == 3
    assert mask.shape == (2967, 2220) and tissue.shape == (989, 740)
    assert report.tissue["background"] == "bright"
    assert report.tissue["fraction"] == pytest.approx(0.385, abs=0.01)
    assert not mask[:, -40:].any()  # glass at the right edge
    assert not tissue[:, -10:].any()
    assert mask[tissue.repeat(3, 0).repeat(3, 1)[:2967, :2220] == 0].sum() == 0
    assert 0.02 < (mask > 0).mean() < 0.3  # nuclei (rim, middle, core) found on the tissue
    # H&E, the model's own domain: the domain check compares with the bundle's profile and stays silent.
    assert report.domain["profile"]["backgrounds"] == ["bright"]
    assert report.domain["median_score"] < report.domain["profile"]["score_high"]
    assert not [w for w in report.warnings if "--model bowl" in w]


@pytest.fixture(scope="module")
def corner_slide(tmp_path_factory) -> Path:
    """1024 x 1280 of glass with tissue-like texture in its top-left 300 x 360 corner only."""
    rng = np.random.default_rng(11)
    image = _glass(rng, 1024, 1280)
    image[:300, :360] = structured_image(rng, 300, 360) // 2 + 60
    return write_pyramid(tmp_path_factory.mktemp("tissue") / "corner.tif", image)


@pytest.mark.slow
@pytest.mark.cluster
def test_stage1_runs_on_the_tissue_corner_only_and_the_mask_is_unchanged(tmp_path, corner_slide, test_bundle,
                                                                          local_client) -> None:
    from wsiseg.run.slides import segment_slide

    config = TwoStageConfig(tile_size=128, halo=32, stage1_block=64, stage1_halo=32,
                            selection=TileSelection.budget(0.5))
    options = RunOptions(model=str(test_bundle))
    corner = segment_slide(corner_slide, tmp_path / "corner.zarr", local_client, config, options)
    everywhere = segment_slide(corner_slide, tmp_path / "all.zarr", local_client,
                               replace(config, stage1_on_tissue=False), options)

    def read(run, name):
        return np.asarray(zarr.open_array(str(tmp_path / f"{run}.zarr" / name), mode="r")[...])

    # Model 1's view is 256 x 320: 4 x 5 blocks of 64; the corner's tiles (and their halos) need 2 x 2 of them.
    assert (corner.stage1["blocks"], everywhere.stage1["blocks_run"]) == (20, 20)
    assert corner.stage1["blocks_run"] == 4
    assert corner.model_gflop["stage1"] == pytest.approx(everywhere.model_gflop["stage1"] * 4 / 20, rel=0.05)
    # The same tiles refined, the same mask: over tissue from the same maps, elsewhere 0.
    np.testing.assert_array_equal(read("corner", "labels/refined/0"), read("all", "labels/refined/0"))
    np.testing.assert_array_equal(read("corner", "labels/mask/0"), read("all", "labels/mask/0"))
    assert read("corner", "labels/mask/0")[400:].max() == 0 and read("corner", "labels/mask/0")[:300, :360].any()
    np.testing.assert_array_equal(read("corner", "maps/probability/0")[:, :128, :128],  # the 2 x 2 blocks run
                                  read("all", "maps/probability/0")[:, :128, :128])
    # Glass blocks: background probability and no uncertainty, without a forward pass.
    assert read("corner", "maps/probability/0")[:, 128:].max() == 0.0 and read("corner", "maps/uncertainty/0")[128:].max() == 0.0
    # The output's pixels are still the whole view (glass blocks read, not segmented).
    np.testing.assert_array_equal(read("corner", "0"), read("all", "0"))


def test_the_blocks_a_tissue_tile_needs_hold_everything_it_reads_from_stage_1() -> None:
    from wsiseg.run.plan import ModelFacts, make_plan, stage1_blocks_needed
    from wsiseg.tiling import stage1_crop

    class Source:
        levels = [SimpleNamespace(shape=(3000, 2500), downsample=(1.0, 1.0), tile_shape=None)]
        mpp = None

    facts = ModelFacts({"model1": 1, "model2": 1}, 1, {"model1": 32, "model2": 32})
    plan = make_plan(Source(), None, None, facts, TwoStageConfig(ratio=3, tile_size=160, halo=32, stage1_block=96))
    rng = np.random.default_rng(3)
    for _ in range(20):
        on_tissue = rng.random(plan.grid.shape) < 0.05
        needed = stage1_blocks_needed(plan, on_tissue)
        for row, col in np.argwhere(on_tissue):
            crop = stage1_crop(plan.grid.tile(row, col), plan.stage1_scale, plan.stage1_shape)
            side = plan.stage1_block
            assert needed[crop.y0 // side : (crop.y1 - 1) // side + 1, crop.x0 // side : (crop.x1 - 1) // side + 1].all()
        assert not stage1_blocks_needed(plan, np.zeros(plan.grid.shape, bool)).any()
