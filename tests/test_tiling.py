"""Tile grid geometry, blend weights and the bilinear resampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsiseg.tiling import Box, TileGrid, blend_weights, linear_resample, pixel_centres


def test_grid_covers_image_with_partial_edge_tiles() -> None:
    grid = TileGrid(100, 130, 48)
    assert grid.shape == (3, 3)
    np.testing.assert_array_equal(grid.edges(0), [0, 48, 96, 100])
    np.testing.assert_array_equal(grid.edges(1), [0, 48, 96, 130])
    assert grid.tile(2, 2) == Box(96, 100, 96, 130)
    covered = np.zeros((100, 130), int)
    for row, col in grid.tiles():
        covered[grid.tile(row, col).slices()] += 1
    assert (covered == 1).all()


def test_windows_grow_by_halo_and_clip_to_image() -> None:
    grid = TileGrid(100, 130, 48)
    assert grid.window(0, 0, 8) == Box(0, 56, 0, 56)
    assert grid.window(1, 1, 8) == Box(40, 104 - 4, 40, 104)
    assert grid.window(2, 2, 8) == Box(88, 100, 88, 130)
    assert grid.tile(1, 1).relative_to(grid.window(1, 1, 8)) == Box(8, 56, 8, 56)


def test_blend_weights_ramp_only_towards_unrefined_neighbours() -> None:
    refined = np.array([[True, False], [True, True]])
    tile = Box(0, 10, 0, 10)
    width = 4
    w = blend_weights(refined, 0, 0, tile, width)  # right neighbour unrefined
    np.testing.assert_allclose(w[:, -1], 0.5 / width)  # pixel next to the border
    np.testing.assert_allclose(w[:, -4], 3.5 / width)
    np.testing.assert_array_equal(w[:, :6], 1.0)
    assert w.dtype == np.float32
    # Tile (1, 1): its top neighbour (0, 1) is unrefined, so its first row ramps.
    w11 = blend_weights(refined, 1, 1, tile, width)
    np.testing.assert_allclose(w11[0, :], 0.5 / width)
    np.testing.assert_array_equal(w11[4:, :], 1.0)
    # Tile (1, 0): diagonal neighbour (0, 1) unrefined -> corner ramp by chessboard distance.
    w10 = blend_weights(refined, 1, 0, tile, width)
    assert w10[0, -1] == np.float32(0.5 / width)
    assert w10[1, -2] == np.float32(1.5 / width)
    assert w10[0, 0] == 1.0 and w10[-1, -1] == 1.0
    np.testing.assert_array_equal(blend_weights(refined, 0, 1, tile, width), 0.0)
    np.testing.assert_array_equal(blend_weights(refined, 0, 0, tile, 0), 1.0)
    all_refined = np.ones((3, 3), bool)
    np.testing.assert_array_equal(blend_weights(all_refined, 1, 1, tile, width), 1.0)


def test_linear_resample_matches_bilinear_interpolate() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 7, 9)
    scale = 4
    out_h, out_w = 7 * scale, 9 * scale
    reference = F.interpolate(x[None], size=(out_h, out_w), mode="bilinear", align_corners=False)[0]
    rows = pixel_centres(0, out_h, 1.0, scale)
    cols = pixel_centres(0, out_w, 1.0, scale)
    torch.testing.assert_close(linear_resample(x, rows, cols), reference, atol=1e-6, rtol=1e-6)
    # A window of the upsampled map equals the same window resampled directly.
    window = linear_resample(x, pixel_centres(5, 10, 1.0, scale), pixel_centres(17, 12, 1.0, scale))
    torch.testing.assert_close(window, reference[:, 5:15, 17:29], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("ratio", [2, 3, 4, 5, 17])
def test_block_means_equal_the_rounded_float_mean_of_each_block(ratio: int) -> None:
    """downsample_mean against a float reference: whole blocks (summed in uint16, or uint32 from a ratio of
    16 on) and the partial blocks of the far edges, rounded half to even."""
    from wsiseg.tiling import downsample_mean

    rng = np.random.default_rng(ratio)
    image = rng.integers(0, 256, (3 * ratio + 2, 4 * ratio + 1, 3)).astype(np.uint8)
    image[:ratio, :ratio] = 255  # a block at the top of the range
    out = downsample_mean(image, ratio)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    for i in range(4):
        for j in range(5):
            block = image[i * ratio : (i + 1) * ratio, j * ratio : (j + 1) * ratio].reshape(-1, 3)
            np.testing.assert_array_equal(out[i, j], np.rint(block.mean(axis=0, dtype=np.float64)))
