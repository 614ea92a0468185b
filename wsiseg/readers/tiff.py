"""The ``tifffile`` backend: TIFF, BigTIFF, OME-TIFF and Aperio SVS.

Tiled levels are read by decoding only the raw tiles a region touches (the
fastest path measured on these machines); other layouts through tifffile's
zarr store. Opening checks that every level's pixel data lies inside the
file: a truncated copy keeps the levels it still has, with one warning.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from wsiseg.errors import InputError
from wsiseg.readers.base import FileInfo, Reader, take_yx
from wsiseg.tiling import Box

#: The first bytes of a TIFF (little- and big-endian) and a BigTIFF file.
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

#: OpenSlide vendors whose files are plain TIFF pyramids that :class:`TiffReader` reads level by level.
TIFF_PYRAMID_VENDORS = ("generic-tiff", "aperio")


class TiffReader(Reader):
    """tifffile: raw tiles decoded directly for single-page tiled levels, zarr otherwise.

    Owns a :class:`tifffile.TiffFile` and a raw descriptor of the same file
    (for ``os.pread`` of single tiles); both close in :meth:`close`.
    """

    backend = "tifffile"

    def __init__(self, path: str, series_index: int = 0) -> None:
        import tifffile

        self._path = path
        with tifffile_quiet():  # what tifffile logs about a damaged file is reported by file_info
            self._tiff = tifffile.TiffFile(path)
            try:
                if not self._tiff.series or not len(self._tiff.pages):
                    raise InputError(f"{path} cannot be read: it is truncated or corrupt (no image data found)")
                self._series = self._tiff.series[series_index]
                self._levels = list(self._series.levels)
            except BaseException:
                self._tiff.close()
                raise
        self._fd = os.open(path, os.O_RDONLY)
        self._zarr: dict[int, Any] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        os.close(self._fd)
        self._tiff.close()

    def file_info(self) -> FileInfo:
        """Format, the levels whose pixel data is all in the file, pixel size, intensity range.

        Raises
        ------
        InputError
            When level 0 is truncated or the image has no Y and X axes.
        """
        path, tiff, series = self._path, self._tiff, self._series
        with tifffile_quiet():
            usable, warning = _check_tile_offsets(tiff, path)
            if "y" not in series.axes.lower() or "x" not in series.axes.lower():
                raise InputError(f"{path}: image axes {series.axes!r} have no Y and X")
            shapes = tuple(self.level_shapes()[:usable])
            tiles = []
            for level in self._levels[:usable]:
                page = level.keyframe
                tiles.append((int(page.tilelength), int(page.tilewidth)) if page.is_tiled else None)
            fmt = "ome-tiff" if tiff.is_ome else ("aperio" if tiff.is_svs else "tiff")
            properties = {"series": series.name or "0", "axes": series.axes, "dtype": str(series.dtype)}
            mpp = _tiff_mpp(tiff, path)
        return FileInfo(
            fmt, shapes, tuple(tiles), mpp, self.intensity_range(series.dtype, shapes), properties,
            (warning,) if warning else (),
        )

    def level_shapes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of every level."""
        shapes = []
        for series in self._levels:
            sizes = dict(zip(series.axes.lower(), series.shape))
            shapes.append((int(sizes["y"]), int(sizes["x"])))
        return shapes

    def decodes(self, level: int) -> bool:
        """Whether a pixel of ``level`` decodes (tifffile may lack the file's codec)."""
        try:
            self.read(level, Box(0, 1, 0, 1))
        except Exception:  # noqa: BLE001 - codecs raise many types
            return False
        return True

    def _fast_page(self, level: int) -> Any | None:
        """The level's page when its tiles can be decoded directly, else None."""
        series = self._levels[level]
        page = series.keyframe
        if len(series.pages) != 1 or not page.is_tiled or page.planarconfig != 1:
            return None
        if page.imagedepth != 1 or page.tiledepth != 1:
            return None
        return page

    def read(self, level: int, box: Box) -> np.ndarray:
        page = self._fast_page(level)
        if page is None:
            return self._read_zarr(level, box)
        tile_h, tile_w = page.tilelength, page.tilewidth
        samples = page.samplesperpixel
        out = np.zeros((box.y1 - box.y0, box.x1 - box.x0, samples), page.dtype)
        tiles_across = -(-page.imagewidth // tile_w)
        for ty in range(box.y0 // tile_h, -(-box.y1 // tile_h)):
            for tx in range(box.x0 // tile_w, -(-box.x1 // tile_w)):
                index = ty * tiles_across + tx
                tile = self._decode(page, index).reshape(tile_h, tile_w, samples)
                y0, x0 = ty * tile_h, tx * tile_w
                ys = slice(max(box.y0, y0), min(box.y1, y0 + tile_h))
                xs = slice(max(box.x0, x0), min(box.x1, x0 + tile_w))
                out[ys.start - box.y0 : ys.stop - box.y0, xs.start - box.x0 : xs.stop - box.x0] = tile[
                    ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0
                ]
        return out

    def _decode(self, page: Any, index: int) -> np.ndarray:
        """Decode one raw tile of ``page`` (tests wrap this to count decodes)."""
        count = page.databytecounts[index]
        if count == 0:  # a tile the writer left out: fill as background
            shape = (page.tilelength, page.tilewidth, page.samplesperpixel)
            return np.full(shape, np.iinfo(page.dtype).max if page.dtype.kind == "u" else 0, page.dtype)
        data = os.pread(self._fd, count, page.dataoffsets[index])
        segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        return segment

    def _read_zarr(self, level: int, box: Box) -> np.ndarray:
        import zarr

        with self._lock:
            if level not in self._zarr:
                self._zarr[level] = zarr.open(self._series.aszarr(level=level), mode="r")
        array = self._zarr[level]
        return take_yx(array, self._series.axes, box)


# --------------------------------------------------------------------------- tifffile's logger


class _ThreadQuietFilter(logging.Filter):
    """Drops the records of threads inside :func:`tifffile_quiet` (other threads log as usual)."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "depth", 0)


_TIFFFILE_QUIET = _ThreadQuietFilter()


@contextmanager
def tifffile_quiet() -> Iterator[None]:
    """Silence tifffile's logger in this thread: what it reports about a damaged
    file (e.g. "invalid page offset") reaches the user as :attr:`Slide.warnings`
    or an :class:`InputError` instead."""
    logger = logging.getLogger("tifffile")
    if _TIFFFILE_QUIET not in logger.filters:
        logger.addFilter(_TIFFFILE_QUIET)
    local = _TIFFFILE_QUIET.local
    local.depth = getattr(local, "depth", 0) + 1
    try:
        yield
    finally:
        local.depth -= 1


# --------------------------------------------------------------------------- truncated files


def _check_tile_offsets(tiff: Any, path: str) -> tuple[int, str | None]:
    """How many levels of a TIFF's first series have all their pixel data in the file.

    A truncated copy loses its last bytes, and so its last levels. Level 0
    with a tile that cannot be located (past the end of the file, or at
    offset 0) is refused. A reduced level with one is dropped together with
    every level after it (so the kept levels keep the file's level numbers),
    and so are the pages lost when the chain of pages (IFDs) itself is cut.

    Returns
    -------
    (usable, warning)
        The number of leading levels to use, and a one-line warning naming
        what was dropped (None when nothing was).

    Raises
    ------
    InputError
        When level 0 itself is truncated.
    """
    size = os.stat(path).st_size
    levels = tiff.series[0].levels
    for index, level in enumerate(levels):
        problem = _level_data_problem(level, size)
        if problem is None:
            continue
        if index == 0:
            raise InputError(f"{path} is truncated: {problem}; copy it again")
        return index, f"level {index} of {path} is truncated ({problem}); {_using_levels(index)}"
    if _page_chain_is_cut(tiff):
        last = len(levels) - 1
        return len(levels), (
            f"{path} is truncated after level {last} (the pages that follow are missing); {_using_levels(len(levels))}"
        )
    return len(levels), None


def _level_data_problem(level: Any, size: int) -> str | None:
    """Why some tile (or strip) of a tifffile level cannot be located in ``size`` bytes, or None."""
    for page in level.pages:
        if page is None:
            continue
        offsets = np.asarray(page.dataoffsets, np.int64)
        counts = np.asarray(page.databytecounts, np.int64)
        if len(offsets) == 0 or len(offsets) != len(counts):
            return "a page lists no pixel data"
        present = counts > 0  # a count of 0 is a tile the writer left out (read as background)
        if (offsets[present] <= 0).any():
            return "a tile has no offset"
        end = int((offsets + counts).max())
        if end > size:
            return f"its pixel data ends at byte {end} but the file has {size} bytes"
    return None


def _page_chain_is_cut(tiff: Any) -> bool:
    """True when the last page tifffile found points to a next page it could not read."""
    position = tiff.pages.next_page_offset
    if position is None:  # pages listed up front (SubIFDs): no chain to follow
        return False
    handle = tiff.filehandle
    handle.seek(position)
    raw = handle.read(tiff.tiff.offsetsize)
    if len(raw) < tiff.tiff.offsetsize:
        return True
    return int.from_bytes(raw, "little" if tiff.byteorder == "<" else "big") != 0


def _using_levels(count: int) -> str:
    """``"using level 0 only"`` / ``"using levels 0-{count - 1} only"``."""
    return "using level 0 only" if count == 1 else f"using levels 0-{count - 1} only"


# --------------------------------------------------------------------------- pixel size


def _tiff_mpp(tiff: Any, path: str) -> tuple[float, float] | None:
    """Micrometres per pixel ``(y, x)``: OpenSlide's reading, OME metadata, SVS text, or resolution tags."""
    try:
        import openslide

        if openslide.OpenSlide.detect_format(path):
            with openslide.OpenSlide(path) as handle:
                x = handle.properties.get(openslide.PROPERTY_NAME_MPP_X)
                y = handle.properties.get(openslide.PROPERTY_NAME_MPP_Y)
                if x and y and float(x) > 0 and float(y) > 0:
                    return float(y), float(x)
    except Exception:  # noqa: BLE001 - fall back to tifffile's metadata
        pass
    if tiff.is_ome and tiff.ome_metadata:
        found = {}
        for axis in ("X", "Y"):
            m = re.search(rf'PhysicalSize{axis}="([0-9.eE+-]+)"', tiff.ome_metadata)
            unit = re.search(rf'PhysicalSize{axis}Unit="([^"]+)"', tiff.ome_metadata)
            if m:
                factor = {"nm": 1e-3, "mm": 1e3, "cm": 1e4}.get(unit.group(1) if unit else "µm", 1.0)
                found[axis] = float(m.group(1)) * factor
        if "X" in found and "Y" in found:
            return found["Y"], found["X"]
    page = tiff.pages[0]
    if tiff.is_svs:
        m = re.search(r"MPP\s*=\s*([0-9.]+)", page.description or "")
        if m:
            return float(m.group(1)), float(m.group(1))
    tags = page.tags
    if "XResolution" in tags and "YResolution" in tags and "ResolutionUnit" in tags:
        unit = int(tags["ResolutionUnit"].value)
        per_unit = {2: 25400.0, 3: 10000.0}.get(unit)

        def ratio(tag: Any) -> float:
            v = tag.value
            return v[0] / v[1] if isinstance(v, tuple) and v[1] else float(v)

        xres, yres = ratio(tags["XResolution"]), ratio(tags["YResolution"])
        # Inch resolutions under 2000 dpi are screen or print defaults, not microscopy.
        if per_unit and xres > 0 and yres > 0 and (unit == 3 or xres >= 2000):
            return per_unit / yres, per_unit / xres
    return None
