"""The ``zarr`` backend: OME-Zarr multiscale images (NGFF 0.4 on zarr v2, 0.5 on zarr v3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.errors import InputError
from wsiseg.readers.base import FileInfo, Reader, take_yx
from wsiseg.tiling import Box

#: Files that make a folder a zarr group (v3, then v2).
ZARR_METADATA_FILES = ("zarr.json", ".zattrs", ".zgroup")

#: Micrometres per unit of the NGFF space units that give a pixel size.
_MICROMETRES_PER_UNIT = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3}


class ZarrReader(Reader):
    """OME-Zarr multiscale image; owns the opened group and its level arrays."""

    backend = "zarr"

    def __init__(self, path: str) -> None:
        import zarr

        self._path = path
        self._group = zarr.open_group(path, mode="r")
        self._multiscale, self._version = ngff_multiscale(dict(self._group.attrs))
        self._names = [a["name"] if isinstance(a, dict) else a for a in self._multiscale["axes"]]
        lowered = [name.lower() for name in self._names]
        if "y" not in lowered or "x" not in lowered:
            raise InputError(f"{path}: OME-Zarr axes {self._names} have no y and x")
        self._yx = lowered.index("y"), lowered.index("x")
        self._axes = "".join(self._names).lower()
        self._arrays = [self._group[d["path"]] for d in self._multiscale["datasets"]]

    def close(self) -> None:
        self._arrays = []
        self._group = None

    def file_info(self) -> FileInfo:
        """Levels and chunk sizes, pixel size from the first scale transform, intensity range."""
        yi, xi = self._yx
        shapes = tuple((int(a.shape[yi]), int(a.shape[xi])) for a in self._arrays)
        chunks = tuple((int(a.chunks[yi]), int(a.chunks[xi])) for a in self._arrays)
        mpp = None
        axes_meta = self._multiscale["axes"]
        first = self._multiscale["datasets"][0].get("coordinateTransformations", [])
        scale = next((t["scale"] for t in first if t.get("type") == "scale"), None)
        if scale and isinstance(axes_meta[yi], dict):
            factor = _MICROMETRES_PER_UNIT.get(axes_meta[yi].get("unit", ""))
            if factor:
                mpp = (float(scale[yi]) * factor, float(scale[xi]) * factor)
        intensity_range = self.intensity_range(np.dtype(self._arrays[0].dtype), shapes)
        properties = {"ngff": self._version, "axes": "".join(self._names)}
        return FileInfo("ome-zarr", shapes, chunks, mpp, intensity_range, properties)

    def read(self, level: int, box: Box) -> np.ndarray:
        return take_yx(self._arrays[level], self._axes, box)


def looks_like_zarr(path: Path) -> bool:
    """Whether the folder ``path`` holds zarr group metadata."""
    return any((path / name).exists() for name in ZARR_METADATA_FILES)


def ngff_multiscale(attrs: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The first multiscale of NGFF 0.4 (top-level) or 0.5 (under ``ome``) attributes, and its version."""
    if "ome" in attrs and "multiscales" in attrs["ome"]:
        return attrs["ome"]["multiscales"][0], str(attrs["ome"].get("version", "0.5"))
    if "multiscales" in attrs:
        ms = attrs["multiscales"][0]
        return ms, str(ms.get("version", "0.4"))
    raise InputError("the folder is a zarr group but has no OME-Zarr multiscales metadata")
