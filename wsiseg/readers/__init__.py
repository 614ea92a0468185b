"""Readers of image files, one module per backend, and this process's open ones.

Each backend is one :class:`~wsiseg.readers.base.Reader` class that opens a
file, owns its handle and reads raw regions of it:

- :mod:`wsiseg.readers.tiff` (``tifffile``): TIFF, BigTIFF, OME-TIFF, Aperio SVS;
- :mod:`wsiseg.readers.openslide` (``openslide``): the other whole-slide formats;
- :mod:`wsiseg.readers.zarr` (``zarr``): OME-Zarr multiscale images;
- :mod:`wsiseg.readers.image` (``image``): ordinary PNG, JPEG, BMP, ...

A :class:`~wsiseg.slide.Slide` is a picklable description; its pixels come
through a reader that each process opens once per file version and keeps in
a :class:`~wsiseg.cache.BoundedCache` (registered as ``readers``): at most
:data:`READERS_MAXSIZE` are open at a time, a reader leaving the cache is
closed once its reads in progress end, and a changed file gets a new reader
while the stale one is closed at once.
"""

from __future__ import annotations

import os

from wsiseg.cache import BoundedCache, register
from wsiseg.errors import InputError
from wsiseg.readers import image, openslide, tiff, zarr
from wsiseg.readers.base import Reader

#: The reader class of each backend name, in the order ``--backend`` lists them.
READER_CLASSES: dict[str, type[Reader]] = {
    cls.backend: cls for cls in (tiff.TiffReader, openslide.OpenSlideReader, zarr.ZarrReader, image.ImageReader)
}

#: Open readers of this process, keyed by (backend, path, mtime_ns, size, inode):
#: a rewritten file gets a new reader and its old one is closed.
READERS_MAXSIZE = 8
READERS: BoundedCache[tuple[str, str, int, int, int], Reader] = register(
    "readers", BoundedCache(READERS_MAXSIZE, on_evict=Reader.retire), path_of=lambda key: key[1]
)


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
        return READER_CLASSES[backend](path)

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
