"""Tissue detection on a slide's thumbnail (pure numpy / scikit-image).

Bright-field slides (glass is bright): the signal is the optical density
summed over the three channels (glass ~0, stained tissue above ~0.3).
Dark-field and fluorescence images (the background is dark): the signal is
the grey intensity. Which one applies is decided from the thumbnail's median
grey. Tissue is where the signal exceeds Otsu's threshold, capped (so that an
image that is all tissue, where Otsu would split tissue in two, keeps all of
it) and floored (so that an image that is all glass keeps none); then holes
and (bright-field only) specks smaller than ``min_area`` are removed and the
mask is grown by ``margin`` pixels, so that nuclei on the tissue's border are
kept. On a dark background the signal is the nuclei themselves, a few
thumbnail pixels each at Model 1's downsample, so no speck is dropped
(``tests/test_tissue.py``).

:func:`tile_tissue` gives each tile of the working grid the fraction of it
that is tissue, from the mask's pixels under it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from wsiseg.tiling import TileGrid

#: Longest side of the thumbnail tissue is detected on (pixels).
TISSUE_MAX_SIDE = 2048
#: Median grey (0-1) below which an image counts as dark-field / fluorescence.
DARK_BACKGROUND = 0.25
#: Optical density (sum over RGB, base 10) thresholds for bright-field: Otsu's, clipped to this range.
BRIGHTFIELD_THRESHOLD = (0.08, 0.3)
#: Grey-intensity thresholds for dark backgrounds: Otsu's, clipped to this range.
DARKFIELD_THRESHOLD = (0.02, 0.1)


@dataclass(frozen=True)
class TissueResult:
    """A detected tissue mask and how it was found.

    Attributes
    ----------
    mask : np.ndarray
        ``(h, w)`` bool, True on tissue.
    background : str
        ``"bright"`` (bright-field: glass is bright) or ``"dark"`` (fluorescence, dark-field).
    threshold : float
        The signal threshold used (optical density or grey, see the module).
    """

    mask: np.ndarray
    background: str
    threshold: float

    @property
    def fraction(self) -> float:
        """Fraction of the thumbnail that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def summary(self) -> dict[str, Any]:
        return {"fraction": round(self.fraction, 4), "background": self.background,
                "threshold": round(self.threshold, 4), "shape": list(self.mask.shape)}


def has_dark_background(rgb: np.ndarray) -> bool:
    """Whether an ``(h, w, 3)`` uint8 image is dark-field / fluorescence: median grey below :data:`DARK_BACKGROUND`."""
    return float(np.median(rgb.astype(np.float32).mean(axis=-1))) / 255.0 < DARK_BACKGROUND


def detect_tissue(rgb: np.ndarray, min_area: int = 64, margin: int = 2) -> TissueResult:
    """Tissue mask of a thumbnail.

    Parameters
    ----------
    rgb : np.ndarray
        ``(h, w, 3)`` uint8 thumbnail.
    min_area : int
        Holes and specks smaller than this many thumbnail pixels are removed.
    margin : int
        The mask is dilated by this many pixels.

    Returns
    -------
    TissueResult
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    pixels = rgb.astype(np.float32) / 255.0
    grey = pixels.mean(axis=-1)
    if has_dark_background(rgb):
        background, signal, (low, high) = "dark", grey, DARKFIELD_THRESHOLD
    else:
        background, (low, high) = "bright", BRIGHTFIELD_THRESHOLD
        signal = -np.log10(np.clip(pixels, 1.0 / 255.0, 1.0)).sum(axis=-1)
    otsu = float(threshold_otsu(signal)) if signal.size and np.ptp(signal) > 0 else high
    threshold = min(max(otsu, low), high)
    mask = signal > threshold
    if min_area > 1:
        if background == "bright":  # specks of dust; on a dark background the signal is the nuclei themselves,
            mask = _drop_small(mask, min_area)  # a few thumbnail pixels each at Model 1's downsample: all kept
        mask = ~_drop_small(~mask, min_area)  # holes
    if margin > 0:
        disk = np.hypot(*np.mgrid[-margin : margin + 1, -margin : margin + 1]) <= margin
        mask = ndimage.binary_dilation(mask, structure=disk)
    return TissueResult(mask, background, threshold)


def _drop_small(mask: np.ndarray, min_area: int) -> np.ndarray:
    """``mask`` without its 8-connected components smaller than ``min_area`` pixels."""
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_area
    keep[0] = False
    return keep[labels]


def tile_tissue(tissue: np.ndarray, grid: TileGrid, step: tuple[float, float]) -> np.ndarray:
    """Fraction of each tile that is tissue.

    Parameters
    ----------
    tissue : np.ndarray
        ``(th, tw)`` bool or 0/1 mask.
    grid : TileGrid
        Tiles in working pixels.
    step : (sy, sx)
        Working pixels per tissue pixel. Working pixel ``y`` lies on tissue
        row ``floor((y + 0.5) / sy)`` (clipped), as in :func:`sample_tissue`.

    Returns
    -------
    np.ndarray
        ``(rows, cols)`` float64 in ``[0, 1]``: exactly the mean of
        :func:`sample_tissue` over each tile.
    """
    rows = _coverage(grid.edges(0), step[0], tissue.shape[0])
    cols = _coverage(grid.edges(1), step[1], tissue.shape[1])
    sizes = np.outer(np.diff(grid.edges(0)), np.diff(grid.edges(1)))
    return rows @ tissue.astype(np.float64) @ cols.T / sizes


def _coverage(edges: np.ndarray, step: float, size: int) -> np.ndarray:
    """``(tiles, size)``: how many working pixels of each tile fall on each tissue row (or column)."""
    tissue_index = _tissue_index(0, int(edges[-1]), step, size)
    tile_index = np.repeat(np.arange(len(edges) - 1), np.diff(edges))
    counts = np.zeros((len(edges) - 1, size))
    np.add.at(counts, (tile_index, tissue_index), 1.0)
    return counts


def _tissue_index(start: int, stop: int, step: float, size: int) -> np.ndarray:
    """Tissue row (or column) of working pixels ``start .. stop``: ``floor((y + 0.5) / step)``, clipped."""
    return np.clip(np.floor((np.arange(start, stop) + 0.5) / step).astype(np.int64), 0, size - 1)


def sample_tissue(tissue: Any, y0: int, y1: int, x0: int, x1: int, step: tuple[float, float]) -> np.ndarray:
    """The tissue mask over working pixels ``[y0, y1) x [x0, x1)``, nearest-sampled.

    Parameters
    ----------
    tissue : array-like
        The ``(th, tw)`` tissue mask (a zarr array: only the rows and columns needed are read).
    step : (sy, sx)
        Working pixels per tissue pixel.

    Returns
    -------
    np.ndarray
        ``(y1 - y0, x1 - x0)`` bool.
    """
    rows = _tissue_index(y0, y1, step[0], tissue.shape[0])
    cols = _tissue_index(x0, x1, step[1], tissue.shape[1])
    block = np.asarray(tissue[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    return block[np.ix_(rows - rows[0], cols - cols[0])].astype(bool)
