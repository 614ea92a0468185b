"""Per-process readers of image files, held in a bounded cache.

A :class:`~wsiseg.slide.Slide` is a picklable description; its pixels come
through a :class:`Reader` that each process opens once per file version and
keeps in a :class:`~wsiseg.cache.BoundedCache` (registered as ``readers``):
at most :data:`READERS_MAXSIZE` are open at a time, a reader leaving the cache
is closed once its reads in progress end, and a changed file gets a new
reader while the stale one is closed at once. Raw regions become RGB uint8
with :func:`to_rgb8`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from wsiseg.cache import BoundedCache, register
from wsiseg.errors import InputError
from wsiseg.tiling import Box


#: Ordinary images larger than this are refused (they are held in memory).
MAX_PLAIN_IMAGE_PIXELS = 1 << 30


def to_rgb8(raw: np.ndarray, intensity_range: tuple[float, float] | None = None) -> np.ndarray:
    """Any ``(h, w)`` / ``(h, w, c)`` image as ``(h, w, 3)`` uint8 RGB.

    Parameters
    ----------
    raw : np.ndarray
        Grey (c absent or 1), grey + alpha (c = 2), RGB (3) or RGBA (4); any
        integer or float dtype.
    intensity_range : (low, high), optional
        Values mapped to 0 and 255 for non-uint8 data (default: the dtype's
        range for integers, [0, 1] for floats).
    """
    if raw.ndim == 2:
        raw = raw[..., None]
    channels = raw.shape[2]
    if channels not in (1, 2, 3, 4):
        raise InputError(f"images with {channels} channels are not supported; give grey, RGB or RGBA")
    if raw.dtype != np.uint8:
        if intensity_range is None:
            if np.issubdtype(raw.dtype, np.integer):
                info = np.iinfo(raw.dtype)
                intensity_range = (0.0, float(info.max))
            else:
                intensity_range = (0.0, 1.0)
        low, high = intensity_range
        scaled = (raw.astype(np.float32) - low) * (255.0 / max(high - low, 1e-12))
        raw = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    has_alpha = channels in (2, 4)
    colour = raw[..., : channels - 1] if has_alpha else raw
    if colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    if has_alpha:
        alpha = raw[..., -1:].astype(np.float32) / 255.0
        colour = np.rint(colour * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(colour)


# --------------------------------------------------------------------------- readers


class Reader:
    """Reads raw regions of one file; one instance per process and file version.

    A reader leaving the cache is *retired*: it closes at once, or when the
    last read in flight (a *lease*) ends, so no thread reads a closed handle.
    """

    _leases: int = 0
    _retired: bool = False

    def read(self, level: int, box: Box) -> np.ndarray:
        """``(h, w[, c])`` raw pixels of ``box`` at ``level``."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the file handles (nothing to release by default)."""

    def lease(self) -> bool:
        """Start a read; False when the reader is retired (get a new one)."""
        with _LEASE_LOCK:
            if self._retired:
                return False
            self._leases += 1
            return True

    def unlease(self) -> None:
        """End a read started by :meth:`lease`."""
        with _LEASE_LOCK:
            self._leases -= 1
            last = self._retired and self._leases == 0
        if last:
            self.close()

    def retire(self) -> None:
        """Close now, or after the reads in flight end; later leases are refused."""
        with _LEASE_LOCK:
            if self._retired:
                return
            self._retired = True
            idle = self._leases == 0
        if idle:
            self.close()


_LEASE_LOCK = threading.Lock()


class TiffReader(Reader):
    """tifffile: raw tiles decoded directly for single-page tiled levels, zarr otherwise."""

    def __init__(self, path: str, series_index: int = 0) -> None:
        import tifffile

        with tifffile_quiet():  # a truncated file was reported once, by open_slide
            self._tiff = tifffile.TiffFile(path)
            self._series = self._tiff.series[series_index]
            self._levels = list(self._series.levels)
        self._fd = os.open(path, os.O_RDONLY)
        self._zarr: dict[int, Any] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        os.close(self._fd)
        self._tiff.close()

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
        return _take_yx(array, self._series.axes, box)


#: OpenSlide vendors whose files are TIFF pyramids that :class:`TiffReader` reads level by level.
TIFF_PYRAMID_VENDORS = ("generic-tiff", "aperio")


class OpenSlideReader(Reader):
    """openslide-python; regions are RGBA, composited over white by :func:`to_rgb8`.

    OpenSlide takes a level-0 location and starts a level's region at
    ``location / downsample`` of that level's pixels, with its own downsample
    (the mean of the level's two size ratios, e.g. 1.9977 for 1001 x 767 over
    501 x 384). A start with a fraction is interpolated between neighbouring
    pixels, so a level whose downsample is not a whole number cannot be read at
    its own pixels away from its corner. Such levels of a generic TIFF or Aperio
    file are read from their tiles with :class:`TiffReader` (the pixels the
    ``tifffile`` backend gives); every other level through OpenSlide, at the
    location of the smallest fraction (none for a whole-number downsample).
    """

    def __init__(self, path: str) -> None:
        import openslide

        self._slide = openslide.OpenSlide(path)
        self._tiff, self._tiff_levels = _tiff_levels_of(self._slide, path)

    def close(self) -> None:
        self._slide.close()
        if self._tiff is not None:
            self._tiff.close()

    def read(self, level: int, box: Box) -> np.ndarray:
        if level in self._tiff_levels:
            return self._tiff.read(self._tiff_levels[level], box)
        d = self._slide.level_downsamples[level]
        location = (level0_start(box.x0, d), level0_start(box.y0, d))
        region = self._slide.read_region(location, level, (box.x1 - box.x0, box.y1 - box.y0))
        return np.asarray(region)


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


class ZarrReader(Reader):
    """OME-Zarr multiscale image (NGFF 0.4 on zarr v2, 0.5 on zarr v3)."""

    def __init__(self, path: str) -> None:
        import zarr

        group = zarr.open_group(path, mode="r")
        multiscale, _ = ngff_multiscale(dict(group.attrs))
        self._axes = "".join(a["name"] if isinstance(a, dict) else a for a in multiscale["axes"]).lower()
        self._arrays = [group[d["path"]] for d in multiscale["datasets"]]

    def close(self) -> None:
        self._arrays = []

    def read(self, level: int, box: Box) -> np.ndarray:
        return _take_yx(self._arrays[level], self._axes, box)


class ImageReader(Reader):
    """Pillow: the whole image decoded once per process."""

    def __init__(self, path: str) -> None:
        self._array = load_plain_image(path)

    def close(self) -> None:
        self._array = np.zeros((0, 0, 3), np.uint8)  # free the decoded image

    def read(self, level: int, box: Box) -> np.ndarray:
        return self._array[box.y0 : box.y1, box.x0 : box.x1]


def _take_yx(array: Any, axes: str, box: Box) -> np.ndarray:
    """Index an n-d array with named axes down to ``(h, w[, c])`` over ``box``."""
    axes = axes.lower()
    index: list[Any] = []
    for name in axes:
        if name == "y":
            index.append(slice(box.y0, box.y1))
        elif name == "x":
            index.append(slice(box.x0, box.x1))
        elif name in ("c", "s"):
            index.append(slice(None))
        else:  # t, z, q, ...: first plane
            index.append(0)
    data = np.asarray(array[tuple(index)])
    kept = [a for a in axes if a in "yxcs"]
    order = [kept.index("y"), kept.index("x")] + [i for i, a in enumerate(kept) if a in "cs"]
    data = data.transpose(order)
    if data.ndim == 4:  # both c and s: merge
        data = data.reshape(data.shape[0], data.shape[1], -1)
    return data


#: Open readers of this process, keyed by (backend, path, mtime_ns, size, inode):
#: a rewritten file gets a new reader and its old one is closed.
READERS_MAXSIZE = 8
READERS: BoundedCache[tuple[str, str, int, int, int], Reader] = register(
    "readers", BoundedCache(READERS_MAXSIZE, on_evict=Reader.retire), path_of=lambda key: key[1]
)
_FACTORIES: dict[str, Callable[[str], Reader]] = {
    "tifffile": TiffReader,
    "openslide": OpenSlideReader,
    "zarr": ZarrReader,
    "image": ImageReader,
}


def get_reader(backend: str, path: str) -> Reader:
    """This process's ``backend`` reader of the file at ``path`` (opened on first use, then cached).

    The reader may be retired by another thread at any time; read through
    :meth:`wsiseg.slide.Slide.read_region`, which leases it.
    """
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise InputError(f"cannot read {path!r}: {exc.strerror}") from exc
    key = (backend, path, stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def create() -> Reader:
        # Another version of the file is stale: close its reader now.
        READERS.discard(lambda k: k[:2] == key[:2] and k != key)
        return _FACTORIES[backend](path)

    return READERS.get_or_create(key, create)


def lease_reader(backend: str, path: str) -> Reader:
    """A reader of ``path`` leased for one read (end it with ``unlease``)."""
    while True:
        reader = get_reader(backend, path)
        if reader.lease():
            return reader  # else it was retired since the lookup: it has left the cache


def clear_readers() -> None:
    """Close and forget this process's cached readers."""
    READERS.clear()


# --------------------------------------------------------------------------- helpers


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


def load_plain_image(path: str) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PLAIN_IMAGE_PIXELS
    with Image.open(path) as image:
        if image.mode == "P":
            image = image.convert("RGBA")
        elif image.mode == "CMYK" or image.mode == "YCbCr":
            image = image.convert("RGB")
        array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] not in (1, 2, 3, 4):
        raise InputError(f"{path}: images with {array.shape[2]} channels are not supported")
    return array


def ngff_multiscale(attrs: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The first multiscale of NGFF 0.4 (top-level) or 0.5 (under ``ome``) attributes."""
    if "ome" in attrs and "multiscales" in attrs["ome"]:
        return attrs["ome"]["multiscales"][0], str(attrs["ome"].get("version", "0.5"))
    if "multiscales" in attrs:
        ms = attrs["multiscales"][0]
        return ms, str(ms.get("version", "0.4"))
    raise InputError("the folder is a zarr group but has no OME-Zarr multiscales metadata")


def open_reader(backend: str, path: str) -> Reader:
    """A new, uncached reader (for one-off reads while a file is being opened)."""
    return _FACTORIES[backend](path)
