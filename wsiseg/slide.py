"""Open any supported image as a lazy pyramid of RGB uint8 levels.

:func:`open_slide` picks a reader (:mod:`wsiseg.readers`, one module per
backend), has it inspect the file once, and returns a :class:`Slide`: a small,
picklable description (path, backend, level sizes and downsamples, pixel
size). Pixels are read with :meth:`Slide.read_region` or as dask arrays with
:meth:`Slide.to_dask`; both go through a reader that every process opens once
per file and caches, so a ``Slide`` can travel to Dask workers by value while
file handles never do.

Backends (``auto`` chooses by content)
--------------------------------------
``tifffile``
    TIFF, BigTIFF, OME-TIFF and Aperio SVS, and the TIFF files of other
    OpenSlide vendors in :data:`~wsiseg.readers.tiff.TIFF_PYRAMID_VENDORS`.
``openslide``
    The other whole-slide formats OpenSlide reads.
``zarr``
    OME-Zarr (NGFF 0.4 and 0.5) multiscale images.
``image``
    Ordinary PNG, JPEG, BMP (and other Pillow-readable) files.

Every level reads as ``(h, w, 3)`` uint8 RGB (:func:`to_rgb8`): grey is
repeated, alpha is composited over white, and 16-bit or float data is scaled
to 8 bits with one intensity range estimated from a small level (or from
sampled regions).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.errors import InputError
from wsiseg.readers import READER_CLASSES, lease_reader
from wsiseg.readers.image import IMAGE_MAGIC
from wsiseg.readers.openslide import openslide_vendor
from wsiseg.readers.tiff import TIFF_MAGIC, TIFF_PYRAMID_VENDORS
from wsiseg.readers.zarr import looks_like_zarr
from wsiseg.tiling import Box

#: The ``--backend`` choices: ``auto`` and every reader's backend.
BACKENDS = ("auto", *READER_CLASSES)


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


def _chunk_sizes(size: int, chunk: int) -> tuple[int, ...]:
    full, rest = divmod(size, chunk)
    return (chunk,) * full + ((rest,) if rest else ())


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


# --------------------------------------------------------------------------- opening


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
        if backend in ("auto", "zarr") and looks_like_zarr(p):
            return _guarded(name, lambda: _inspect(p, "zarr"))
        raise InputError(f"{name} is a folder, not an image (an OME-Zarr folder needs its multiscales metadata)")
    if p.stat().st_size == 0:
        raise InputError(f"{name} is empty (0 bytes)")
    with open(p, "rb") as handle:
        head = handle.read(8)
    if backend == "auto":
        backend = _choose_backend(p, name, head)
    return _guarded(name, lambda: _inspect(p, backend))


def _choose_backend(path: Path, name: str, head: bytes) -> str:
    """The backend for a file by its content: its first bytes ``head``, then OpenSlide's vendor detection."""
    if head[:4] in TIFF_MAGIC:
        vendor = openslide_vendor(path)
        return "tifffile" if vendor is None or vendor in TIFF_PYRAMID_VENDORS else "openslide"
    if head.startswith(IMAGE_MAGIC):
        return "image"
    if openslide_vendor(path) is not None:
        return "openslide"
    raise InputError(
        f"{name}: unsupported or unrecognised file format; give a whole-slide image, "
        "TIFF / OME-TIFF, OME-Zarr folder, PNG, JPEG or BMP"
    )


def _inspect(path: Path, backend: str) -> Slide:
    """The :class:`Slide` of ``path`` as its ``backend`` reader finds it."""
    info = READER_CLASSES[backend].inspect(str(path))
    base_h, base_w = info.level_shapes[0]
    levels = tuple(
        Level((h, w), (base_h / h, base_w / w), tile) for (h, w), tile in zip(info.level_shapes, info.tile_shapes)
    )
    return Slide(
        str(path.resolve()), backend, info.format, levels, info.mpp, info.intensity_range, info.properties,
        info.warnings,
    )


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
