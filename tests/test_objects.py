"""Nuclei as objects: streamed instances equal the whole-image definition."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import regionprops

from wsiseg.instances import (
    assign_offsets,
    split_component,
    stream_instances,
    tile_instances,
    tile_objects,
    whole_image_instances,
)
from wsiseg.tiling import Box, TileGrid

TILE, MAX_SIZE, MIN_DISTANCE = 64, 48, 4
SHAPE = (230, 300)  # edge tiles are partial
EIGHT = np.ones((3, 3), bool)


def disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def synthetic_mask(seed: int = 0) -> np.ndarray:
    """Class mask: discs (r 5-9), touching pairs, border-crossing discs, two too-large blobs, class-2 decoys."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(SHAPE, np.uint8)
    taken = np.zeros(SHAPE, bool)

    def place(shape: np.ndarray, value: int = 1) -> bool:
        if (ndimage.binary_dilation(shape, iterations=2) & taken).any():
            return False
        mask[shape] = value
        taken[shape] = True
        return True

    # Too large: a disc of diameter 61 inside tile (1, 1) and a bar crossing the x = 192 border.
    assert place(disc(SHAPE, 95, 95, 30))
    bar = np.zeros(SHAPE, bool)
    bar[150:166, 160:220] = True
    assert place(bar)
    borders_y, borders_x = np.arange(TILE, SHAPE[0], TILE), np.arange(TILE, SHAPE[1], TILE)
    for i in range(400):
        r = rng.uniform(5, 9)
        cy, cx = rng.uniform(r, SHAPE[0] - r), rng.uniform(r, SHAPE[1] - r)
        if i % 3 == 0:  # centre on a tile border
            if rng.random() < 0.5:
                cy = rng.choice(borders_y) + rng.uniform(-3, 3)
            else:
                cx = rng.choice(borders_x) + rng.uniform(-3, 3)
        shape = disc(SHAPE, cy, cx, r)
        if i % 2 == 0:  # a touching pair, centres 1.4 radii apart
            angle = rng.uniform(0, np.pi)
            shape |= disc(SHAPE, cy + 1.4 * r * np.sin(angle), cx + 1.4 * r * np.cos(angle), r)
        place(shape, 2 if i % 17 == 0 else 1)
    return mask


@pytest.fixture(scope="module")
def mask() -> np.ndarray:
    return synthetic_mask()


@pytest.fixture(scope="module")
def whole(mask: np.ndarray) -> tuple[np.ndarray, int]:
    return whole_image_instances(mask, MAX_SIZE, MIN_DISTANCE)


@pytest.fixture(scope="module")
def tiled(mask: np.ndarray) -> np.ndarray:
    """The whole-image objects numbered in streaming order (owner tile, then anchor)."""
    return whole_image_instances(mask, MAX_SIZE, MIN_DISTANCE, tile_size=TILE)[0]


@pytest.fixture(scope="module")
def streamed(mask: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    return stream_instances(mask, TILE, MAX_SIZE, MIN_DISTANCE)


def assert_bijection(a: np.ndarray, b: np.ndarray) -> None:
    """Nonzero ids of ``a`` and ``b`` cover the same pixels and map one to one."""
    np.testing.assert_array_equal(a > 0, b > 0)
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    assert np.unique(pairs[0]).size == pairs.shape[1]
    assert np.unique(pairs[1]).size == pairs.shape[1]


def test_the_test_image_exercises_splitting_merging_and_too_large(mask, whole) -> None:
    instances, too_large = whole
    assert too_large == 2
    assert instances[95, 95] == 0 and instances[158, 190] == 0  # the too-large blobs
    assert (mask[95, 95], mask[158, 190]) == (1, 1)
    _, components = ndimage.label(mask == 1, structure=EIGHT)
    n = int(instances.max())
    assert n > components - too_large + 20  # many touching pairs are split
    assert not instances[mask == 2].any()  # other classes are not objects
    # Objects spanning more than one tile.
    crossing = 0
    for region in regionprops(instances):
        y0, x0, y1, x1 = region.bbox
        crossing += (y0 // TILE != (y1 - 1) // TILE) or (x0 // TILE != (x1 - 1) // TILE)
    assert crossing >= 10


def test_streamed_instances_equal_the_whole_image(mask, whole, tiled, streamed) -> None:
    reference, _ = whole
    instances, table = streamed
    assert instances.dtype == np.uint32 and instances.shape == SHAPE
    assert_bijection(instances, reference)  # raster-order ids, up to relabelling
    assert not instances[95, 95] and not instances[158, 190]  # too large
    n = int(reference.max())
    np.testing.assert_array_equal(np.unique(instances), np.arange(n + 1))
    np.testing.assert_array_equal(table["id"], np.arange(1, n + 1, dtype=np.uint32))
    assert table["id"].dtype == np.uint32
    # The ids themselves equal the whole image numbered in the same order.
    np.testing.assert_array_equal(instances, tiled)
    assert not np.array_equal(instances, reference)  # 5 tiles wide: tile order is not raster order


def test_one_tile_wide_gives_raster_order(mask) -> None:
    strip = mask[:, :TILE]
    reference, _ = whole_image_instances(strip, MAX_SIZE, MIN_DISTANCE)
    instances, _ = stream_instances(strip, TILE, MAX_SIZE, MIN_DISTANCE)
    assert reference.max() > 10
    np.testing.assert_array_equal(instances, reference)


def test_pass_one_counts_add_up_and_too_large_is_decided_alike_in_every_window(mask, whole) -> None:
    reference, too_large = whole
    grid = TileGrid(*SHAPE, TILE)
    results = {}
    for r, c in grid.tiles():
        window = grid.window(r, c, MAX_SIZE)
        results[r, c] = tile_objects(mask[window.slices()], window, grid.tile(r, c), SHAPE, MAX_SIZE, MIN_DISTANCE)
    assert sum(res.num_objects for res in results.values()) == reference.max()
    assert sum(res.too_large for res in results.values()) == too_large
    # Every whole-image component with sides <= MAX_SIZE is complete (off the cut
    # window border) in each window that holds its anchor's tile; every larger one is not an object.
    labels, _ = ndimage.label(mask == 1, structure=EIGHT)
    for index, sl in enumerate(ndimage.find_objects(labels), start=1):
        first = np.flatnonzero((labels == index).ravel())[0]
        key = (first // SHAPE[1] // TILE, first % SHAPE[1] // TILE)
        small = max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) <= MAX_SIZE
        assert (first in results[key].anchors) == small
        window = grid.window(*key, MAX_SIZE)
        if small:
            assert window.y0 <= sl[0].start and sl[0].stop <= window.y1
            assert window.x0 <= sl[1].start and sl[1].stop <= window.x1
    offsets = assign_offsets({key: res.num_objects for key, res in results.items()})
    assert offsets[0, 0] == 1
    keys = sorted(offsets)
    for a, b in zip(keys, keys[1:]):
        assert offsets[b] == offsets[a] + results[a].num_objects


@pytest.mark.parametrize("seed", range(6))
def test_irregular_shapes_stream_exactly(seed: int) -> None:
    """Smoothed noise: non-convex blobs, snakes, holes, many cut by tile borders."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(90, 110)), 2.5)
    mask = (noise > np.quantile(noise, 0.6)).astype(np.uint8)
    tile, max_size = [(16, 12), (24, 24), (32, 16)][seed % 3]
    reference, _ = whole_image_instances(mask, max_size, 3, tile_size=tile)
    instances, table = stream_instances(mask, tile, max_size, 3)
    np.testing.assert_array_equal(instances, reference)
    raster, too_large = whole_image_instances(mask, max_size, 3)
    assert_bijection(instances, raster)
    # Per-tile too_large counts never miss a too-large component (they may count a
    # non-convex one in more than one tile: see tile_objects).
    grid = TileGrid(*mask.shape, tile)
    counted = 0
    for r, c in grid.tiles():
        window = grid.window(r, c, max_size)
        counted += tile_objects(mask[window.slices()], window, grid.tile(r, c), mask.shape, max_size, 3).too_large
    assert counted >= too_large > 0
    assert table["id"].size == reference.max()


def test_table_matches_regionprops_of_the_whole_image(tiled, streamed) -> None:
    reference = tiled
    _, table = streamed
    props = regionprops(reference)
    assert [p.label for p in props] == list(table["id"])
    expected = {
        "area_px": [p.area for p in props],
        "centroid_y": [p.centroid[0] for p in props],
        "centroid_x": [p.centroid[1] for p in props],
        "bbox_y0": [p.bbox[0] for p in props],
        "bbox_x0": [p.bbox[1] for p in props],
        "bbox_y1": [p.bbox[2] for p in props],
        "bbox_x1": [p.bbox[3] for p in props],
        "perimeter_px": [p.perimeter for p in props],
        "eccentricity": [p.eccentricity for p in props],
    }
    for name, values in expected.items():
        np.testing.assert_allclose(table[name], values, rtol=1e-9, atol=1e-9, err_msg=name)
    assert np.isnan(table["mean_probability"]).all()
    assert "area_um2" not in table


def test_table_in_level0_pixels_and_micrometres(mask, streamed) -> None:
    _, base = streamed
    _, table = stream_instances(mask, TILE, MAX_SIZE, MIN_DISTANCE, step=(2.0, 2.0), mpp=(0.25, 0.25))
    np.testing.assert_array_equal(table["id"], base["id"])
    np.testing.assert_allclose(table["area_px"], base["area_px"] * 4)
    for name in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1", "perimeter_px"):
        np.testing.assert_allclose(table[name], base[name] * 2, err_msg=name)
    for name in ("centroid_y", "centroid_x"):  # mask pixel i is level-0 pixels 2i, 2i + 1: centre 2i + 0.5
        np.testing.assert_allclose(table[name], base[name] * 2 + 0.5, err_msg=name)
    np.testing.assert_allclose(table["eccentricity"], base["eccentricity"])
    np.testing.assert_allclose(table["centroid_y_um"], (base["centroid_y"] * 2 + 0.5) * 0.25)
    np.testing.assert_allclose(table["centroid_x_um"], (base["centroid_x"] * 2 + 0.5) * 0.25)
    np.testing.assert_allclose(table["area_um2"], base["area_px"] * 4 * 0.0625)


def test_mean_probability(mask, tiled) -> None:
    reference = tiled
    probability = np.random.default_rng(1).random(SHAPE, dtype=np.float32)
    _, table = stream_instances(mask, TILE, MAX_SIZE, MIN_DISTANCE, probability=probability)
    ids = np.arange(1, reference.max() + 1)
    np.testing.assert_allclose(table["mean_probability"], ndimage.mean(probability, reference, ids), rtol=1e-9)


def test_polygons_are_the_objects_in_level0(mask) -> None:
    grid = TileGrid(*SHAPE, TILE)
    window, tile = grid.window(1, 2, MAX_SIZE), grid.tile(1, 2)
    result = tile_objects(mask[window.slices()], window, tile, SHAPE, MAX_SIZE, MIN_DISTANCE, step=(2.0, 2.0))
    assert len(result.polygons) == result.num_objects > 0
    for i, polygon in enumerate(result.polygons):
        assert polygon.area == pytest.approx(result.table["area_px"][i])
        bounds = [result.table[name][i] for name in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")]
        np.testing.assert_allclose(polygon.bounds, bounds)


def test_split_component_depends_on_the_component_only() -> None:
    component = disc((40, 40), 15, 12, 7) | disc((40, 40), 15, 21.8, 7)
    labels = split_component(component, MIN_DISTANCE)
    assert labels.dtype == np.int32 and labels.max() == 2
    np.testing.assert_array_equal(labels > 0, component)
    assert labels[15, 10] == 1 and labels[15, 24] == 2  # markers numbered by (row, col)
    moved = np.pad(component, ((5, 2), (9, 0)))  # shifted, with a different margin
    np.testing.assert_array_equal(split_component(moved, MIN_DISTANCE), np.pad(labels, ((5, 2), (9, 0))))
    assert split_component(np.zeros((4, 4), bool), MIN_DISTANCE).max() == 0


def test_max_size_above_tile_size_is_refused(mask) -> None:
    with pytest.raises(ValueError):
        stream_instances(mask, 32, 48, MIN_DISTANCE)
    grid = TileGrid(*SHAPE, 32)
    window = grid.window(1, 1, 48)
    with pytest.raises(ValueError):
        tile_instances(mask[window.slices()], window, grid.tile(1, 1), SHAPE, 48, MIN_DISTANCE, {}, grid)


def test_window_too_small_is_refused(mask) -> None:
    grid = TileGrid(*SHAPE, TILE)
    window = grid.window(1, 1, MAX_SIZE - 1)
    with pytest.raises(ValueError):
        tile_objects(mask[window.slices()], window, grid.tile(1, 1), SHAPE, MAX_SIZE, MIN_DISTANCE)


def test_background_only() -> None:
    empty = np.zeros((100, 70), np.uint8)
    instances, table = stream_instances(empty, 32, 16, 3, probability=np.zeros((100, 70), np.float32), mpp=(0.5, 0.5))
    assert instances.dtype == np.uint32 and instances.shape == (100, 70) and not instances.any()
    assert table["id"].size == 0 and table["id"].dtype == np.uint32
    assert all(column.size == 0 for column in table.values()) and "area_um2" in table
    reference, too_large = whole_image_instances(empty, 16, 3)
    assert not reference.any() and too_large == 0
    assert tile_objects(empty, Box(0, 100, 0, 70), Box(0, 32, 0, 32), (100, 70), 16, 3).num_objects == 0


def test_objects_under_the_minimum_area_are_dropped_and_streaming_stays_exact(mask) -> None:
    component = disc((40, 40), 15, 12, 7) | disc((40, 40), 15, 21.8, 7)
    labels = split_component(component, MIN_DISTANCE)
    areas = np.bincount(labels.ravel())[1:]
    kept = split_component(component, MIN_DISTANCE, min_area=int(areas.min()) + 1)
    assert kept.max() == 1 and (kept > 0).sum() == areas.max()  # the smaller half is gone, the other is 1
    assert split_component(component, MIN_DISTANCE, min_area=int(component.sum()) + 1).max() == 0
    # Over a whole image, tile by tile: the same objects as at once, none smaller than the minimum.
    reference, _ = whole_image_instances(mask, MAX_SIZE, MIN_DISTANCE, tile_size=TILE, min_area=100)
    instances, table = stream_instances(mask, TILE, MAX_SIZE, MIN_DISTANCE, min_area=100)
    np.testing.assert_array_equal(instances, reference)
    sizes = np.bincount(instances.ravel())[1:]
    assert sizes.min() >= 100 and len(table["id"]) == sizes.size
    assert sizes.size < np.unique(whole_image_instances(mask, MAX_SIZE, MIN_DISTANCE)[0]).size - 1
