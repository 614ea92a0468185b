"""Geometry of the tile grid: tiles, halo windows, blend weights, resampling.

Coordinates are full-resolution pixels, ``(y, x)``, half-open boxes. A map
at another resolution (Model 1's output, its features) is described by its
*scale*: full-resolution pixels per map pixel along each axis, with pixel
``i`` of the map covering ``[i * scale, (i + 1) * scale)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from wsiseg.errors import InputError

if TYPE_CHECKING:  # the grid geometry is used by the Dask driver, which never imports torch
    import torch


class Box(NamedTuple):
    """Half-open pixel box ``[y0, y1) x [x0, x1)``."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)``."""
        return self.y1 - self.y0, self.x1 - self.x0

    def relative_to(self, outer: Box) -> Box:
        """This box in the coordinates of ``outer``'s top-left corner."""
        return Box(self.y0 - outer.y0, self.y1 - outer.y0, self.x0 - outer.x0, self.x1 - outer.x0)

    def slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices for indexing an array."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


@dataclass(frozen=True)
class TileGrid:
    """A ``tile_size`` grid over a ``height x width`` image; edge tiles are smaller.

    Parameters
    ----------
    height, width : int
        Image size in pixels.
    tile_size : int
        Side of a full tile in pixels.
    """

    height: int
    width: int
    tile_size: int

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise InputError(f"image size must be positive, got {self.height} x {self.width}")
        if self.tile_size < 1:
            raise InputError(f"tile size must be positive, got {self.tile_size}")

    @property
    def shape(self) -> tuple[int, int]:
        """Number of tiles ``(rows, cols)``."""
        return math.ceil(self.height / self.tile_size), math.ceil(self.width / self.tile_size)

    @property
    def num_tiles(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def edges(self, axis: int) -> np.ndarray:
        """Tile boundaries along ``axis`` (0 = y, 1 = x): ``[0, T, 2T, ..., size]``, int64."""
        size = self.height if axis == 0 else self.width
        return np.minimum(np.arange(self.shape[axis] + 1, dtype=np.int64) * self.tile_size, size)

    def tile(self, row: int, col: int) -> Box:
        """The box of tile ``(row, col)``."""
        t = self.tile_size
        return Box(row * t, min((row + 1) * t, self.height), col * t, min((col + 1) * t, self.width))

    def window(self, row: int, col: int, halo: int) -> Box:
        """Tile ``(row, col)`` grown by ``halo`` on every side, clipped to the image.

        Clipping (rather than padding) means a window at the image border sees
        exactly the border the whole image has, so tiled inference can equal
        whole-image inference.
        """
        b = self.tile(row, col)
        return Box(
            max(b.y0 - halo, 0), min(b.y1 + halo, self.height),
            max(b.x0 - halo, 0), min(b.x1 + halo, self.width),
        )

    def tiles(self) -> Iterator[tuple[int, int]]:
        """All ``(row, col)`` indices, row-major."""
        rows, cols = self.shape
        for row in range(rows):
            for col in range(cols):
                yield row, col


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple


def blend_weights(refined: np.ndarray, row: int, col: int, tile: Box, width: int) -> np.ndarray:
    """Weight of Model 2 in tile ``(row, col)`` when composing with Model 1.

    Inside a refined tile the weight ramps linearly from near 0 at a border
    shared with an unrefined tile (one of its 8 neighbours) to 1 at
    ``width`` pixels from it: ``w = min(1, (d - 0.5) / width)`` with ``d``
    the chessboard distance, in pixels, to the nearest unrefined neighbour.
    Borders with the image edge or with refined tiles do not ramp. An
    unrefined tile's weight is 0 everywhere.

    Parameters
    ----------
    refined : np.ndarray
        ``(rows, cols)`` bool map of refined tiles.
    row, col : int
        The tile.
    tile : Box
        Its box (for the size).
    width : int
        Ramp width in pixels; 0 disables blending.

    Returns
    -------
    np.ndarray
        ``(tile height, tile width)`` float32 in ``[0, 1]``.
    """
    height, wide = tile.shape
    if not refined[row, col]:
        return np.zeros((height, wide), np.float32)
    if width <= 0:
        return np.ones((height, wide), np.float32)
    rows, cols = refined.shape
    # Distance (in pixels, >= 1) from each row / column to the tile's four sides.
    to_top = np.arange(1, height + 1, dtype=np.float32)[:, None]
    to_bottom = to_top[::-1]
    to_left = np.arange(1, wide + 1, dtype=np.float32)[None, :]
    to_right = to_left[:, ::-1]
    vertical = {-1: to_top, 0: None, 1: to_bottom}
    horizontal = {-1: to_left, 0: None, 1: to_right}
    distance = np.full((height, wide), np.inf, np.float32)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            r, c = row + dy, col + dx
            if (dy, dx) == (0, 0) or not (0 <= r < rows and 0 <= c < cols) or refined[r, c]:
                continue
            parts = [p for p in (vertical[dy], horizontal[dx]) if p is not None]
            d = parts[0] if len(parts) == 1 else np.maximum(parts[0], parts[1])
            distance = np.minimum(distance, d)
    return np.clip((distance - 0.5) / width, 0.0, 1.0).astype(np.float32)


def neighbourhood(refined: np.ndarray, row: int, col: int) -> np.ndarray:
    """3 x 3 refined flags around ``(row, col)``; outside the grid counts as refined.

    Counting the image border as refined means it never ramps, so
    ``blend_weights(neighbourhood(refined, r, c), 1, 1, ...)`` equals
    ``blend_weights(refined, r, c, ...)``.
    """
    rows, cols = refined.shape
    out = np.ones((3, 3), bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            r, c = row + dy, col + dx
            if 0 <= r < rows and 0 <= c < cols:
                out[dy + 1, dx + 1] = refined[r, c]
    return out


def linear_resample(
    values: torch.Tensor, rows: torch.Tensor | np.ndarray, cols: torch.Tensor | np.ndarray
) -> torch.Tensor:
    """Sample a map bilinearly at given row and column positions.

    Positions are in pixel-centre coordinates of ``values`` (pixel ``i`` has
    its centre at ``i``) and are clamped to the map, which matches
    ``F.interpolate(..., mode="bilinear", align_corners=False)`` and
    ``grid_sample(padding_mode="border")``.

    Parameters
    ----------
    values : torch.Tensor
        ``(..., H, W)``.
    rows, cols : 1-D arrays
        ``(h,)`` and ``(w,)`` float positions.

    Returns
    -------
    torch.Tensor
        ``(..., h, w)``.
    """
    import torch

    # Columns first: gathering along the last axis is the slow, strided pass, so it
    # runs on the smaller map; the row pass then copies whole contiguous rows.
    out = _resample_axis(values, torch.as_tensor(cols, dtype=torch.float64), axis=-1)
    return _resample_axis(out, torch.as_tensor(rows, dtype=torch.float64), axis=-2)


def _resample_axis(values: torch.Tensor, positions: torch.Tensor, axis: int) -> torch.Tensor:
    size = values.shape[axis]
    positions = positions.clamp(0, size - 1)
    lower = positions.floor().long().clamp(max=size - 1)
    upper = (lower + 1).clamp(max=size - 1)
    frac = (positions - lower).to(values.dtype).to(values.device)
    lower, upper = lower.to(values.device), upper.to(values.device)
    shape = [1] * values.ndim
    shape[axis] = -1
    frac = frac.view(shape)
    return values.index_select(axis, lower) * (1 - frac) + values.index_select(axis, upper) * frac


def pixel_centres(start: int, count: int, step: float, scale: float) -> np.ndarray:
    """Centres of ``count`` pixels of size ``step`` from full-res ``start``, in map coordinates.

    The result indexes a map whose pixels are ``scale`` full-resolution pixels
    wide, in the pixel-centre convention of :func:`linear_resample`.
    """
    centres = start + (np.arange(count, dtype=np.float64) + 0.5) * step
    return centres / scale - 0.5


def scaled_size(size: int, factor: float) -> int:
    """Pixels of a ``size``-pixel axis downsampled by ``factor``: ``ceil(size / factor)`` (exact for whole factors)."""
    if float(factor).is_integer():
        return -(-int(size) // int(factor))
    return max(1, math.ceil(size / factor - 1e-9))


def area_weights(start: int, stop: int, factor: float, size: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Weights of area downsampling by a non-integer ``factor`` along one axis, as a band.

    Output pixel ``i`` is the mean of the input over ``[i * factor, (i + 1) * factor)``
    (clipped to the ``size`` input pixels), each input pixel weighted by how much
    of it the interval covers. The weights of a pixel depend only on ``i``, so
    windows read apart agree with one read of the whole image. An interval
    covers at most ``ceil(factor) + 1`` input pixels, so the weights are kept
    as that many ``(index, weight)`` pairs per output pixel, not as a dense matrix.

    Returns
    -------
    first : int
        The first input pixel used (indices below are relative to it).
    indices : np.ndarray
        ``(stop - start, k)`` int64, input pixels ``first + indices[i]`` that output ``i`` averages.
    weights : np.ndarray
        ``(stop - start, k)`` float32, each row summing to 1 (0 where a slot is unused).
    """
    low = np.arange(start, stop, dtype=np.float64) * factor
    high = np.minimum(low + factor, size)
    first = int(np.floor(low[0]))
    span = int(np.ceil(factor)) + 1
    pixels = np.floor(low)[:, None].astype(np.int64) + np.arange(span)[None, :]
    overlap = np.minimum(high[:, None], pixels + 1.0) - np.maximum(low[:, None], pixels.astype(np.float64))
    overlap = np.clip(overlap, 0.0, None)
    overlap[pixels >= size] = 0.0
    weights = overlap / overlap.sum(axis=1, keepdims=True)
    return first, np.minimum(pixels, size - 1) - first, weights.astype(np.float32)


def downsample_mean(image: np.ndarray, ratio: int) -> np.ndarray:
    """Block-mean downsampling by an integer factor.

    Parameters
    ----------
    image : np.ndarray
        ``(H, W, 3)`` uint8.
    ratio : int

    Returns
    -------
    np.ndarray
        ``(ceil(H / ratio), ceil(W / ratio), 3)`` uint8; output pixel ``(i, j)``
        is the rounded mean of input ``[i*r, (i+1)*r) x [j*r, (j+1)*r)``
        (partial blocks at the far edges average the pixels they have).
        Whole blocks are summed by adding strided slices (rows, then
        columns) into a small integer type: a reduction over two strided axes
        of a 5-D view is about ten times slower (``benchmarks/RESULTS.md``,
        "Paying less per tile").
    """
    if ratio == 1:
        return image
    height, width, channels = image.shape
    out_h, out_w = -(-height // ratio), -(-width // ratio)
    full_h, full_w = height // ratio, width // ratio
    out = np.empty((out_h, out_w, channels), np.uint8)
    if full_h and full_w:
        out[:full_h, :full_w] = _rounded_mean(_block_sums(image[: full_h * ratio, : full_w * ratio], ratio), ratio * ratio)
    # Partial blocks along the bottom and right edges.
    for i in range(out_h):
        for j in range(out_w) if i >= full_h else range(full_w, out_w):
            block = image[i * ratio : (i + 1) * ratio, j * ratio : (j + 1) * ratio].reshape(-1, channels)
            out[i, j] = _rounded_mean(block.sum(axis=0, dtype=np.uint32), block.shape[0])
    return out


def _block_sums(image: np.ndarray, ratio: int) -> np.ndarray:
    """``(H / r, W / r, C)`` sums of the ``r x r`` blocks of ``image`` (``H``, ``W`` multiples of ``r``),
    uint16 while ``r * r * 255`` fits, else uint32."""
    height, width, channels = image.shape
    dtype = np.uint16 if ratio * ratio * 255 < np.iinfo(np.uint16).max - ratio * ratio else np.uint32
    rows = image[0::ratio].astype(dtype)
    for k in range(1, ratio):
        rows += image[k::ratio]
    columns = rows.reshape(height // ratio, width // ratio, ratio, channels)
    sums = columns[:, :, 0].copy()
    for k in range(1, ratio):
        sums += columns[:, :, k]
    return sums


def _rounded_mean(sums: np.ndarray, count: int) -> np.ndarray:
    """``sums / count`` rounded half to even (as ``np.rint``), in integer arithmetic."""
    quotient, remainder = np.divmod(sums, count)
    up = (2 * remainder > count) | ((2 * remainder == count) & (quotient % 2 == 1))
    return (quotient + up).astype(np.uint8)


def sample_plan(
    start: tuple[int, int],
    count: tuple[int, int],
    step: float,
    scale: tuple[float, float],
    map_shape: tuple[int, int],
) -> tuple[Box, np.ndarray, np.ndarray]:
    """Where bilinear samples of a low-resolution map fall, and the crop holding every tap.

    The samples are taken at the centres of ``count`` pixels of side ``step``
    (full-resolution pixels) starting at ``start``; the map's pixels are
    ``scale`` full-resolution pixels wide.

    Returns
    -------
    crop : Box
        The map pixels the samples read.
    rows, cols : np.ndarray
        ``(count[0],)`` and ``(count[1],)`` float64 positions relative to ``crop``.
    """
    rows = np.clip(pixel_centres(start[0], count[0], step, scale[0]), 0, map_shape[0] - 1)
    cols = np.clip(pixel_centres(start[1], count[1], step, scale[1]), 0, map_shape[1] - 1)
    crop = Box(
        int(np.floor(rows.min())), min(int(np.floor(rows.max())) + 2, map_shape[0]),
        int(np.floor(cols.min())), min(int(np.floor(cols.max())) + 2, map_shape[1]),
    )
    return crop, rows - crop.y0, cols - crop.x0



def stage1_crop(tile: Box, scale: tuple[float, float], low_shape: tuple[int, int]) -> Box:
    """The low-resolution box :func:`upsample_stage1` reads for ``tile``."""
    return sample_plan((tile.y0, tile.x0), tile.shape, 1.0, scale, low_shape)[0]

