"""Export a label mask as GeoJSON polygons (what QuPath imports as objects).

Polygons follow pixel edges exactly, in level-0 pixel coordinates (x right,
y down), so rasterising them by pixel centres gives back the mask. The mask
is traced tile by tile (one chunk of the mask at a time, in parallel on a
Dask client when one is given); pieces that touch a border shared with
another tile are merged with their neighbours, so an object that crosses
tiles is one polygon.

Tracing is vectorised: the boundary edges of the foreground, oriented with
the foreground on one side, form a permutation (each edge's successor is the
next edge around the same object; at a diagonal contact the tighter turn is
taken, so diagonal pixels are separate objects: 4-connectivity). Its cycles
are the rings, found with pointer doubling in NumPy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.ngff import MASK, label_colour
from wsiseg.output import open_array
from wsiseg.tiling import Box, TileGrid

# Directions: 0 = +x, 1 = +y, 2 = -x, 3 = -y (image coordinates, y down).
_DX = np.array([1, 0, -1, 0])
_DY = np.array([0, 1, 0, -1])


def trace_rings(mask: np.ndarray) -> list[np.ndarray]:
    """Closed boundary rings of a binary mask, on pixel edges.

    Parameters
    ----------
    mask : np.ndarray
        ``(h, w)`` bool; pixel ``(r, c)`` is the square ``[c, c+1] x [r, r+1]``.

    Returns
    -------
    list of np.ndarray
        ``(n, 2)`` int64 corner vertices ``(x, y)`` of each ring (first vertex
        not repeated). Outer boundaries have negative signed area (shoelace in
        image coordinates), holes positive.
    """
    m = np.pad(np.asarray(mask, bool), 1)
    fg = m[1:-1, 1:-1]
    rows, cols = np.nonzero(fg & ~m[:-2, 1:-1])  # top edge: walk -x
    starts = [(cols + 1, rows, np.full(rows.size, 2))]
    rows, cols = np.nonzero(fg & ~m[2:, 1:-1])  # bottom edge: walk +x
    starts.append((cols, rows + 1, np.full(rows.size, 0)))
    rows, cols = np.nonzero(fg & ~m[1:-1, :-2])  # left edge: walk +y
    starts.append((cols, rows, np.full(rows.size, 1)))
    rows, cols = np.nonzero(fg & ~m[1:-1, 2:])  # right edge: walk -y
    starts.append((cols + 1, rows + 1, np.full(rows.size, 3)))
    x0 = np.concatenate([s[0] for s in starts]).astype(np.int64)
    y0 = np.concatenate([s[1] for s in starts]).astype(np.int64)
    d = np.concatenate([s[2] for s in starts]).astype(np.int64)
    count = x0.size
    if count == 0:
        return []
    width = mask.shape[1] + 2
    keys = (y0 * width + x0) * 4 + d
    order = np.argsort(keys)
    sorted_keys = keys[order]
    x1, y1 = x0 + _DX[d], y0 + _DY[d]

    def find(direction: np.ndarray) -> np.ndarray:
        key = (y1 * width + x1) * 4 + direction
        pos = np.clip(np.searchsorted(sorted_keys, key), 0, count - 1)
        return np.where(sorted_keys[pos] == key, order[pos], -1)

    # Successor: the tight turn (stay around the same pixel), else straight, else the wide turn.
    successor = find((d - 1) % 4)
    for turn in (d, (d + 1) % 4):
        missing = successor < 0
        if not missing.any():
            break
        successor[missing] = find(turn)[missing]
    # Ring labels: the smallest edge index on each cycle (pointer doubling).
    label = np.arange(count)
    jump = successor.copy()
    for _ in range(max(1, math.ceil(math.log2(count))) + 1):
        label = np.minimum(label, label[jump])
        jump = jump[jump]
    # Position along the ring: distance to the ring's last edge (list ranking).
    last = successor == label
    nxt = np.where(last, np.arange(count), successor)
    dist = (~last).astype(np.int64)
    for _ in range(max(1, math.ceil(math.log2(count))) + 1):
        dist = dist + dist[nxt]
        nxt = nxt[nxt]
    position = dist[label] - dist
    ordered = np.lexsort((position, label))
    ring_of = label[ordered]
    breaks = np.flatnonzero(np.diff(ring_of)) + 1
    rings = []
    for edges in np.split(ordered, breaks):
        dirs = d[edges]
        corner = dirs != np.roll(dirs, 1)  # keep only vertices where the direction turns
        rings.append(np.stack([x0[edges][corner], y0[edges][corner]], axis=1))
    return rings


def signed_area(ring: np.ndarray) -> float:
    """Shoelace area of a ring (negative for outer boundaries from :func:`trace_rings`)."""
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def mask_polygons(mask: np.ndarray, offset: tuple[int, int] = (0, 0)) -> list[Any]:
    """Shapely polygons (with holes) of the foreground of a binary mask.

    Parameters
    ----------
    mask : np.ndarray
        ``(h, w)`` bool.
    offset : (x, y)
        Added to every coordinate.
    """
    import shapely

    rings = trace_rings(mask)
    outers, holes = [], []
    for ring in rings:
        (outers if signed_area(ring) < 0 else holes).append(ring + np.asarray(offset))
    shells = [shapely.Polygon(r) for r in outers]
    hole_lists: list[list[np.ndarray]] = [[] for _ in shells]
    if holes:
        tree = shapely.STRtree(shells)
        areas = np.array([s.area for s in shells])
        for ring in holes:
            # The centre of the foreground pixel beside the hole's first edge (on the
            # tight-turn side, see trace_rings): inside the shell that owns the hole.
            (xa, ya), (xb, yb) = ring[0], ring[1]
            step = np.sign([xb - xa, yb - ya])
            probe = shapely.Point(xa + 0.5 * step[0] + 0.5 * step[1], ya + 0.5 * step[1] - 0.5 * step[0])
            candidates = [i for i in tree.query(probe) if shells[i].contains(probe)]
            if not candidates:
                candidates = list(tree.query(shapely.Polygon(ring)))
            best = min(candidates, key=lambda i: areas[i])
            hole_lists[best].append(ring)
    polygons = []
    for shell, own_holes in zip(shells, hole_lists):
        polygon = shapely.Polygon(shell.exterior.coords, own_holes)
        if polygon.is_valid:
            polygons.append(polygon)
        else:
            # A ring touching itself at one vertex (an object wrapped round a
            # diagonally open pixel): the valid form has the same area, no moved point.
            polygons.extend(_polygon_parts(shapely.make_valid(polygon)))
    return polygons


def _polygon_parts(geometry: Any) -> list[Any]:
    """The polygons inside any geometry (Polygon, MultiPolygon, GeometryCollection)."""
    if geometry.geom_type == "Polygon":
        return [geometry] if not geometry.is_empty else []
    return [part for g in getattr(geometry, "geoms", []) for part in _polygon_parts(g)]


def tile_features(out: str, tile: Box, grid_shape: tuple[int, int], row: int, col: int) -> tuple[list, list]:
    """Polygons of one mask tile: (complete ones, pieces touching a shared border).

    Each entry is ``(label value, shapely polygon)`` in level-0 pixels.
    """
    labels = np.asarray(open_array(out, MASK)[tile.y0 : tile.y1, tile.x0 : tile.x1])
    rows, cols = grid_shape
    complete, pieces = [], []
    for value in np.unique(labels):
        if value == 0:
            continue
        for polygon in mask_polygons(labels == value, offset=(tile.x0, tile.y0)):
            minx, miny, maxx, maxy = polygon.bounds
            touches = (
                (col > 0 and minx <= tile.x0) or (col < cols - 1 and maxx >= tile.x1)
                or (row > 0 and miny <= tile.y0) or (row < rows - 1 and maxy >= tile.y1)
            )
            (pieces if touches else complete).append((int(value), polygon))
    return complete, pieces


def _tile_features(args: tuple[Any, ...]) -> tuple[list, list]:
    return tile_features(*args)


def _features(out: Path, tile_size: int, client: Any | None) -> Iterator[tuple[int, Any]]:
    import shapely

    shape = open_array(str(out), MASK).shape
    grid = TileGrid(shape[0], shape[1], tile_size)
    args = [(str(out), grid.tile(r, c), grid.shape, r, c) for r, c in grid.tiles()]
    if client is not None:
        results: Iterator[tuple[list, list]] = (f.result() for f in client.map(_tile_features, args, pure=False))
    else:
        results = (tile_features(*a) for a in args)
    pieces: dict[int, list[Any]] = {}
    for complete, border in results:
        yield from complete
        for value, polygon in border:
            pieces.setdefault(value, []).append(polygon)
    for value, polygons in sorted(pieces.items()):
        for polygon in _polygon_parts(shapely.union_all(polygons)):
            yield value, polygon


def write_geojson(
    out: str | Path,
    tile_size: int,
    classes: list[str],
    client: Any | None = None,
    pixel_size: tuple[float, float] = (1.0, 1.0),
) -> Path:
    """Write ``OUT.zarr/mask.geojson``: one Feature per connected region of each class.

    Parameters
    ----------
    out : path
        An output folder whose mask is written.
    tile_size : int
        Its tile (chunk) size.
    classes : list of str
        Class names by label value.
    client : distributed.Client, optional
        Trace tiles in parallel on it.
    pixel_size : (y, x)
        Level-0 pixels per mask pixel (when the mask was made at a coarser
        working resolution); coordinates are scaled by it.

    Returns
    -------
    Path
        The GeoJSON file: a FeatureCollection of QuPath ``annotation`` objects
        with a ``classification``, coordinates in level-0 pixels.
    """
    import shapely

    out = Path(out)
    path = out / "mask.geojson"
    partial = out / "mask.geojson.partial"
    with open(partial, "w") as handle:
        handle.write('{"type": "FeatureCollection", "features": [\n')
        first = True
        factor = np.array([pixel_size[1], pixel_size[0]])
        for value, polygon in _features(out, tile_size, client):
            if pixel_size != (1.0, 1.0):
                polygon = shapely.transform(polygon, lambda xy: xy * factor)
            name = classes[value] if value < len(classes) else f"class {value}"
            colour = list(label_colour(value)[:3])
            feature = {
                "type": "Feature",
                "geometry": json.loads(shapely.to_geojson(polygon)),
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": name, "color": colour},
                    "label": value,
                },
            }
            handle.write(("" if first else ",\n") + json.dumps(feature))
            first = False
        handle.write("\n]}\n")
    partial.replace(path)
    return path
