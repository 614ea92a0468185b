"""overlay.png: refined tiles outlined where they lie on the slide, and a readable size."""

from __future__ import annotations

import numpy as np
from PIL import Image

from wsiseg.output import write_overlay
from wsiseg.plot import overlay_size

YELLOW = (255, 220, 0)


def _yellow(image: np.ndarray) -> np.ndarray:
    return np.all(image == YELLOW, axis=-1)


def test_tile_boxes_follow_the_tile_size_when_the_last_row_and_column_are_partial(tmp_path) -> None:
    """1000 x 600 working pixels in 256-pixel tiles: 3 x 4 tiles, the last row 88 and the last
    column 232 pixels. The 250 x 150 thumbnail is shown at 750 x 450 (0.75 overlay pixels per
    working pixel), so tile edges sit every 192 pixels, not every 750 / 4 = 187.5."""
    background = np.zeros((150, 250, 3), np.uint8)
    mask = np.zeros((600, 1000), np.uint8)
    refined = np.ones((3, 4), bool)
    refined[1, 2] = False
    path = write_overlay(tmp_path, background, mask, refined, tile_size=256, work_shape=(600, 1000))
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (450, 750, 3)
    yellow = _yellow(image)
    # A row through the first tile row and a column through the first tile column.
    assert np.flatnonzero(yellow[100]).tolist() == [0, 191, 192, 383, 384, 575, 576, 749]
    assert np.flatnonzero(yellow[:, 100]).tolist() == [0, 191, 192, 383, 384, 449]
    # Tile (1, 2) was not refined: inside its box only its neighbours' edges are yellow.
    assert np.flatnonzero(yellow[300, 385:575]).tolist() == []
    assert not yellow[193:383, 385:575].any()


def test_small_images_get_an_overlay_at_least_512_pixels_long(tmp_path) -> None:
    """A 500 x 300 image's 125 x 75 thumbnail is enlarged 5x (nearest neighbour)."""
    rng = np.random.default_rng(0)
    background = rng.integers(0, 256, (75, 125, 3), dtype=np.uint8)
    mask = np.zeros((300, 500), np.uint8)
    path = write_overlay(tmp_path, background, mask, None, tile_size=128, work_shape=(300, 500))
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (375, 625, 3)
    np.testing.assert_array_equal(image[::5, ::5], background)
    np.testing.assert_array_equal(image[4::5, 4::5], background)


def test_overlay_size_stays_between_512_and_1024() -> None:
    assert overlay_size((75, 125)) == (625, 375)
    assert overlay_size((300, 500)) == (1000, 600)
    assert overlay_size((600, 1000)) == (1000, 600)
    assert overlay_size((1000, 4000)) == (1024, 256)
    assert overlay_size((1, 1)) == (512, 512)
    assert all(512 <= max(overlay_size((h, w))) <= 1024 for h in (1, 7, 100, 333) for w in (3, 170, 257, 511, 900))
