"""What every reader shares: the lease protocol, what opening finds, the intensity range.

A :class:`Reader` opens one file in its constructor, owns the handle until
:meth:`Reader.close`, reads raw regions with :meth:`Reader.read`, and says
what the file is with :meth:`Reader.file_info`. One subclass per backend lives
in its own module of :mod:`wsiseg.readers`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from wsiseg.tiling import Box

#: A level of at most this many pixels gives the intensity range whole; a larger one, 16 samples.
WHOLE_LEVEL_SAMPLE_PIXELS = 4096 * 4096
#: Side of each sampled region on a larger level.
SAMPLE_SIDE = 256


@dataclass(frozen=True)
class FileInfo:
    """What a reader found in its file: a :class:`~wsiseg.slide.Slide` less its path and backend.

    Attributes
    ----------
    format : str
        What the file is, e.g. ``"aperio"``, ``"ome-tiff"``, ``"ome-zarr"``, ``"png"``.
    level_shapes : tuple[(height, width), ...]
        Every usable level, level 0 first.
    tile_shapes : tuple[(th, tw) or None, ...]
        The file's own tile size at each level (None where it is not tiled); as
        long as ``level_shapes``.
    mpp : (y, x) or None
        Micrometres per level-0 pixel, when the file says.
    intensity_range : (low, high) or None
        Linear mapping of non-8-bit data to 0..255 (None for uint8 data).
    properties : dict
        A few format properties for ``wsiseg info``.
    warnings : tuple[str, ...]
        One line per fallback taken when opening.
    """

    format: str
    level_shapes: tuple[tuple[int, int], ...]
    tile_shapes: tuple[tuple[int, int] | None, ...]
    mpp: tuple[float, float] | None = None
    intensity_range: tuple[float, float] | None = None
    properties: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


class Reader:
    """Opens one file and reads raw regions of it; the handle is this object's own.

    A cached reader leaving its cache is *retired*: it closes at once, or when
    the last read in flight (a *lease*) ends, so no thread reads a closed handle.

    Subclasses open the file in ``__init__(path)`` and set :attr:`backend`.
    """

    #: The backend name a :class:`~wsiseg.slide.Slide` records, e.g. ``"tifffile"``.
    backend: ClassVar[str]

    _leases: int = 0
    _retired: bool = False

    def __init__(self, path: str) -> None:
        raise NotImplementedError

    @classmethod
    def inspect(cls, path: str) -> FileInfo:
        """Open ``path`` once, uncached, say what it is, and close it again."""
        reader = cls(path)
        try:
            return reader.file_info()
        finally:
            reader.close()

    def file_info(self) -> FileInfo:
        """What the opened file is: format, usable levels, pixel size, intensity range."""
        raise NotImplementedError

    def read(self, level: int, box: Box) -> np.ndarray:
        """``(h, w[, c])`` raw pixels of ``box`` at ``level``, in the file's dtype."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the file handles (nothing to release by default)."""

    def intensity_range(
        self, dtype: np.dtype, level_shapes: tuple[tuple[int, int], ...]
    ) -> tuple[float, float] | None:
        """The ``(low, high)`` that maps non-uint8 data to 0..255, from the smallest level; None for uint8."""
        if dtype == np.uint8:
            return None
        return robust_range(self.intensity_samples(len(level_shapes) - 1, level_shapes[-1]))

    def intensity_samples(self, level: int, shape: tuple[int, int]) -> list[np.ndarray]:
        """Raw ``(h, w[, c])`` regions of ``level`` (of ``shape``) to estimate the intensity range from.

        The whole level when it is small, else 16 regions of
        :data:`SAMPLE_SIDE` pixels spread over it.
        """
        h, w = shape
        if h * w <= WHOLE_LEVEL_SAMPLE_PIXELS:
            return [self.read(level, Box(0, h, 0, w))]
        samples = []
        for fy in (0.2, 0.4, 0.6, 0.8):
            for fx in (0.2, 0.4, 0.6, 0.8):
                y, x = int(fy * (h - SAMPLE_SIDE)), int(fx * (w - SAMPLE_SIDE))
                samples.append(self.read(level, Box(y, y + SAMPLE_SIDE, x, x + SAMPLE_SIDE)))
        return samples

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


def robust_range(samples: list[np.ndarray]) -> tuple[float, float]:
    """The 0.1 and 99.9 percentiles of the colour values of ``(h, w[, c])`` samples (alpha left out)."""
    values = np.concatenate([s.reshape(-1, s.shape[-1] if s.ndim == 3 else 1) for s in samples])
    if values.shape[1] in (2, 4):
        values = values[:, :-1]
    low, high = np.percentile(values.astype(np.float64), [0.1, 99.9])
    if high <= low:
        high = low + 1.0
    return float(low), float(high)


def take_yx(array: Any, axes: str, box: Box) -> np.ndarray:
    """Index an n-d array with named ``axes`` down to ``(h, w[, c])`` over ``box``.

    ``y`` and ``x`` are cut to the box, ``c`` and ``s`` kept whole (and merged
    when both are present), any other axis (``t``, ``z``, ...) at its first plane.
    """
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
