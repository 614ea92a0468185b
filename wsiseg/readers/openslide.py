"""The ``openslide`` backend: the whole-slide formats OpenSlide reads.

NDPI, MRXS, SCN, BIF, Philips TIFF, Ventana, DICOM WSI, ... (and generic
TIFF or Aperio files when ``--backend openslide`` is asked for).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.readers.base import FileInfo, Reader
from wsiseg.readers.tiff import TIFF_PYRAMID_VENDORS, TiffReader
from wsiseg.tiling import Box

#: OpenSlide properties kept for ``wsiseg info``.
KEPT_PROPERTIES = ("openslide.objective-power", "openslide.vendor", "openslide.comment")


class OpenSlideReader(Reader):
    """openslide-python; regions are RGBA, composited over white by :func:`~wsiseg.slide.to_rgb8`.

    OpenSlide takes a level-0 location and starts a level's region at
    ``location / downsample`` of that level's pixels, with its own downsample
    (the mean of the level's two size ratios, e.g. 1.9977 for 1001 x 767 over
    501 x 384). A start with a fraction is interpolated between neighbouring
    pixels, so a level whose downsample is not a whole number cannot be read at
    its own pixels away from its corner. Such levels of a generic TIFF or Aperio
    file are read from their tiles with :class:`~wsiseg.readers.tiff.TiffReader`
    (the pixels the ``tifffile`` backend gives); every other level through
    OpenSlide, at the location of the smallest fraction (none for a
    whole-number downsample).
    """

    backend = "openslide"

    def __init__(self, path: str) -> None:
        import openslide

        self._slide = openslide.OpenSlide(path)
        self._tiff, self._tiff_levels = _tiff_levels_of(self._slide, path)

    def close(self) -> None:
        self._slide.close()
        if self._tiff is not None:
            self._tiff.close()

    def file_info(self) -> FileInfo:
        """Vendor, levels and tile sizes, pixel size and a few properties, as OpenSlide reports them."""
        import openslide

        handle = self._slide
        shapes, tiles = [], []
        for index, (w, h) in enumerate(handle.level_dimensions):
            tw = handle.properties.get(f"openslide.level[{index}].tile-width")
            th = handle.properties.get(f"openslide.level[{index}].tile-height")
            shapes.append((h, w))
            tiles.append((int(th), int(tw)) if tw and th else None)
        x = handle.properties.get(openslide.PROPERTY_NAME_MPP_X)
        y = handle.properties.get(openslide.PROPERTY_NAME_MPP_Y)
        mpp = (float(y), float(x)) if x and y else None
        vendor = handle.properties.get(openslide.PROPERTY_NAME_VENDOR, "openslide")
        properties = {k: str(handle.properties[k])[:200] for k in KEPT_PROPERTIES if k in handle.properties}
        return FileInfo(vendor, tuple(shapes), tuple(tiles), mpp, None, properties)

    def read(self, level: int, box: Box) -> np.ndarray:
        if level in self._tiff_levels:
            return self._tiff.read(self._tiff_levels[level], box)
        d = self._slide.level_downsamples[level]
        location = (level0_start(box.x0, d), level0_start(box.y0, d))
        region = self._slide.read_region(location, level, (box.x1 - box.x0, box.y1 - box.y0))
        return np.asarray(region)


def openslide_vendor(path: Path) -> str | None:
    """The vendor OpenSlide detects for ``path`` (e.g. ``"aperio"``), or None when it reads no such file."""
    try:
        import openslide

        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001 - detection failure means "not an OpenSlide file"
        return None


def level0_start(start: int, downsample: float) -> int:
    """The level-0 coordinate that OpenSlide maps to level pixel ``start`` with the smallest fraction.

    OpenSlide divides the location by ``downsample`` (in double precision, as
    Python does) and starts at the whole part: the least ``x`` with
    ``x / downsample >= start``. For a whole-number downsample ``n`` that is
    ``start * n``, with no fraction.
    """
    x = math.ceil(start * downsample)
    while x / downsample < start:
        x += 1
    while x > 0 and (x - 1) / downsample >= start:
        x -= 1
    return x


def _tiff_levels_of(handle: Any, path: str) -> tuple[TiffReader | None, dict[int, int]]:
    """A :class:`TiffReader` of ``path`` and, for each OpenSlide level it reads in its
    place, its own level of the same size: the levels of a generic TIFF or Aperio file
    whose OpenSlide downsample is not a whole number and that tifffile decodes.
    ``(None, {})`` where there are none.
    """
    inexact = [i for i, d in enumerate(handle.level_downsamples) if d != round(d)]
    if not inexact or handle.properties.get("openslide.vendor") not in TIFF_PYRAMID_VENDORS:
        return None, {}
    try:
        tiff = TiffReader(path)
    except Exception:  # noqa: BLE001 - tifffile cannot parse the file: OpenSlide reads every level
        return None, {}
    shapes = tiff.level_shapes()
    levels: dict[int, int] = {}
    for index in inexact:
        width, height = handle.level_dimensions[index]
        if (height, width) in shapes and tiff.decodes(shapes.index((height, width))):
            levels[index] = shapes.index((height, width))
    if not levels:
        tiff.close()
        return None, {}
    return tiff, levels
