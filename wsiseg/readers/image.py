"""The ``image`` backend: ordinary PNG, JPEG, BMP (and other Pillow-readable) files.

The whole image is decoded once per process and held in memory, so images
larger than :data:`MAX_PLAIN_IMAGE_PIXELS` are refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from wsiseg.errors import InputError
from wsiseg.readers.base import FileInfo, Reader
from wsiseg.tiling import Box

#: Ordinary images larger than this are refused (they are held in memory).
MAX_PLAIN_IMAGE_PIXELS = 1 << 30

#: The first bytes of the ordinary image formats picked without asking (PNG, JPEG, BMP, GIF).
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"BM", b"GIF8")


class ImageReader(Reader):
    """Pillow: the whole image decoded once, as ``(h, w[, c])`` in its own dtype; this object holds it."""

    backend = "image"

    def __init__(self, path: str) -> None:
        with _open_image(path) as image:
            self._format = (image.format or "image").lower()
            if image.mode == "P":
                image = image.convert("RGBA")
            elif image.mode == "CMYK" or image.mode == "YCbCr":
                image = image.convert("RGB")
            array = np.asarray(image)
        if array.ndim == 3 and array.shape[2] not in (1, 2, 3, 4):
            raise InputError(f"{path}: images with {array.shape[2]} channels are not supported")
        self._array = array

    @classmethod
    def inspect(cls, path: str) -> FileInfo:
        """Check the file whole and its size before decoding it (see :meth:`Reader.inspect`).

        Raises
        ------
        InputError
            When the image has more than :data:`MAX_PLAIN_IMAGE_PIXELS` pixels.
        """
        with _open_image(path) as image:
            width, height = image.size
            image.verify()
        if width * height > MAX_PLAIN_IMAGE_PIXELS:
            raise InputError(f"{path} has {width * height} pixels; convert it to a tiled pyramidal TIFF")
        return super().inspect(path)

    def close(self) -> None:
        self._array = np.zeros((0, 0, 3), np.uint8)  # free the decoded image

    def file_info(self) -> FileInfo:
        """One level, no pixel size; the intensity range of the whole image when it is not uint8."""
        shapes = (self._array.shape[:2],)
        return FileInfo(self._format, shapes, (None,), None, self.intensity_range(self._array.dtype, shapes))

    def intensity_samples(self, level: int, shape: tuple[int, int]) -> list[np.ndarray]:
        """The whole decoded image, however large."""
        return [self._array]

    def read(self, level: int, box: Box) -> np.ndarray:
        return self._array[box.y0 : box.y1, box.x0 : box.x1]


def _open_image(path: str) -> Any:
    """``PIL.Image.open(path)`` with Pillow's size limit set to :data:`MAX_PLAIN_IMAGE_PIXELS`."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PLAIN_IMAGE_PIXELS
    return Image.open(path)
