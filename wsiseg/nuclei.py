"""What separates touching nuclei: the instance-aware outputs a nucleus model may carry.

A model with an instance output predicts, beside "nucleus or not", classes
that say where a nucleus pixel lies inside its own nucleus. Both kinds fit
the framework's contract unchanged (K softmax classes, background first):
Model 1 and Model 2 both carry them, composition composes their
probabilities, entropy is taken over all K classes and the written mask is
their argmax. Every class after the background is "nucleus"; the others tell
the object split (:func:`split_labels`) where markers and basins are.

``border`` (3 classes): background, nucleus inside, nucleus border (the
    pixels within ``BORDER_WIDTH`` of another nucleus or the background, but
    for each nucleus's deepest pixels, so that a small one keeps an inside).
    Markers: the components of "inside"; basins: the rest of the nucleus.
``distance`` (4 classes): background, then each nucleus pixel's distance to
    its own border normalised per nucleus (Naylor et al., IEEE TMI 2019),
    quantised into thirds: rim, middle, core. Markers: the components of
    "core"; basins: flooded from the core outwards through middle and rim.

Pure NumPy / SciPy; no I/O. The encoders make training targets from instance
ids; :func:`split_labels` is what ``--objects`` and ``wsiseg evaluate`` run on
the argmax classes of one connected nucleus region, so that the split of a
component depends on its own pixels only (the exactness rule of
:mod:`wsiseg.instances`).
"""

from __future__ import annotations

import numpy as np

#: The instance outputs, by name, and their class names (background first).
INSTANCE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "border": ("background", "nucleus inside", "nucleus border"),
    "distance": ("background", "nucleus rim", "nucleus middle", "nucleus core"),
}
#: Width of the border class in the pixels of the masks it is made from.
BORDER_WIDTH = 2.0
#: The value a training mask leaves unscored.
IGNORE = 255


def instance_output_of(classes: tuple[str, ...] | list[str] | None) -> str | None:
    """The instance output whose class names are ``classes``, or None (a plain class mask)."""
    if classes is None:
        return None
    for name, names in INSTANCE_OUTPUTS.items():
        if tuple(classes) == names:
            return name
    return None


def distance_to_own_border(ids: np.ndarray) -> np.ndarray:
    """``(H, W)`` float32: each nucleus pixel's Euclidean distance to the nearest pixel outside its own nucleus.

    Parameters
    ----------
    ids : np.ndarray
        ``(H, W)`` integer instance ids, 0 background. Pixels beyond the
        image edge count as outside (a cut nucleus has a border there).
    """
    from scipy import ndimage

    ids = np.asarray(ids)
    out = np.zeros(ids.shape, np.float32)
    for index, sl in enumerate(ndimage.find_objects(ids), start=1):
        if sl is None:
            continue
        padded = (slice(max(sl[0].start - 1, 0), sl[0].stop + 1), slice(max(sl[1].start - 1, 0), sl[1].stop + 1))
        own = np.pad(ids[padded] == index, 1)
        dist = ndimage.distance_transform_edt(own)[1:-1, 1:-1]
        region = ids[padded] == index
        out[padded][region] = dist[region]
    return out


def encode_targets(mask: np.ndarray, ids: np.ndarray, kind: str) -> np.ndarray:
    """Training classes of an instance output from a binary mask and its instance ids.

    Parameters
    ----------
    mask : np.ndarray
        ``(H, W)`` uint8: 0 background, 1 nucleus, ``IGNORE`` unscored.
    ids : np.ndarray
        ``(H, W)`` integer instance ids (0 background), the same image.
    kind : str
        ``border`` or ``distance``.

    Returns
    -------
    np.ndarray
        ``(H, W)`` uint8 classes of ``INSTANCE_OUTPUTS[kind]``; ``IGNORE``
        where ``mask`` is, and where ``mask`` says nucleus but no id does.
    """
    if kind not in INSTANCE_OUTPUTS:
        raise ValueError(f"unknown instance output {kind!r}; choose one of {', '.join(INSTANCE_OUTPUTS)}")
    from scipy import ndimage

    ids = np.asarray(ids)
    dist = distance_to_own_border(ids)
    inside = ids > 0
    out = np.zeros(ids.shape, np.uint8)
    # Each nucleus's deepest distance: its deepest pixels are "inside" (border) or "core" (distance) however
    # small the nucleus, so that every nucleus has a marker.
    peak = np.asarray(ndimage.maximum(dist, ids, index=np.arange(ids.max() + 1)) if ids.max() else [0.0], np.float32)
    deepest = peak[ids]
    if kind == "border":
        out[inside] = np.where((dist[inside] <= BORDER_WIDTH) & (dist[inside] < deepest[inside]), 2, 1)
    else:
        normalised = dist / np.maximum(deepest, 1.0)
        out[inside] = np.minimum(np.ceil(normalised[inside] * 3.0), 3).astype(np.uint8).clip(1, 3)
    out[(mask == IGNORE) | ((mask == 1) & ~inside)] = IGNORE
    return out


def split_labels(labels: np.ndarray, kind: str, min_marker_area: int = 0) -> tuple[np.ndarray, int]:
    """Split one connected nucleus region of an instance output's classes into objects.

    Parameters
    ----------
    labels : np.ndarray
        ``(h, w)`` uint8 classes of ``INSTANCE_OUTPUTS[kind]``, 0 outside the
        region (one 8-connected component of ``labels > 0``, nothing else).
    kind : str
        ``border`` or ``distance``.
    min_marker_area : int
        Markers (components of "inside" / "core") of fewer pixels are noise,
        not nuclei: their pixels are flooded from the others. On NuInsSeg's
        val split, dropping cores under 8 pixels (at 0.316 um) lifted the
        distance model's PQ from 0.388 to 0.400 (benchmarks/RESULTS.md,
        "Instance-aware H&E models").

    Returns
    -------
    objects : np.ndarray
        ``(h, w)`` int32: 0 outside the region, objects 1..k numbered by
        their marker's first pixel in raster order.
    k : int
        The number of markers (1 where the region holds none: the region is
        one object).
    """
    from scipy import ndimage
    from skimage.segmentation import watershed

    labels = np.asarray(labels)
    region = labels > 0
    core = labels == (1 if kind == "border" else len(INSTANCE_OUTPUTS[kind]) - 1)
    markers, count = ndimage.label(core, structure=np.ones((3, 3), bool))
    if min_marker_area > 1 and count > 1:
        areas = np.bincount(markers.ravel())
        kept = areas >= min_marker_area
        kept[0] = False
        renumber = np.zeros(areas.size, np.int32)
        renumber[kept] = np.arange(1, int(kept.sum()) + 1, dtype=np.int32)
        markers, count = renumber[markers], int(kept.sum())
    if count <= 1:
        return region.astype(np.int32), 1
    # Markers numbered by their first pixel in raster order (ndimage.label does so; dropping keeps the order).
    if kind == "border":
        elevation = ndimage.distance_transform_edt(~core)
    else:
        elevation = (len(INSTANCE_OUTPUTS[kind]) - 1 - labels).astype(np.float32)
    return watershed(elevation, markers, mask=region, connectivity=2).astype(np.int32), count
