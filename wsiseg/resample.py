"""Reading part of an image at a coarser scale: block means by a whole factor, area means otherwise.

Every task that reads pixels (stage 1's view, stage 2's windows, the tissue
thumbnail, the output's pixels) reads them through :func:`read_scaled`, so a
region read in parts equals the same region read whole.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from wsiseg.tiling import Box, area_weights, downsample_mean


def read_scaled(source: Any, level: int, coarsen: float, box: Box) -> np.ndarray:
    """Pixels of ``box`` in the coordinates of ``level`` coarsened by ``coarsen``.

    Coarsened reads go in strips, so that no large region of the finer level
    is ever held at once; strips start at multiples of ``coarsen``, so the
    result equals :func:`~wsiseg.tiling.downsample_mean` of the whole level.
    A non-integer ``coarsen`` (a 0.25 um/pixel slide for a 0.4 um/pixel
    model: 1.6) resamples by area (:func:`~wsiseg.tiling.area_weights`).

    Parameters
    ----------
    source : Slide or in-memory image
        Anything with ``levels`` and ``read_region(level, box)``.

    Returns
    -------
    np.ndarray
        ``(h, w, 3)`` uint8; block means of ``coarsen x coarsen`` level pixels.
    """
    if coarsen == 1:
        return source.read_region(level, box)
    height, width = source.levels[level].shape
    if not float(coarsen).is_integer():
        return _read_area(source, level, float(coarsen), box, (height, width))
    coarsen = int(coarsen)
    strip = max(1, 4096 // (coarsen * coarsen))
    pixels = np.empty((*box.shape, 3), np.uint8)
    for y in range(box.y0, box.y1, strip):
        y1 = min(y + strip, box.y1)
        region = Box(y * coarsen, min(y1 * coarsen, height), box.x0 * coarsen, min(box.x1 * coarsen, width))
        pixels[y - box.y0 : y1 - box.y0] = downsample_mean(source.read_region(level, region), coarsen)
    return pixels


def _read_area(source: Any, level: int, factor: float, box: Box, shape: tuple[int, int]) -> np.ndarray:
    """``(h, w, 3)`` uint8: ``box`` of ``level`` downsampled by the non-integer ``factor``, in strips.

    Each output pixel is a weighted sum of the few input pixels its footprint
    covers (:func:`~wsiseg.tiling.area_weights`), rows first, then columns.
    """
    strip = max(1, int(4096 // (factor * factor)))
    x_first, x_index, x_weights = area_weights(box.x0, box.x1, factor, shape[1])
    x_read = int(x_index.max()) + 1
    pixels = np.empty((*box.shape, 3), np.uint8)
    for y in range(box.y0, box.y1, strip):
        y1 = min(y + strip, box.y1)
        y_first, y_index, y_weights = area_weights(y, y1, factor, shape[0])
        region = Box(y_first, y_first + int(y_index.max()) + 1, x_first, x_first + x_read)
        values = source.read_region(level, region)
        rows = _band_sum(values, y_index, y_weights, axis=0)
        pixels[y - box.y0 : y1 - box.y0] = np.rint(_band_sum(rows, x_index, x_weights, axis=1)).clip(0, 255)
    return pixels


def _band_sum(values: np.ndarray, index: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """``out[i] = sum_k weights[i, k] * values[index[i, k]]`` along ``axis`` (0 or 1 of ``(h, w, 3)``), float32."""
    shape = [1, 1, 1]
    shape[axis] = -1
    total = None
    for k in range(index.shape[1]):
        part = np.take(values, index[:, k], axis=axis).astype(np.float32)
        part *= weights[:, k].reshape(shape)
        total = part if total is None else total + part
    return total
