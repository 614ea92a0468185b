"""Open any supported image as a lazy pyramid of RGB uint8 levels.

:func:`open_slide` inspects a file once and returns a :class:`Slide`: a small,
picklable description (path, backend, level sizes and downsamples, pixel
size). Pixels are read with :meth:`Slide.read_region` or as dask arrays with
:meth:`Slide.to_dask`; both go through a reader (:mod:`wsiseg.readers`) that every process opens once
per file and caches, so a ``Slide`` can travel to Dask workers by value while
file handles never do.

Backends
--------
``tifffile``
    TIFF, BigTIFF, OME-TIFF and Aperio SVS. Tiled levels are read by
    decoding only the raw tiles a region touches (the fastest path measured
    on these machines); other layouts through tifffile's zarr store.
``openslide``
    The other whole-slide formats OpenSlide reads (NDPI, MRXS, SCN, BIF,
    Philips TIFF, Ventana, DICOM WSI, ...).
``zarr``
    OME-Zarr (NGFF 0.4 and 0.5) multiscale images.
``image``
    Ordinary PNG, JPEG, BMP (and other Pillow-readable) files, held in
    memory once per process.

Every level reads as ``(h, w, 3)`` uint8 RGB: grey is repeated, alpha is
composited over white, and 16-bit or float data is scaled to 8 bits with
one intensity range estimated from a small level (or from sampled regions).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.errors import InputError
from wsiseg.readers import (
    MAX_PLAIN_IMAGE_PIXELS,
    lease_reader,
    load_plain_image,
    ngff_multiscale,
    open_reader,
    tifffile_quiet,
)
from wsiseg.readers import clear_readers, to_rgb8  # noqa: F401 - part of this module's public surface
from wsiseg.tiling import Box

BACKENDS = ("auto", "tifffile", "openslide", "zarr", "image")

#: OpenSlide vendors whose TIFF files tifffile reads as a plain pyramid.
_TIFFFILE_VENDORS = {None, "generic-tiff", "aperio"}



@dataclass(frozen=True)
class Level:
    """One pyramid level.

    Attributes
    ----------
    shape : (height, width)
    downsample : (sy, sx)
        Level-0 pixels per pixel of this level along y and x.
    tile_shape : (th, tw) or None
        The file's own tile size at this level, when it is tiled.
    """

    shape: tuple[int, int]
    downsample: tuple[float, float]
    tile_shape: tuple[int, int] | None = None


@dataclass(frozen=True)
class Slide:
    """A picklable description of an opened image; pixels come through readers.

    Attributes
    ----------
    path : str
        Absolute path.
    backend : str
        ``tifffile``, ``openslide``, ``zarr`` or ``image``.
    format : str
        What the file is, e.g. ``"aperio"``, ``"generic-tiff"``, ``"ome-tiff"``,
        ``"ome-zarr"``, ``"png"``.
    levels : tuple[Level, ...]
        Level 0 is full resolution; downsamples increase.
    mpp : (y, x) or None
        Micrometres per level-0 pixel, when the file says.
    intensity_range : (low, high) or None
        Linear mapping of non-8-bit data to 0..255.
    properties : dict
        A few format properties for ``wsiseg info``.
    warnings : tuple[str, ...]
        One line per fallback taken when opening, e.g. reduced levels dropped
        because the file is truncated; empty for a sound file.
    """

    path: str
    backend: str
    format: str
    levels: tuple[Level, ...]
    mpp: tuple[float, float] | None = None
    intensity_range: tuple[float, float] | None = None
    properties: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 ``(height, width)``."""
        return self.levels[0].shape

    def read_region(self, level: int, box: Box) -> np.ndarray:
        """Pixels of ``box`` (in ``level``'s own coordinates) as ``(h, w, 3)`` uint8.

        Only the file tiles the box touches are decoded.
        """
        height, width = self.levels[level].shape
        if not (0 <= box.y0 < box.y1 <= height and 0 <= box.x0 < box.x1 <= width):
            raise InputError(f"region {tuple(box)} is outside level {level} of size {height} x {width}")
        try:
            reader = lease_reader(self.backend, self.path)
            try:
                raw = reader.read(level, box)
            finally:
                reader.unlease()
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - a decoder failing mid-file means bad data
            raise InputError(
                f"{self.path}: cannot decode level {level} region {tuple(box)} "
                f"({type(exc).__name__}); the file is truncated or corrupt"
            ) from exc
        return to_rgb8(raw, self.intensity_range)

    def to_dask(self, level: int = 0, chunk: int = 1024) -> Any:
        """Level ``level`` as a lazy ``(h, w, 3)`` uint8 dask array of ``chunk``-sized blocks.

        Each block is read in its task by path, so the array works with the
        distributed scheduler too.
        """
        import dask.array as da

        height, width = self.levels[level].shape
        chunks = (_chunk_sizes(height, chunk), _chunk_sizes(width, chunk), (3,))

        def read_block(block_info: dict | None = None) -> np.ndarray:
            (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
            return self.read_region(level, Box(y0, y1, x0, x1))

        return da.map_blocks(read_block, chunks=chunks, dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8))

    def pyramid(self, chunk: int = 1024) -> list[tuple[Any, tuple[float, float]]]:
        """Every level as ``(dask array, (sy, sx) downsample)``."""
        return [(self.to_dask(i, chunk), lvl.downsample) for i, lvl in enumerate(self.levels)]

    def best_level_for(self, downsample: float) -> tuple[int, int]:
        """Level and integer coarsening factor that give ``downsample``.

        Picks the level with the largest downsample ``d`` such that
        ``downsample / d`` is within 1 % of a whole number ``k >= 1``; level 0
        (``k = round(downsample)``) always qualifies.

        Returns
        -------
        (level, k)
        """
        for index in range(len(self.levels) - 1, -1, -1):
            d = float(np.mean(self.levels[index].downsample))
            k = round(downsample / d)
            if k >= 1 and abs(downsample / d - k) <= 0.01 * k:
                return index, k
        return 0, max(1, round(downsample))


def _chunk_sizes(size: int, chunk: int) -> tuple[int, ...]:
    full, rest = divmod(size, chunk)
    return (chunk,) * full + ((rest,) if rest else ())


# --------------------------------------------------------------------------- opening


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PLAIN_MAGIC = {
    b"\x89PNG": "png",
    b"\xff\xd8\xff": "jpeg",
    b"BM": "bmp",
    b"GIF8": "gif",
}


def open_slide(path: str | os.PathLike[str], backend: str = "auto") -> Slide:
    """Inspect an image file and describe it as a :class:`Slide`.

    Parameters
    ----------
    path : path
        A whole-slide file, TIFF / OME-TIFF, OME-Zarr folder or ordinary image.
    backend : {"auto", "tifffile", "openslide", "zarr", "image"}
        ``auto`` chooses by content: tifffile for TIFF, Aperio SVS and
        OME-TIFF; OpenSlide for other slide vendors; zarr for an OME-Zarr
        folder; Pillow for ordinary images.

    Raises
    ------
    InputError
        One line saying what is wrong: missing, empty, a folder, truncated,
        or a format wsiseg cannot read.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise InputError(f"{name}: no such file")
    if p.is_dir():
        if backend in ("auto", "zarr") and _looks_like_zarr(p):
            return _guarded(name, lambda: _open_zarr(p))
        raise InputError(f"{name} is a folder, not an image (an OME-Zarr folder needs its multiscales metadata)")
    if p.stat().st_size == 0:
        raise InputError(f"{name} is empty (0 bytes)")
    with open(p, "rb") as handle:
        head = handle.read(8)
    if backend == "auto":
        if head[:4] in _TIFF_MAGIC:
            vendor = _openslide_vendor(p)
            backend = "tifffile" if vendor in _TIFFFILE_VENDORS else "openslide"
        elif any(head.startswith(m) for m in _PLAIN_MAGIC):
            backend = "image"
        elif _openslide_vendor(p) is not None:
            backend = "openslide"
        else:
            raise InputError(
                f"{name}: unsupported or unrecognised file format; give a whole-slide image, "
                "TIFF / OME-TIFF, OME-Zarr folder, PNG, JPEG or BMP"
            )
    opener = {"tifffile": _open_tiff, "openslide": _open_openslide, "zarr": _open_zarr, "image": _open_image}[backend]
    return _guarded(name, lambda: opener(p))


def _guarded(name: str, open_fn: Callable[[], Slide]) -> Slide:
    """Run an opener, turning any parser failure into one clear line."""
    try:
        slide = open_fn()
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - parsers raise many types on bad files
        detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise InputError(f"{name} cannot be read: it is truncated, corrupt or not a supported image ({detail})") from exc
    _check_readable(slide)
    return slide


def _check_readable(slide: Slide) -> None:
    """Decode one small region of the first and last levels so broken data fails now."""
    for level in {0, len(slide.levels) - 1}:
        height, width = slide.levels[level].shape
        for y, x in ((0, 0), (height - 1, width - 1)):
            box = Box(max(0, y - 7), y + 1, max(0, x - 7), x + 1) if (y, x) != (0, 0) else Box(0, min(8, height), 0, min(8, width))
            try:
                slide.read_region(level, box)
            except InputError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise InputError(
                    f"{slide.path} cannot be read: decoding level {level} failed "
                    f"({type(exc).__name__}); the file is truncated or corrupt"
                ) from exc


def _openslide_vendor(path: Path) -> str | None:
    try:
        import openslide

        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001 - detection failure means "not an OpenSlide file"
        return None


def _open_tiff(path: Path) -> Slide:
    import tifffile

    with tifffile_quiet(), tifffile.TiffFile(path) as tiff:
        if not tiff.series or not len(tiff.pages):
            raise InputError(f"{path} cannot be read: it is truncated or corrupt (no image data found)")
        usable, warning = _check_tile_offsets(tiff, path)
        series = tiff.series[0]
        axes = series.axes.lower()
        if "y" not in axes or "x" not in axes:
            raise InputError(f"{path}: image axes {series.axes!r} have no Y and X")
        levels = []
        base_h = base_w = None
        for lvl in series.levels[:usable]:
            shape = dict(zip(lvl.axes.lower(), lvl.shape))
            h, w = int(shape["y"]), int(shape["x"])
            if base_h is None:
                base_h, base_w = h, w
            page = lvl.keyframe
            tile = (int(page.tilelength), int(page.tilewidth)) if page.is_tiled else None
            levels.append(Level((h, w), (base_h / h, base_w / w), tile))
        dtype = series.dtype
        fmt = "ome-tiff" if tiff.is_ome else ("aperio" if tiff.is_svs else "tiff")
        properties = {"series": series.name or "0", "axes": series.axes, "dtype": str(dtype)}
        mpp = _tiff_mpp(tiff, path)
    warnings = (warning,) if warning else ()
    slide = Slide(str(path.resolve()), "tifffile", fmt, tuple(levels), mpp, None, properties, warnings)
    return _with_intensity_range(slide, dtype)



def _check_tile_offsets(tiff: Any, path: Path) -> tuple[int, str | None]:
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
    size = path.stat().st_size
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


def _tiff_mpp(tiff: Any, path: Path) -> tuple[float, float] | None:
    """Micrometres per pixel: OpenSlide's reading, OME metadata, SVS text, or resolution tags."""
    try:
        import openslide

        if openslide.OpenSlide.detect_format(str(path)):
            with openslide.OpenSlide(str(path)) as handle:
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


def _open_openslide(path: Path) -> Slide:
    import openslide

    with openslide.OpenSlide(str(path)) as handle:
        width0, height0 = handle.dimensions
        levels = []
        for index, (w, h) in enumerate(handle.level_dimensions):
            tw = handle.properties.get(f"openslide.level[{index}].tile-width")
            th = handle.properties.get(f"openslide.level[{index}].tile-height")
            tile = (int(th), int(tw)) if tw and th else None
            levels.append(Level((h, w), (height0 / h, width0 / w), tile))
        x = handle.properties.get(openslide.PROPERTY_NAME_MPP_X)
        y = handle.properties.get(openslide.PROPERTY_NAME_MPP_Y)
        mpp = (float(y), float(x)) if x and y else None
        vendor = handle.properties.get(openslide.PROPERTY_NAME_VENDOR, "openslide")
        keep = ("openslide.objective-power", "openslide.vendor", "openslide.comment")
        properties = {k: str(handle.properties[k])[:200] for k in keep if k in handle.properties}
    return Slide(str(path.resolve()), "openslide", vendor, tuple(levels), mpp, None, properties)


def _looks_like_zarr(path: Path) -> bool:
    return any((path / name).exists() for name in ("zarr.json", ".zattrs", ".zgroup"))


def _open_zarr(path: Path) -> Slide:
    import zarr

    group = zarr.open_group(str(path), mode="r")
    multiscale, version = ngff_multiscale(dict(group.attrs))
    axes_meta = multiscale["axes"]
    names = [a["name"] if isinstance(a, dict) else a for a in axes_meta]
    lowered = [n.lower() for n in names]
    if "y" not in lowered or "x" not in lowered:
        raise InputError(f"{path}: OME-Zarr axes {names} have no y and x")
    yi, xi = lowered.index("y"), lowered.index("x")
    levels = []
    base = None
    for dataset in multiscale["datasets"]:
        shape = group[dataset["path"]].shape
        h, w = int(shape[yi]), int(shape[xi])
        base = base or (h, w)
        chunks = group[dataset["path"]].chunks
        levels.append(Level((h, w), (base[0] / h, base[1] / w), (int(chunks[yi]), int(chunks[xi]))))
    mpp = None
    first = multiscale["datasets"][0].get("coordinateTransformations", [])
    scale = next((t["scale"] for t in first if t.get("type") == "scale"), None)
    if scale and isinstance(axes_meta[yi], dict):
        factor = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3}.get(axes_meta[yi].get("unit", ""))
        if factor:
            mpp = (float(scale[yi]) * factor, float(scale[xi]) * factor)
    dtype = group[multiscale["datasets"][0]["path"]].dtype
    slide = Slide(str(path.resolve()), "zarr", "ome-zarr", tuple(levels), mpp, None, {"ngff": version, "axes": "".join(names)})
    return _with_intensity_range(slide, np.dtype(dtype))



def _open_image(path: Path) -> Slide:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PLAIN_IMAGE_PIXELS
    with Image.open(path) as image:
        width, height = image.size
        fmt = (image.format or "image").lower()
        image.verify()
    if width * height > MAX_PLAIN_IMAGE_PIXELS:
        raise InputError(f"{path} has {width * height} pixels; convert it to a tiled pyramidal TIFF")
    array = load_plain_image(str(path))
    slide = Slide(str(path.resolve()), "image", fmt, (Level((height, width), (1.0, 1.0), None),), None, None, {})
    if array.dtype != np.uint8:
        slide = _with_range(slide, _robust_range(array))
    return slide


def _with_range(slide: Slide, intensity_range: tuple[float, float]) -> Slide:
    """``slide`` with ``intensity_range`` set (every other field, warnings included, kept)."""
    return replace(slide, intensity_range=intensity_range)


def _with_intensity_range(slide: Slide, dtype: np.dtype) -> Slide:
    """For non-uint8 data, estimate one intensity range from a small level or samples."""
    if dtype == np.uint8:
        return slide
    reader = open_reader(slide.backend, slide.path)
    try:
        smallest = len(slide.levels) - 1
        h, w = slide.levels[smallest].shape
        if h * w <= 4096 * 4096:
            samples = [reader.read(smallest, Box(0, h, 0, w))]
        else:
            samples = []
            for fy in (0.2, 0.4, 0.6, 0.8):
                for fx in (0.2, 0.4, 0.6, 0.8):
                    y, x = int(fy * (h - 256)), int(fx * (w - 256))
                    samples.append(reader.read(smallest, Box(y, y + 256, x, x + 256)))
    finally:
        close = getattr(reader, "close", None)
        if close:
            close()
    values = np.concatenate([s.reshape(-1, s.shape[-1] if s.ndim == 3 else 1) for s in samples])
    if values.shape[1] in (2, 4):
        values = values[:, :-1]
    return _with_range(slide, _robust_range(values))


def _robust_range(values: np.ndarray) -> tuple[float, float]:
    if values.ndim == 3 and values.shape[2] in (2, 4):
        values = values[..., :-1]
    low, high = np.percentile(values.astype(np.float64), [0.1, 99.9])
    if high <= low:
        high = low + 1.0
    return float(low), float(high)


def describe(slide: Slide) -> list[str]:
    """Lines for ``wsiseg info``: format, levels, sizes, pixel size."""
    lines = [
        f"file:      {slide.path}",
        f"format:    {slide.format} (read with {slide.backend})",
        f"size:      {slide.shape[1]} x {slide.shape[0]} pixels (width x height)",
        "mpp:       " + (f"{slide.mpp[1]:.4g} x {slide.mpp[0]:.4g} um/pixel" if slide.mpp else "unknown"),
        f"levels:    {len(slide.levels)}",
    ]
    for index, level in enumerate(slide.levels):
        tile = f", tiles {level.tile_shape[1]} x {level.tile_shape[0]}" if level.tile_shape else ""
        lines.append(
            f"  {index}: {level.shape[1]} x {level.shape[0]}, downsample {np.mean(level.downsample):.4g}{tile}"
        )
    if slide.intensity_range:
        lines.append(f"intensity: {slide.intensity_range[0]:.6g} .. {slide.intensity_range[1]:.6g} mapped to 0..255")
    for key, value in slide.properties.items():
        lines.append(f"{key}: {value}")
    lines.extend(f"warning:   {warning}" for warning in slide.warnings)
    return lines
