"""Nuclei as objects: split touching nuclei of a class mask into numbered instances.

Pure NumPy / SciPy / scikit-image, no I/O; the tile functions are what a
Dask graph runs as tasks (:func:`tile_objects`, :func:`assign_offsets`,
:func:`tile_instances`), :func:`stream_instances` is an in-memory driver.

The exactness rule. Objects are defined on the whole image
(:func:`whole_image_instances`): 8-connected components of
``mask == foreground``; a component whose bounding box is taller or wider than
``max_size`` is no object ("too large", label 0); every other component is
split by a watershed of the distance transform of *its own* bounding-box crop
(:func:`split_component`), or, for a model with an instance output, at the
classes the network predicts on that crop (:func:`wsiseg.nuclei.split_labels`),
so the split never depends on where a window starts. Components are ordered by their anchor (first pixel in raster order),
sub-objects by marker, and numbered 1, 2, 3, ... in that order.

Streaming reads tile ``T`` grown by ``halo = max_size``. A component with
sides <= ``max_size`` anchored in ``T`` lies inside that window without
touching its border; one that touches a window border which is not the image
border has a side > ``max_size`` (if anchored in ``T``) or is anchored
elsewhere. So each tile knows its complete small components exactly and
counts their objects (pass 1); pass 2 numbers every pixel from its
component's owner tile (one of the 3 x 3 neighbours, as ``max_size <= tile
size``). Each tile's objects get a contiguous id range (its first id is a
prefix sum of the counts, tiles row-major), so streamed ids follow
(owner tile, anchor) order: ``whole_image_instances(..., tile_size=T)``
exactly, which is the raster order when the image is one tile wide and the
raster-order ids relabelled one to one otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wsiseg.nuclei import split_labels
from wsiseg.tiling import Box, TileGrid

#: 8-connectivity for component labelling.
_EIGHT = np.ones((3, 3), bool)
#: What is split into objects: a class, or an instance output's name (all its nucleus classes).
Foreground = int | str


@dataclass
class TileObjects:
    """Pass-1 result of one tile.

    Attributes
    ----------
    anchors : np.ndarray
        ``(n,)`` int64 sorted raster indices ``y * width + x`` (image pixels) of
        the complete small components anchored in the tile.
    counts : np.ndarray
        ``(n,)`` int64 sub-objects per component, same order.
    too_large : int
        Components anchored in the tile that are no object (a side > ``max_size``).
    table : dict[str, np.ndarray]
        Column -> ``(counts.sum(),)`` float64 measurements, one row per object
        in id order, without the ``id`` column (see :func:`measure_objects`).
    polygons : list
        One shapely Polygon / MultiPolygon per object, level-0 ``(x, y)``.
    """

    anchors: np.ndarray
    counts: np.ndarray
    too_large: int
    table: dict[str, np.ndarray]
    polygons: list[Any] = field(default_factory=list)

    @property
    def num_objects(self) -> int:
        return int(self.counts.sum())


@dataclass(frozen=True)
class _Component:
    """A component of a window: bbox in image pixels, its crop, anchor, completeness."""

    box: Box
    crop: np.ndarray  # (h, w) bool, the component only
    anchor: int  # raster index of its first pixel in the window, image coordinates
    complete: bool  # does not touch a window border that is not the image border
    classes: np.ndarray | None = None  # (h, w) the mask's classes on the component, 0 elsewhere (instance outputs)

    def split(self, min_distance: int, min_area: int, foreground: Foreground) -> np.ndarray:
        """``(h, w)`` int32 sub-objects 1..k of the component (see :func:`split_component`)."""
        if isinstance(foreground, str):  # markers narrower than half the seed distance are noise
            return _drop_small(split_labels(self.classes, foreground, (min_distance // 2) ** 2)[0], min_area)
        return split_component(self.crop, min_distance, min_area)

    @property
    def anchor_yx(self) -> tuple[int, int]:
        r, c = np.unravel_index(int(np.argmax(self.crop)), self.crop.shape)
        return self.box.y0 + int(r), self.box.x0 + int(c)

    def fits(self, max_size: int) -> bool:
        height, width = self.box.shape
        return height <= max_size and width <= max_size


def split_component(crop: np.ndarray, min_distance: int, min_area: int = 0) -> np.ndarray:
    """Split one connected component into touching objects.

    The input is cut to the component's bounding box and padded by one pixel
    of background, so the result depends on the component only. Distance
    transform; markers = ``peak_local_max`` (``exclude_border=False``), sorted
    by ``(row, col)`` and numbered from 1 (one marker, the component, if
    there is no peak); watershed of ``-dist`` inside the component with
    8-connectivity (the component is 8-connected, so every pixel is reached).

    Parameters
    ----------
    crop : np.ndarray
        ``(h, w)`` bool holding one 8-connected component (and nothing else).
    min_distance : int
        ``peak_local_max`` minimum distance between markers, pixels.
    min_area : int
        Sub-objects of fewer pixels are no object (0); the others keep their
        marker order, numbered 1..k.

    Returns
    -------
    np.ndarray
        ``(h, w)`` int32: 0 outside the component, sub-objects 1..k in marker order.
    """
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    crop = np.asarray(crop, bool)
    out = np.zeros(crop.shape, np.int32)
    rows, cols = np.flatnonzero(crop.any(axis=1)), np.flatnonzero(crop.any(axis=0))
    if rows.size == 0:
        return out
    bbox = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    component = np.pad(crop[bbox], 1)
    dist = ndimage.distance_transform_edt(component)
    peaks = peak_local_max(dist, min_distance=min_distance, labels=component.astype(int), exclude_border=False)
    if len(peaks) <= 1:  # one object: what the watershed from one marker would give
        out[bbox] = crop[bbox]
    else:
        peaks = peaks[np.lexsort((peaks[:, 1], peaks[:, 0]))]
        markers = np.zeros(component.shape, np.int32)
        markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1, dtype=np.int32)
        out[bbox] = watershed(-dist, markers, mask=component, connectivity=2)[1:-1, 1:-1]
    return _drop_small(out, min_area)


def _drop_small(objects: np.ndarray, min_area: int) -> np.ndarray:
    """``objects`` (int32 ids 1..k) without those of fewer than ``min_area`` pixels, the rest renumbered in order."""
    if min_area <= 0:
        return objects
    areas = np.bincount(objects.ravel())
    kept = areas >= min_area
    kept[0] = False
    renumber = np.zeros(areas.size, np.int32)
    renumber[kept] = np.arange(1, int(kept.sum()) + 1, dtype=np.int32)
    return renumber[objects]


def _components(
    window_mask: np.ndarray, window: Box, image_shape: tuple[int, int], foreground: Foreground
) -> list[_Component]:
    """8-connected components of ``window_mask == foreground`` in the window ``window`` (of
    ``window_mask > 0`` where ``foreground`` names an instance output, with their classes)."""
    from scipy import ndimage

    height, width = image_shape
    window_mask = np.asarray(window_mask)
    by_output = isinstance(foreground, str)
    labels, _ = ndimage.label(window_mask > 0 if by_output else window_mask == foreground, structure=_EIGHT)
    wh, ww = labels.shape
    cut = (window.y0 > 0, window.y1 < height, window.x0 > 0, window.x1 < width)  # top, bottom, left, right
    found = []
    for index, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        crop = labels[sl] == index
        r, c = np.unravel_index(int(np.argmax(crop)), crop.shape)
        box = Box(window.y0 + sl[0].start, window.y0 + sl[0].stop, window.x0 + sl[1].start, window.x0 + sl[1].stop)
        anchor = (box.y0 + int(r)) * width + box.x0 + int(c)
        touches = (
            (cut[0] and sl[0].start == 0) or (cut[1] and sl[0].stop == wh)
            or (cut[2] and sl[1].start == 0) or (cut[3] and sl[1].stop == ww)
        )
        classes = np.where(crop, window_mask[sl], 0) if by_output else None
        found.append(_Component(box, crop, anchor, not touches, classes))
    found.sort(key=lambda comp: comp.anchor)
    return found


def _check_window(window_mask: np.ndarray, window: Box, tile: Box, image_shape: tuple[int, int], max_size: int) -> None:
    if max_size < 1:
        raise ValueError(f"max_size must be positive, got {max_size}")
    if tuple(np.shape(window_mask)) != window.shape:
        raise ValueError(f"window mask has shape {np.shape(window_mask)}, window {window} has {window.shape}")
    height, width = image_shape
    need = Box(max(tile.y0 - max_size, 0), min(tile.y1 + max_size, height),
               max(tile.x0 - max_size, 0), min(tile.x1 + max_size, width))
    if window.y0 > need.y0 or window.y1 < need.y1 or window.x0 > need.x0 or window.x1 < need.x1:
        raise ValueError(f"window {window} must hold tile {tile} grown by max_size={max_size} (clipped): {need}")


def _in_box(y: int, x: int, box: Box) -> bool:
    return box.y0 <= y < box.y1 and box.x0 <= x < box.x1


def table_columns(mpp: tuple[float, float] | None) -> list[str]:
    """The measurement columns of :func:`measure_objects`, in order (``mpp`` adds the micrometre ones)."""
    names = ["centroid_y", "centroid_x", "area_px", "perimeter_px", "eccentricity",
             "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1", "mean_probability"]
    return names + (["centroid_y_um", "centroid_x_um", "area_um2"] if mpp is not None else [])


def measure_objects(
    labels: np.ndarray,
    origin: tuple[int, int],
    probability: np.ndarray | None = None,
    step: tuple[float, float] = (1.0, 1.0),
    mpp: tuple[float, float] | None = None,
) -> dict[str, np.ndarray]:
    """Measurements of the objects 1..k of one component's label crop (regionprops).

    Parameters
    ----------
    labels : np.ndarray
        ``(h, w)`` int sub-object labels 1..k (from :func:`split_component`).
    origin : (y, x)
        Image pixel of ``labels[0, 0]``.
    probability : np.ndarray, optional
        ``(h, w)`` float probabilities aligned with ``labels``.
    step : (y, x)
        Level-0 pixels per mask pixel.
    mpp : (y, x), optional
        Micrometres per level-0 pixel.

    Returns
    -------
    dict[str, np.ndarray]
        Column -> ``(k,)`` float64: ``centroid_y, centroid_x, area_px, perimeter_px,
        eccentricity, bbox_y0, bbox_x0, bbox_y1, bbox_x1`` (level-0 pixels: the
        centroid in pixel-centre coordinates, the bbox half-open pixel edges), ``mean_probability`` (NaN without ``probability``), and
        with ``mpp`` ``centroid_y_um, centroid_x_um, area_um2``.
    """
    from skimage.measure import regionprops

    sy, sx = float(step[0]), float(step[1])
    props = regionprops(labels)
    k = len(props)
    oy, ox = origin
    table = {
        # A mask pixel i covers level-0 pixels [i * s, (i + 1) * s): its centre is (i + 0.5) * s - 0.5.
        "centroid_y": np.array([(p.centroid[0] + oy + 0.5) * sy - 0.5 for p in props], np.float64),
        "centroid_x": np.array([(p.centroid[1] + ox + 0.5) * sx - 0.5 for p in props], np.float64),
        "area_px": np.array([p.area * sy * sx for p in props], np.float64),
        "perimeter_px": np.array([p.perimeter * (sy + sx) / 2 for p in props], np.float64),
        "eccentricity": np.array([p.eccentricity for p in props], np.float64),
        "bbox_y0": np.array([(p.bbox[0] + oy) * sy for p in props], np.float64),
        "bbox_x0": np.array([(p.bbox[1] + ox) * sx for p in props], np.float64),
        "bbox_y1": np.array([(p.bbox[2] + oy) * sy for p in props], np.float64),
        "bbox_x1": np.array([(p.bbox[3] + ox) * sx for p in props], np.float64),
    }
    if probability is None:
        table["mean_probability"] = np.full(k, np.nan)
    else:
        flat = labels.ravel()
        sums = np.bincount(flat, weights=np.asarray(probability, np.float64).ravel(), minlength=k + 1)
        table["mean_probability"] = sums[1:] / np.bincount(flat, minlength=k + 1)[1:]
    if mpp is not None:
        table["centroid_y_um"] = table["centroid_y"] * mpp[0]
        table["centroid_x_um"] = table["centroid_x"] * mpp[1]
        table["area_um2"] = table["area_px"] * mpp[0] * mpp[1]
    return table


def _polygons(labels: np.ndarray, origin: tuple[int, int], step: tuple[float, float]) -> list[Any]:
    """One Polygon / MultiPolygon per object 1..k, level-0 ``(x, y)``."""
    import shapely

    from wsiseg.geojson import mask_polygons  # imported here: geojson loads the output (zarr) module

    out = []
    for value in range(1, int(labels.max()) + 1):
        parts = mask_polygons(labels == value, offset=(origin[1], origin[0]))  # offset is (x, y)
        shape = parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)
        out.append(shapely.transform(shape, lambda xy: xy * np.array([step[1], step[0]])))
    return out


def _concat(tables: list[dict[str, np.ndarray]], columns: list[str]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([t[name] for t in tables]) if tables else np.zeros(0) for name in columns}


def whole_image_instances(
    mask: np.ndarray, max_size: int, min_distance: int, foreground: Foreground = 1, tile_size: int | None = None,
    min_area: int = 0,
) -> tuple[np.ndarray, int]:
    """The reference definition of the objects, on the whole image at once.

    Parameters
    ----------
    mask : np.ndarray
        ``(H, W)`` integer class mask.
    max_size : int
        Components with a bounding-box side > ``max_size`` pixels are no object.
    min_distance : int
        Minimum distance between watershed markers, pixels.
    foreground : int or str
        The class whose components are split; or the name of an instance
        output (:data:`wsiseg.nuclei.INSTANCE_OUTPUTS`): the components of
        every class after the background, split where the network's classes
        say (:func:`wsiseg.nuclei.split_labels`) instead of by their shape.
    tile_size : int, optional
        ``None``: components numbered in anchor (raster) order. Given: numbered
        tile by tile (the tile holding the anchor, tiles row-major), then in
        anchor order: the ids :func:`stream_instances` gives with this tile size.
    min_area : int
        Objects of fewer pixels are dropped (see :func:`split_component`).

    Returns
    -------
    instances : np.ndarray
        ``(H, W)`` uint32, ids 1..N (0 background and too-large components).
    too_large : int
        Number of too-large components.
    """
    if max_size < 1:
        raise ValueError(f"max_size must be positive, got {max_size}")
    shape = tuple(np.shape(mask))
    instances = np.zeros(shape, np.uint32)
    too_large, next_id = 0, 1
    components = _components(mask, Box(0, shape[0], 0, shape[1]), shape, foreground)
    if tile_size is not None:
        components.sort(key=lambda comp: (comp.anchor_yx[0] // tile_size, comp.anchor_yx[1] // tile_size, comp.anchor))
    for comp in components:
        if not comp.fits(max_size):
            too_large += 1
            continue
        labels = comp.split(min_distance, min_area, foreground)
        view = instances[comp.box.slices()]
        found = labels > 0
        view[found] = labels[found] + (next_id - 1)
        next_id += int(labels.max())
    return instances, too_large


def tile_objects(
    window_mask: np.ndarray,
    window: Box,
    tile: Box,
    image_shape: tuple[int, int],
    max_size: int,
    min_distance: int,
    foreground: Foreground = 1,
    probability: np.ndarray | None = None,
    step: tuple[float, float] = (1.0, 1.0),
    mpp: tuple[float, float] | None = None,
    outlines: bool = True,
    min_area: int = 0,
) -> TileObjects:
    """Pass 1: the objects anchored in ``tile``, counted and measured.

    Parameters
    ----------
    window_mask : np.ndarray
        ``window.shape`` integer class mask of ``window``, which must hold
        ``tile`` grown by ``max_size`` (clipped to the image).
    window, tile : Box
        Image pixels.
    image_shape : (H, W)
        Mask size (for the raster index and the image border).
    max_size, min_distance, foreground
        As in :func:`whole_image_instances`.
    probability : np.ndarray, optional
        ``window.shape`` float probabilities for ``mean_probability``.
    step : (y, x)
        Level-0 pixels per mask pixel (table and polygons are level-0).
    mpp : (y, x), optional
        Micrometres per level-0 pixel; adds the ``_um`` columns.
    outlines : bool
        Trace each object's polygon (``polygons`` stays empty otherwise: a
        fifth of the time when no GeoJSON is wanted).
    min_area : int
        As in :func:`whole_image_instances`.

    Returns
    -------
    TileObjects

    Notes
    -----
    ``too_large`` is exact for components that meet each window in one piece
    (blobs); a strongly non-convex too-large region whose first row is cut by
    the window can also be counted by a tile that does not hold its anchor.
    The objects (anchors, counts, table) are always exact.
    """
    _check_window(window_mask, window, tile, image_shape, max_size)
    anchors, counts, tables, polygons = [], [], [], []
    too_large = 0
    for comp in _components(window_mask, window, image_shape, foreground):
        if not _in_box(*comp.anchor_yx, tile):
            continue
        if not (comp.complete and comp.fits(max_size)):
            too_large += 1
            continue
        labels = comp.split(min_distance, min_area, foreground)
        origin = (comp.box.y0, comp.box.x0)
        prob = None
        if probability is not None:
            prob = np.asarray(probability)[comp.box.relative_to(window).slices()]
        anchors.append(comp.anchor)
        counts.append(int(labels.max()))
        tables.append(measure_objects(labels, origin, prob, step, mpp))
        if outlines:
            polygons.extend(_polygons(labels, origin, step))
    return TileObjects(
        anchors=np.array(anchors, np.int64),
        counts=np.array(counts, np.int64),
        too_large=too_large,
        table=_concat(tables, table_columns(mpp)),
        polygons=polygons,
    )


def assign_offsets(counts_per_tile: Mapping[tuple[int, int], int]) -> dict[tuple[int, int], int]:
    """First id of each tile's objects: tiles row-major, ids from 1.

    Parameters
    ----------
    counts_per_tile : dict
        ``(row, col) -> number of objects`` anchored in the tile.

    Returns
    -------
    dict
        ``(row, col) -> first id`` (int).
    """
    offsets, next_id = {}, 1
    for key in sorted(counts_per_tile):
        offsets[key] = next_id
        next_id += int(counts_per_tile[key])
    return offsets


def tile_instances(
    window_mask: np.ndarray,
    window: Box,
    tile: Box,
    image_shape: tuple[int, int],
    max_size: int,
    min_distance: int,
    owners: Mapping[tuple[int, int], tuple[np.ndarray, np.ndarray, int]],
    grid: TileGrid,
    foreground: Foreground = 1,
    min_area: int = 0,
) -> np.ndarray:
    """Pass 2: the instance ids of ``tile``.

    Parameters
    ----------
    window_mask, window, tile, image_shape, max_size, min_distance, foreground, min_area
        As in :func:`tile_objects`.
    owners : dict
        ``(row, col) -> (anchors, counts, first id)`` of the tiles around
        ``tile`` (its 3 x 3 neighbourhood): pass 1's ``anchors`` and
        ``counts`` and :func:`assign_offsets`.
    grid : TileGrid
        The tile grid (``max_size <= grid.tile_size`` is required).

    Returns
    -------
    np.ndarray
        ``tile.shape`` uint32 ids (0 background and too-large components).
    """
    if max_size > grid.tile_size:
        raise ValueError(f"max_size ({max_size}) must be <= the tile size ({grid.tile_size})")
    _check_window(window_mask, window, tile, image_shape, max_size)
    width = image_shape[1]
    out = np.zeros(tile.shape, np.uint32)
    for comp in _components(window_mask, window, image_shape, foreground):
        box = comp.box
        if not (comp.complete and comp.fits(max_size)):
            continue
        if box.y1 <= tile.y0 or box.y0 >= tile.y1 or box.x1 <= tile.x0 or box.x0 >= tile.x1:
            continue
        ay, ax = divmod(comp.anchor, width)
        key = (ay // grid.tile_size, ax // grid.tile_size)
        if key not in owners:
            raise ValueError(f"owner tile {key} of the component anchored at {(ay, ax)} is missing from owners")
        anchors, counts, offset = owners[key]
        anchors = np.asarray(anchors)
        rank = int(np.searchsorted(anchors, comp.anchor))
        if rank >= anchors.size or anchors[rank] != comp.anchor:
            raise ValueError(f"owner tile {key} did not count the component anchored at {(ay, ax)}")
        first = int(offset) + int(np.sum(np.asarray(counts)[:rank]))
        labels = comp.split(min_distance, min_area, foreground)
        ids = np.where(labels > 0, labels.astype(np.int64) + (first - 1), 0)
        # The component's part inside the tile.
        y0, y1 = max(box.y0, tile.y0), min(box.y1, tile.y1)
        x0, x1 = max(box.x0, tile.x0), min(box.x1, tile.x1)
        part = ids[y0 - box.y0 : y1 - box.y0, x0 - box.x0 : x1 - box.x0]
        view = out[y0 - tile.y0 : y1 - tile.y0, x0 - tile.x0 : x1 - tile.x0]
        np.copyto(view, part.astype(np.uint32), where=part > 0)
    return out


def stream_instances(
    mask: np.ndarray,
    tile_size: int,
    max_size: int,
    min_distance: int,
    foreground: Foreground = 1,
    *,
    probability: np.ndarray | None = None,
    step: tuple[float, float] = (1.0, 1.0),
    mpp: tuple[float, float] | None = None,
    min_area: int = 0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Tile-by-tile objects of an in-memory mask (the streaming algorithm, no Dask).

    Each call reads only a window (tile + ``max_size`` halo) of ``mask``.

    Parameters
    ----------
    mask : np.ndarray
        ``(H, W)`` integer class mask.
    tile_size : int
        Tile side; must be >= ``max_size``.
    max_size, min_distance, foreground, min_area
        As in :func:`whole_image_instances`.
    probability, step, mpp
        As in :func:`tile_objects` (``probability`` is ``(H, W)``).

    Returns
    -------
    instances : np.ndarray
        ``(H, W)`` uint32, equal to ``whole_image_instances(..., tile_size=tile_size)``.
    table : dict[str, np.ndarray]
        ``id`` (uint32) and the :func:`measure_objects` columns, one row per id.
    """
    if max_size > tile_size:
        raise ValueError(f"max_size ({max_size}) must be <= tile_size ({tile_size})")
    shape = tuple(np.shape(mask))
    grid = TileGrid(shape[0], shape[1], tile_size)
    passes: dict[tuple[int, int], TileObjects] = {}
    for r, c in grid.tiles():
        window = grid.window(r, c, max_size)
        prob = None if probability is None else probability[window.slices()]
        passes[r, c] = tile_objects(mask[window.slices()], window, grid.tile(r, c), shape, max_size, min_distance,
                                    foreground, prob, step, mpp, min_area=min_area)
    offsets = assign_offsets({key: result.num_objects for key, result in passes.items()})
    instances = np.zeros(shape, np.uint32)
    rows, cols = grid.shape
    for r, c in grid.tiles():
        owners = {
            (i, j): (passes[i, j].anchors, passes[i, j].counts, offsets[i, j])
            for i in range(max(r - 1, 0), min(r + 2, rows)) for j in range(max(c - 1, 0), min(c + 2, cols))
        }
        window, tile = grid.window(r, c, max_size), grid.tile(r, c)
        instances[tile.slices()] = tile_instances(mask[window.slices()], window, tile, shape, max_size, min_distance,
                                                  owners, grid, foreground, min_area)
    table = _concat([passes[key].table for key in sorted(passes)], table_columns(mpp))
    total = sum(result.num_objects for result in passes.values())
    return instances, {"id": np.arange(1, total + 1, dtype=np.uint32), **table}
