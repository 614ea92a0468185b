"""The whole-slide Dask graph: equal to the in-memory engine, decode-once, resumable, readable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from wsiseg.bundle import load_bundle
from wsiseg.config import RunOptions, TwoStageConfig
from wsiseg.errors import InputError
from wsiseg.run import segment_full_resolution, segment_image, segment_slide
from wsiseg.tiling import Box, TileGrid
from wsiseg.uncertainty import TileSelection
from wsiseg.run.report import TileCounts, read_report

SELECTION = TileSelection.budget(0.5)
GEOMETRY = {"tile_size": 256, "halo": 32, "stage1_block": 64, "stage1_halo": 32}
CONFIG = TwoStageConfig(ratio=4, selection=SELECTION, **GEOMETRY)


def _run(slide, out, client, bundle, config: TwoStageConfig = CONFIG, progress=None, **options):
    """``segment_slide`` with the test geometry; ``options`` are RunOptions fields."""
    return segment_slide(slide, out, client, config, RunOptions(model=str(bundle), **options), progress)


def _read(out, name: str) -> np.ndarray:
    return np.asarray(zarr.open_array(str(out / name), mode="r")[...])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, pyramid_slide, test_bundle, local_client):
    out = tmp_path_factory.mktemp("runs") / "reference.zarr"
    report = _run(pyramid_slide, out, local_client, test_bundle)
    return out, report


def test_dask_result_equals_in_memory_engine(reference_run, slide_image, test_bundle) -> None:
    out, report = reference_run
    bundle = load_bundle(test_bundle)
    torch.set_num_threads(1)  # the workers' setting, so that float reductions match
    expected = segment_image(slide_image, bundle.model1, bundle.model2, CONFIG, device="cpu", batch_size=4)

    assert report.stage1 == {"level": 2, "coarsen": 1, "scale": [4.0, 4.0], "shape": [192, 250], "blocks": 12,
                             "blocks_run": 12}  # all tissue
    assert report.tiles == TileCounts(total=12, refined=6, refined_fraction=0.5, resumed=0)
    np.testing.assert_array_equal(_read(out, "labels/refined/0").astype(bool), expected.refined)
    np.testing.assert_allclose(_read(out, "maps/tile_scores/0"), expected.tile_scores, atol=1e-6)
    np.testing.assert_allclose(_read(out, "maps/probability/0"), expected.stage1_probabilities, atol=1e-6)
    np.testing.assert_allclose(_read(out, "maps/uncertainty/0"), expected.uncertainty, atol=1e-6)
    mask = _read(out, "labels/mask/0")
    np.testing.assert_array_equal(mask, expected.mask)
    assert 0.2 < mask.mean() < 0.8  # a mask with structure, not a constant
    assert report.label_pixels == {"background": int((mask == 0).sum()), "tissue": int((mask == 1).sum())}


def test_output_opens_with_ome_zarr_reader(reference_run) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    out, _ = reference_run
    expected = {
        "": ([(3, 192, 250)], [1.0, 2.0, 2.0]),  # the slide's pixels as Model 1 read them
        "labels/mask": ([(768, 1000), (384, 500), (192, 250)], [0.5, 0.5]),
        "labels/refined": ([(3, 4)], [128.0, 128.0]),
        "maps/probability": ([(1, 192, 250)], [1.0, 2.0, 2.0]),
        "maps/uncertainty": ([(192, 250)], [2.0, 2.0]),
        "maps/tile_scores": ([(3, 4)], [128.0, 128.0]),
    }
    for name, (shapes, scale) in expected.items():
        nodes = {n.zarr.path.rstrip("/"): n for n in Reader(parse_url(str(out / name) if name else str(out)))()}
        node = nodes[str(out / name).rstrip("/") if name else str(out)]
        assert [tuple(d.shape) for d in node.data] == shapes, name
        transforms = node.metadata["coordinateTransformations"]
        assert transforms[0][0]["scale"] == pytest.approx(scale), name
        if len(transforms) > 1:
            assert transforms[1][0]["scale"] == pytest.approx([2 * s for s in scale]), name
    mask_node = next(n for n in Reader(parse_url(str(out)))() if n.zarr.path.rstrip("/").endswith("labels/mask"))
    assert any(type(spec).__name__ == "Label" for spec in mask_node.specs)
    np.testing.assert_array_equal(np.asarray(mask_node.data[1]), _read(out, "labels/mask/0")[::2, ::2])
    report = read_report(out)
    assert report.status == "complete" and report.outputs["levels"] == 3
    assert (out / "overlay.png").stat().st_size > 1000
    assert not (out / ".wsiseg" / "context").exists()  # scratch removed


def test_each_level0_tile_is_decoded_at_most_once_and_only_for_selected_windows(
    tmp_path, pyramid_slide, test_bundle, local_client, monkeypatch
) -> None:
    from wsiseg.readers import clear_readers
    from wsiseg.readers.tiff import TiffReader

    decoded: list[tuple[int, int]] = []
    original = TiffReader._decode

    def counting(self, page, index):
        decoded.append((page.imagewidth, index))
        return original(self, page, index)

    monkeypatch.setattr(TiffReader, "_decode", counting)
    clear_readers()
    out = tmp_path / "count.zarr"
    report = _run(pyramid_slide, out, local_client, test_bundle)
    level0 = [index for width, index in decoded if width == 1000]
    # Opening the slide checks its corner tiles once in the driver; the run itself:
    from wsiseg.slide import open_slide

    decoded.clear()
    clear_readers()
    open_slide(pyramid_slide)
    opening = [index for width, index in decoded if width == 1000]
    run = list(level0)
    for index in opening:
        run.remove(index)
    assert len(run) == len(set(run)), "a level-0 tile was decoded twice"

    refined = _read(out, "labels/refined/0").astype(bool)
    grid = TileGrid(768, 1000, 256)
    needed = set()
    for row, col in np.argwhere(refined):
        window = grid.window(int(row), int(col), 32)
        for ty in range(window.y0 // 128, -(-window.y1 // 128)):
            for tx in range(window.x0 // 128, -(-window.x1 // 128)):
                needed.add(ty * 8 + tx)
    assert set(run) == needed
    assert report.tiles.refined == 6 and len(needed) < 6 * 8  # fewer than all 48 tiles


def test_interrupted_run_resumes_without_redoing_tiles(tmp_path, pyramid_slide, test_bundle, local_client, reference_run) -> None:
    out = tmp_path / "resumed.zarr"

    def interrupt(stage, done, total):
        if stage == "stage2" and done >= 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(pyramid_slide, out, local_client, test_bundle, progress=interrupt)
    assert not (out / "report.json").exists()  # nothing looks complete
    assert "multiscales" not in zarr.open_group(str(out), mode="r").attrs
    from wsiseg.describe import describe_output

    assert describe_output(out) == [f"output:    {out} (wsiseg run not finished: run the same command with --resume)"]
    lines = (out / ".wsiseg" / "progress.jsonl").read_text().splitlines()
    before = {tuple(t) for line in lines for t in json.loads(line).get("tiles", [])}
    assert len(before) >= 5

    with pytest.raises(InputError, match="already exists"):
        _run(pyramid_slide, out, local_client, test_bundle)
    report = _run(pyramid_slide, out, local_client, test_bundle, resume=True)
    after_lines = (out / ".wsiseg" / "progress.jsonl").read_text().splitlines()[len(lines):]
    redone = {tuple(t) for line in after_lines for t in json.loads(line).get("tiles", [])}
    assert not (redone & before), "finished tiles were recomputed"
    assert not any("stage1" in json.loads(line) for line in after_lines)
    assert report.tiles.resumed == len(before)
    reference, _ = reference_run
    np.testing.assert_array_equal(_read(out, "labels/mask/0"), _read(reference, "labels/mask/0"))
    np.testing.assert_array_equal(_read(out, "labels/mask/1"), _read(reference, "labels/mask/1"))
    np.testing.assert_array_equal(_read(out, "0"), _read(reference, "0"))  # the pixels, written by stage 1

    with pytest.raises(InputError, match="other settings"):
        _run(pyramid_slide, out, local_client, test_bundle, CONFIG.with_overrides(halo=64), resume=True)


def test_full_resolution_mode_equals_in_memory_baseline(tmp_path, pyramid_slide, slide_image, test_bundle, local_client) -> None:
    out = tmp_path / "baseline.zarr"
    report = _run(pyramid_slide, out, local_client, test_bundle, full_resolution=True)
    torch.set_num_threads(1)
    expected = segment_full_resolution(slide_image, load_bundle(test_bundle).model, CONFIG, "cpu", batch_size=4)
    np.testing.assert_array_equal(_read(out, "labels/mask/0"), expected.mask)
    assert report.mode == "full-resolution" and report.tiles.refined == 12
    assert not (out / "probability").exists()


def test_existing_outputs_are_protected(tmp_path, pyramid_slide, test_bundle, local_client) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("precious")
    with pytest.raises(InputError, match="already exists"):
        _run(pyramid_slide, foreign, local_client, test_bundle)
    with pytest.raises(InputError, match="not a wsiseg output"):
        _run(pyramid_slide, foreign, local_client, test_bundle, overwrite=True)
    assert (foreign / "thesis.docx").read_text() == "precious"


def test_bundle_without_the_needed_models_is_refused(tmp_path, pyramid_slide, local_client) -> None:
    from wsiseg.bundle import save_bundle
    from wsiseg.models import build_model

    single = save_bundle(tmp_path / "single.safetensors", {"model": build_model("fcn", 1, backbone="mobilenet_v3_large")})
    with pytest.raises(InputError, match="no Model 1 / Model 2 pair"):
        _run(pyramid_slide, tmp_path / "o.zarr", local_client, single)
    assert not (tmp_path / "o.zarr").exists()


def test_geojson_polygons_rasterise_back_onto_the_mask(tmp_path, local_client) -> None:
    import shapely
    from scipy import ndimage

    from wsiseg.geojson import write_geojson
    from wsiseg.output import ArraySpec, prepare_output

    rng = np.random.default_rng(0)
    height, width, tile = 300, 420, 128
    yy, xx = np.mgrid[0:height, 0:width]
    mask = np.zeros((height, width), np.uint8)
    for cy, cx, r in zip(rng.integers(0, height, 40), rng.integers(0, width, 40), rng.integers(4, 30, 40)):
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
    mask[100:220, 50:400] = 2  # a second class crossing many tiles
    mask[140:160, 100:120] = 0  # with a hole
    out = tmp_path / "g.zarr"
    prepare_output(out, {"test": 1}, [ArraySpec("labels/mask/0", mask.shape, (tile, tile), "uint8")], False, False)
    zarr.open_array(str(out / "labels/mask/0"), mode="r+")[...] = mask

    path = write_geojson(out, tile, ["background", "nucleus", "stroma"], local_client)
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    points = shapely.points((xx + 0.5).ravel(), (yy + 0.5).ravel())
    raster = np.zeros(mask.size, np.uint8)
    per_class = {1: 0, 2: 0}
    for feature in collection["features"]:
        value = feature["properties"]["label"]
        assert feature["properties"]["classification"]["name"] == ["background", "nucleus", "stroma"][value]
        polygon = shapely.geometry.shape(feature["geometry"])
        assert polygon.is_valid
        inside = shapely.contains(polygon, points)
        assert not (raster[inside] != 0).any(), "polygons overlap"
        raster[inside] = value
        per_class[value] += 1
    np.testing.assert_array_equal(raster.reshape(mask.shape), mask)
    # One polygon per 4-connected region: objects crossing tiles were merged.
    for value in (1, 2):
        _, regions = ndimage.label(mask == value)
        assert per_class[value] == regions


def test_slide_is_rescaled_to_the_models_pixel_size(tmp_path, pyramid_slide, slide_image, test_bundle, local_client) -> None:
    from wsiseg.bundle import save_bundle
    from wsiseg.tiling import downsample_mean

    from conftest import write_pyramid

    chained = write_pyramid(tmp_path / "chained.tif", slide_image, chained=True)  # level 2 = means of level 1
    loaded = load_bundle(test_bundle)
    coarse = save_bundle(tmp_path / "coarse.safetensors", loaded.models, {**loaded.config, "mpp": 1.0})
    out = tmp_path / "rescaled.zarr"
    config = TwoStageConfig(ratio=2, tile_size=128, halo=32, stage1_block=64, stage1_halo=32, selection=SELECTION)
    report = _run(chained, out, local_client, coarse, config, geojson=True)
    working = report.working_resolution
    assert (working["level"], working["coarsen"], working["size_yx"]) == (1, 1, [384, 500])
    assert working["scale_mismatch"] == 1.0
    assert report.stage1["level"] == 2 and report.stage1["scale"] == [2.0, 2.0]
    torch.set_num_threads(1)
    half = downsample_mean(slide_image, 2)  # the pixels of level 1
    expected = segment_image(half, loaded.model1, loaded.model2, config, device="cpu")
    np.testing.assert_array_equal(_read(out, "labels/mask/0"), expected.mask)

    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    node = next(n for n in Reader(parse_url(str(out)))() if n.zarr.path.rstrip("/").endswith("labels/mask"))
    assert node.metadata["coordinateTransformations"][0][0]["scale"] == pytest.approx([1.0, 1.0])  # 2 px x 0.5 um

    # GeoJSON coordinates are level-0 pixels: each mask pixel is a 2 x 2 square of the slide.
    import shapely.geometry

    features = json.loads((out / "mask.geojson").read_text())["features"]
    shapes = [shapely.geometry.shape(f["geometry"]) for f in features if f["properties"]["classification"]["name"] == "tissue"]
    assert sum(shape.area for shape in shapes) == 4 * int((_read(out, "labels/mask/0") == 1).sum())
    x0, y0, x1, y1 = shapely.union_all(shapes).bounds
    assert x0 >= 0 and y0 >= 0 and x1 <= 1000 and y1 <= 768 and x1 > 900 and y1 > 700

    fine = save_bundle(tmp_path / "fine.safetensors", loaded.models, {**loaded.config, "mpp": 0.25})
    report = _run(pyramid_slide, tmp_path / "fine.zarr", local_client, fine, config)
    assert report.working_resolution["level"] == 0 and "not upsampled" in report.working_resolution["decision"]


def test_a_non_integer_pixel_size_ratio_is_resampled(tmp_path, pyramid_slide, slide_image, test_bundle, local_client) -> None:
    """A 0.5 um/pixel slide for a 0.8 um/pixel model: the working pixels are the slide area-resampled
    by 1.6 (not rounded to 2, not left native), and the output says 0.8 um per mask pixel."""
    from wsiseg.bundle import save_bundle
    from wsiseg.run.in_memory import ImageSource
    from wsiseg.resample import read_scaled

    loaded = load_bundle(test_bundle)
    bundle = save_bundle(tmp_path / "b.safetensors", loaded.models, {**loaded.config, "mpp": 0.8})
    config = TwoStageConfig(ratio=2, tile_size=128, halo=32, stage1_block=64, stage1_halo=32, selection=SELECTION)
    out = tmp_path / "fractional.zarr"
    report = _run(pyramid_slide, out, local_client, bundle, config, pixels="full")
    working = report.working_resolution
    assert (working["level"], working["size_yx"]) == (0, [480, 625]) and working["coarsen"] == pytest.approx(1.6)
    assert working["decision"] == "downsampled by 1.6 to the model's pixel size (0.8 um)"
    # Model 1: 3.2 x level 0 = level 1 (2x) resampled by 1.6.
    assert report.stage1["level"] == 1 and report.stage1["shape"] == [240, 313]
    assert _read(out, "labels/mask/0").shape == (480, 625)
    expected = read_scaled(ImageSource(slide_image), 0, 1.6, Box(0, 480, 0, 625))
    np.testing.assert_array_equal(_read(out, "0"), expected.transpose(2, 0, 1))
    attrs = json.loads((out / "labels/mask/.zattrs").read_text())
    assert attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == pytest.approx([0.8, 0.8])


def test_models_are_loaded_once_per_process_and_threads_fit_the_cores(tmp_path, pyramid_slide, test_bundle, local_client, monkeypatch) -> None:
    import shutil

    import wsiseg.bundle as bundle_module
    from wsiseg.cluster import available_cores, torch_threads_per_host

    fresh = tmp_path / "fresh.safetensors"
    shutil.copy(test_bundle, fresh)  # a path no worker has cached yet
    loads = []
    original = bundle_module.load_bundle
    monkeypatch.setattr(bundle_module, "load_bundle", lambda path: loads.append(str(path)) or original(path))
    report = _run(pyramid_slide, tmp_path / "once.zarr", local_client, fresh)
    assert report.tiles.total == 12  # 12 tiles + 12 stage-1 blocks + reads: dozens of tasks
    # One load, in this process's worker cache, which also answered the driver's
    # planning question (describe_bundle): not one per task, none in the driver.
    assert loads.count(str(fresh.resolve())) == 1

    threads = torch_threads_per_host(local_client)
    dask_threads = sum(w["nthreads"] for w in local_client.scheduler_info(n_workers=-1)["workers"].values())
    assert set(threads.values()) == {max(1, available_cores() // dask_threads)}


def test_uniform_unrefined_tiles_are_written_as_the_in_memory_engine_composes_them(
    tmp_path, pyramid_slide, slide_image, local_client
) -> None:
    """Unrefined tiles whose Model 1 crop is one label everywhere skip upsampling (compose_tiles):
    foreground ones are written as a constant, background ones not at all. The mask must equal the
    one composed by upsampling every tile (what keeping the probabilities forces)."""
    from conftest import centred_model

    from wsiseg.bundle import save_bundle
    from wsiseg.tiling import downsample_mean

    model1 = centred_model("unet", "mobilenet_v3_large", downsample_mean(slide_image, 4), 1)
    with torch.no_grad():
        model1.classifier.bias += 15.0  # mostly foreground: some tiles all foreground, others mixed
    model2 = centred_model("unet", "mobilenet_v3_large", slide_image, 2)
    bundle = save_bundle(tmp_path / "biased.safetensors", {"model1": model1, "model2": model2}, {"ratio": 4})
    selection = TileSelection.top_n(2)
    out = tmp_path / "biased.zarr"
    config = TwoStageConfig(ratio=4, selection=selection, **GEOMETRY)
    report = _run(pyramid_slide, out, local_client, bundle, config)
    torch.set_num_threads(1)
    expected = segment_image(slide_image, model1, model2, config, device="cpu", probabilities=True)
    mask = _read(out, "labels/mask/0")
    np.testing.assert_array_equal(mask, expected.mask)
    grid = TileGrid(*mask.shape, GEOMETRY["tile_size"])
    unrefined = [grid.tile(r, c) for r, c in grid.tiles() if not expected.refined[r, c]]
    all_foreground = sum(bool((mask[t.slices()] == 1).all()) for t in unrefined)
    assert 1 <= all_foreground < len(unrefined)  # both the shortcut and the upsampling were taken
    assert report.label_pixels["foreground"] == int(mask.sum())


def test_model1_ratio_follows_the_slides_pixel_size_unless_given(tmp_path, pyramid_slide, test_bundle) -> None:
    """A 0.5 um slide for a 0.25 um model (ratio 4), read as it is: Model 1 at 1/2, near its 1 um;
    --ratio, or a flow the caller gives, is run as it is."""
    from wsiseg.bundle import save_bundle
    from wsiseg.run.job import prepare_run

    loaded = load_bundle(test_bundle)
    fine = save_bundle(tmp_path / "fine.safetensors", loaded.models,
                       {**loaded.config, "mpp": 0.25, "mpp_range": [0.2, 0.5]})
    options = RunOptions(model=str(fine))
    job = prepare_run([pyramid_slide], tmp_path / "a.zarr", {}, options).jobs[0]
    assert job.config.ratio == 2 and job.scale_note["model1_ratio"] == 2
    assert "at 0.5 um Model 1 runs at 1/2, near its trained 1 um" in job.scale_note["model1_ratio_why"]
    given = prepare_run([pyramid_slide], tmp_path / "b.zarr", {"ratio": 4}, options).jobs[0]
    assert given.config.ratio == 4 and "model1_ratio" not in given.scale_note
    at_its_size = save_bundle(tmp_path / "same.safetensors", loaded.models, {**loaded.config, "mpp": 0.5})
    job = prepare_run([pyramid_slide], tmp_path / "c.zarr", {}, RunOptions(model=str(at_its_size))).jobs[0]
    assert job.config.ratio == 4
