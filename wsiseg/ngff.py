"""The layout of ``OUT.zarr`` and its OME-NGFF 0.4 metadata.

``OUT.zarr`` is one NGFF image (zarr v2, which napari-ome-zarr, QuPath,
Bio-Formats, OMERO and vizarr read): the slide's pixels at its root, the
label images that fit the labels spec under ``labels/``, Model 1's float
maps (not labels) as images of their own under ``maps/``::

    OUT.zarr/            the slide's RGB pixels (c, y, x) uint8, levels 0, 1, 2, ... (/2 each)
      labels/mask/       class per pixel (y, x) uint8, full resolution then /2 levels
      labels/refined/    1 where Model 2 refined the tile (rows, cols) uint8
      labels/objects/    nucleus instances (y, x) uint32 (with --objects)
      maps/probability/  Model 1's class probabilities (C, h, w) float32
      maps/uncertainty/  Model 1's per-pixel uncertainty (h, w) float32
      maps/tile_scores/  mean uncertainty per tile (rows, cols) float32

Every group's ``multiscales`` place it over the slide: scale = slide pixels
per array pixel (times the pixel size in micrometres when it is known; no
unit is claimed otherwise), translation = the offset of the array's first
pixel centre from the slide's first pixel centre, so all groups line up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wsiseg.guard import RECORD_DIR

NGFF_VERSION = "0.4"

#: The slide's pixels: arrays ``0, 1, ...`` at the root.
IMAGE = "0"
LABELS = "labels"
MASK_GROUP = f"{LABELS}/mask"
REFINED_GROUP = f"{LABELS}/refined"
OBJECTS_GROUP = f"{LABELS}/objects"
TISSUE_GROUP = f"{LABELS}/tissue"
MAPS = "maps"
PROBABILITY_GROUP = f"{MAPS}/probability"
UNCERTAINTY_GROUP = f"{MAPS}/uncertainty"
TILE_SCORES_GROUP = f"{MAPS}/tile_scores"
#: Level-0 arrays of those groups (the maps a run writes tile by tile).
MASK, REFINED, OBJECTS, TISSUE = f"{MASK_GROUP}/0", f"{REFINED_GROUP}/0", f"{OBJECTS_GROUP}/0", f"{TISSUE_GROUP}/0"
PROBABILITY, UNCERTAINTY, TILE_SCORES = f"{PROBABILITY_GROUP}/0", f"{UNCERTAINTY_GROUP}/0", f"{TILE_SCORES_GROUP}/0"
#: Model 1's features projected for Model 2: scratch, deleted when a slide run completes.
CONTEXT = f"{RECORD_DIR}/context"
#: The composed probabilities ``(C, H, W)``: kept only when asked for (images in memory), never in ``OUT.zarr``.
COMPOSED = "composed"

#: Label colours (RGBA) for napari / QuPath: class 1, 2, ... (0 is transparent).
LABEL_COLOURS = [
    (0, 200, 80, 255), (230, 60, 60, 255), (50, 110, 230, 255), (240, 200, 30, 255),
    (170, 60, 200, 255), (30, 200, 200, 255), (240, 130, 30, 255), (120, 120, 120, 255),
]
TRANSPARENT = (0, 0, 0, 0)
RGB_CHANNELS = (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))


def label_colour(value: int) -> tuple[int, int, int, int]:
    """RGBA of label ``value`` (0: transparent)."""
    return TRANSPARENT if value == 0 else LABEL_COLOURS[(value - 1) % len(LABEL_COLOURS)]


def multiscales(
    name: str,
    axes: Sequence[str],
    levels: int,
    step: tuple[float, float],
    mpp: tuple[float, float] | None,
    kind: str,
) -> dict[str, Any]:
    """One NGFF 0.4 ``multiscales`` entry.

    Parameters
    ----------
    axes : sequence of str
        ``("y", "x")`` or ``("c", "y", "x")``.
    levels : int
        Datasets ``0 .. levels - 1``, each half the size of the previous.
    step : (sy, sx)
        Level-0 slide pixels per pixel of dataset 0.
    mpp : (y, x) or None
        Micrometres per slide pixel; None: scales in slide pixels, no unit.
    kind : str
        How levels were made (``"nearest"`` for labels, ``"mean"`` for pixels).
    """
    unit = mpp if mpp else (1.0, 1.0)
    axis_meta = []
    for axis in axes:
        entry: dict[str, Any] = {"name": axis, "type": "channel" if axis == "c" else "space"}
        if axis != "c" and mpp:
            entry["unit"] = "micrometer"
        axis_meta.append(entry)
    channel = [1.0] if axes[0] == "c" else []
    channel_offset = [0.0] if axes[0] == "c" else []
    datasets = []
    for level in range(levels):
        factor = 2**level
        sy, sx = step[0] * factor, step[1] * factor
        # The offset of pixel 0's centre from slide pixel 0's centre: a block mean covers slide
        # pixels [0, s); every other pixel of dataset 0 keeps dataset 0's first pixel.
        ty, tx = ((sy - 1) / 2, (sx - 1) / 2) if kind == "mean" else ((step[0] - 1) / 2, (step[1] - 1) / 2)
        datasets.append({
            "path": str(level),
            "coordinateTransformations": [
                {"type": "scale", "scale": channel + [sy * unit[0], sx * unit[1]]},
                {"type": "translation", "translation": channel_offset + [ty * unit[0], tx * unit[1]]},
            ],
        })
    return {"version": NGFF_VERSION, "name": name, "axes": axis_meta, "datasets": datasets,
            "type": kind if levels > 1 else "none"}


def image_label(classes: Mapping[int, str]) -> dict[str, Any]:
    """``image-label`` metadata: a colour and a ``class`` property for every value (same values in both)."""
    values = sorted(int(v) for v in classes)
    return {
        "version": NGFF_VERSION,
        "colors": [{"label-value": v, "rgba": list(label_colour(v))} for v in values],
        "properties": [{"label-value": v, "class": str(classes[v])} for v in values],
        "source": {"image": "../../"},
    }


def omero_rgb(name: str) -> dict[str, Any]:
    """``omero`` rendering metadata for 8-bit RGB: red, green, blue channels, window 0-255."""
    window = {"start": 0, "end": 255, "min": 0, "max": 255}
    return {
        "name": name,
        "version": NGFF_VERSION,
        "channels": [
            {"label": label, "color": colour, "window": window, "active": True, "coefficient": 1.0,
             "family": "linear", "inverted": False}
            for label, colour in RGB_CHANNELS
        ],
        "rdefs": {"model": "color"},
    }


def _attrs(out: Path, group: str, attrs: Mapping[str, Any]) -> None:
    import zarr

    zarr.open_group(str(out / group) if group else str(out), mode="r+", zarr_format=2).attrs.update(dict(attrs))


def write_image_metadata(
    out: Path,
    name: str,
    levels: int,
    step: tuple[float, float],
    mpp: tuple[float, float] | None,
) -> None:
    """The root's ``multiscales`` (RGB pixels, ``(c, y, x)``) and ``omero`` rendering."""
    _attrs(out, "", {"multiscales": [multiscales(name, ("c", "y", "x"), levels, step, mpp, "mean")],
                     "omero": omero_rgb(name)})


def write_label_metadata(
    out: Path,
    group: str,
    levels: int,
    step: tuple[float, float],
    mpp: tuple[float, float] | None,
    classes: Mapping[int, str] | None,
) -> None:
    """A label image's ``multiscales`` and ``image-label`` (``classes``: value -> name; None for instances)."""
    attrs: dict[str, Any] = {"multiscales": [multiscales(group.rpartition("/")[2], ("y", "x"), levels, step, mpp,
                                                         "nearest")]}
    attrs["image-label"] = image_label(classes) if classes else {"version": NGFF_VERSION,
                                                                 "source": {"image": "../../"}}
    _attrs(out, group, attrs)


def write_labels_list(out: Path, names: Sequence[str]) -> None:
    """The ``labels`` group's list of label images."""
    _attrs(out, LABELS, {"labels": list(names)})


def write_map_metadata(
    out: Path,
    group: str,
    axes: Sequence[str],
    step: tuple[float, float],
    mpp: tuple[float, float] | None,
) -> None:
    """A single-level float map's ``multiscales``."""
    _attrs(out, group, {"multiscales": [multiscales(group.rpartition("/")[2], axes, 1, step, mpp, "none")]})
