"""``--objects`` on a slide: nucleus instances and their table, tile by tile on the cluster.

After the mask is written (:mod:`wsiseg.run.slides`), three steps run the
streaming algorithm of :mod:`wsiseg.instances` over the mask's tiles:

1. one task per tile counts and measures the objects anchored in it and
   writes their table rows (and GeoJSON geometry) to a scratch part file;
   it returns only the anchors and counts;
2. the driver turns the counts into each tile's first id (a prefix sum);
3. one task per tile writes its chunk of ``labels/objects/0`` (uint32),
   numbering each pixel from its object's owner tile.

The table and GeoJSON are then streamed part by part into ``objects.parquet``
(or ``.csv``) and ``objects.geojson`` with the ids added, so neither the
driver nor a worker ever holds more than a tile's window and one part.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from wsiseg.guard import RECORD_DIR
from wsiseg.ngff import MASK, OBJECTS, OBJECTS_GROUP, PROBABILITY, label_colour
from wsiseg.output import ArraySpec, build_pyramid, create_arrays, open_array
from wsiseg.instances import assign_offsets
from wsiseg.nuclei import instance_output_of
from wsiseg.tiling import Box, TileGrid

#: Regions wider or taller than this are not nuclei (when the pixel size is known) ...
MAX_OBJECT_UM = 40.0
#: ... or than this many mask pixels when it is not; never more than the tile size.
MAX_OBJECT_PX = 128
#: Watershed seeds of one region at least this far apart (micrometres; 4 pixels without a pixel size).
MIN_SEED_DISTANCE_UM = 2.0
MIN_SEED_DISTANCE_PX = 4
#: Objects under this area are specks, not nuclei (square micrometres; none are dropped without a pixel
#: size). 8 um^2 is a disc of 3.2 um: on NuInsSeg it removed the fragments that had halved panoptic
#: quality's detection term (benchmarks/RESULTS.md, "Nuclei as objects").
MIN_OBJECT_UM2 = 8.0
PARTS = f"{RECORD_DIR}/objects"


@dataclass(frozen=True)
class ObjectsSpec:
    """What every objects task needs (small; travels with each task).

    Attributes
    ----------
    out : str
        The output folder.
    tile_size, work_shape
        The mask's chunk side and size ``(H, W)``.
    max_size, min_distance, min_area : int
        Mask pixels (see :func:`wsiseg.instances.whole_image_instances`).
    foreground : int or str
        The class split into objects, or the bundle's instance output
        (:func:`wsiseg.instances.whole_image_instances`).
    step : (sy, sx)
        Level-0 pixels per mask pixel.
    mpp : (y, x) or None
        Micrometres per level-0 pixel.
    probability_channel : int or None
        Channel of Model 1's probability map for ``foreground``; None: no map.
        With an instance output it is 0 and the objects' probability is
        ``1 - P(background)``.
    low_scale : (sy, sx)
        Mask pixels per pixel of Model 1's maps.
    refined : np.ndarray
        ``(rows, cols)`` bool: tiles Model 2 refined.
    class_name : str
    geojson : bool
        Keep each object's outline for ``objects.geojson``.
    """

    out: str
    tile_size: int
    work_shape: tuple[int, int]
    max_size: int
    min_distance: int
    foreground: int | str
    min_area: int
    step: tuple[float, float]
    mpp: tuple[float, float] | None
    probability_channel: int | None
    low_scale: tuple[float, float]
    refined: np.ndarray
    class_name: str
    geojson: bool

    @property
    def grid(self) -> TileGrid:
        return TileGrid(*self.work_shape, self.tile_size)

    def part(self, row: int, col: int) -> Path:
        return Path(self.out) / PARTS / f"{row}_{col}.parquet"


class ObjectSizes(NamedTuple):
    """How objects are cut, in mask pixels: largest side, seed distance, smallest area."""

    max_size: int
    min_distance: int
    min_area: int


def object_sizes(
    tile_size: int, work_mpp: float | None, max_size: int | None, min_area: int | None = None
) -> ObjectSizes:
    """The user's sizes or the defaults, in mask pixels; the largest side at most the tile size."""
    if max_size is None:
        max_size = round(MAX_OBJECT_UM / work_mpp) if work_mpp else MAX_OBJECT_PX
    if min_area is None:
        min_area = round(MIN_OBJECT_UM2 / work_mpp**2) if work_mpp else 0
    min_distance = max(1, round(MIN_SEED_DISTANCE_UM / work_mpp)) if work_mpp else MIN_SEED_DISTANCE_PX
    return ObjectSizes(min(max_size, tile_size), min_distance, min_area)


def count_tile(spec: ObjectsSpec, row: int, col: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Pass 1 on one tile: write its objects' rows to a part file; return ``(anchors, counts, too_large)``."""
    from wsiseg.instances import tile_objects

    grid = spec.grid
    window, tile = grid.window(row, col, spec.max_size), grid.tile(row, col)
    mask = np.asarray(open_array(spec.out, MASK)[window.slices()])
    found = tile_objects(mask, window, tile, spec.work_shape, spec.max_size, spec.min_distance, spec.foreground,
                         _probability(spec, window), spec.step, spec.mpp, outlines=spec.geojson,
                         min_area=spec.min_area)
    if found.num_objects:
        _write_part(spec, row, col, found)
    return found.anchors, found.counts, found.too_large


def _probability(spec: ObjectsSpec, window: Box) -> np.ndarray | None:
    """Model 1's probability of the foreground class at each mask pixel of ``window`` (nearest low-resolution pixel)."""
    if spec.probability_channel is None:
        return None
    array = open_array(spec.out, PROBABILITY)
    sy, sx = spec.low_scale
    rows = np.minimum((np.arange(window.y0, window.y1) + 0.5) / sy, array.shape[1] - 1).astype(np.int64)
    cols = np.minimum((np.arange(window.x0, window.x1) + 0.5) / sx, array.shape[2] - 1).astype(np.int64)
    low = np.asarray(array[spec.probability_channel, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    if isinstance(spec.foreground, str):  # an instance output: every class but the background is nucleus
        low = 1.0 - low
    return low[np.ix_(rows - rows[0], cols - cols[0])]


def _write_part(spec: ObjectsSpec, row: int, col: int, found: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = dict(found.table)
    # Refined: the tile holding the object's centroid was re-segmented by Model 2.
    tile_rows = np.clip(((columns["centroid_y"] + 0.5) / spec.step[0] // spec.tile_size).astype(int),
                        0, spec.refined.shape[0] - 1)
    tile_cols = np.clip(((columns["centroid_x"] + 0.5) / spec.step[1] // spec.tile_size).astype(int),
                        0, spec.refined.shape[1] - 1)
    columns["refined"] = spec.refined[tile_rows, tile_cols].astype(bool)
    if spec.geojson:
        import shapely

        columns["geometry"] = np.array([shapely.to_geojson(p) for p in found.polygons], dtype=object)
    path = spec.part(row, col)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def label_tile(spec: ObjectsSpec, row: int, col: int, owners: dict[tuple[int, int], tuple[Any, Any, int]]) -> None:
    """Pass 2 on one tile: write its chunk of ``labels/objects/0``."""
    from wsiseg.instances import tile_instances

    grid = spec.grid
    window, tile = grid.window(row, col, spec.max_size), grid.tile(row, col)
    mask = np.asarray(open_array(spec.out, MASK)[window.slices()])
    ids = tile_instances(mask, window, tile, spec.work_shape, spec.max_size, spec.min_distance, owners, grid,
                         spec.foreground, spec.min_area)
    open_array(spec.out, OBJECTS)[tile.slices()] = ids


def write_objects(plan: Any, out: Path, refined: np.ndarray, options: Any, executor: Any,
                  classes: list[str]) -> dict[str, Any]:
    """Instances, table and (with ``options.geojson``) detections of the mask's first foreground class.

    Returns
    -------
    dict
        The report's ``outputs.objects``: label group, levels, count, table and
        GeoJSON file names, the sizes used, and how many regions were too large.
    """
    mpp = plan.source.mpp
    step = plan.work_downsample
    work_mpp = float(np.mean(mpp)) * float(np.mean(step)) if mpp else None
    max_size, min_distance, min_area = object_sizes(plan.tile_size, work_mpp, options.max_object_size,
                                                    options.min_object_area)
    instance_output = instance_output_of(classes)
    foreground: int | str = instance_output or 1
    channel = None if plan.full_resolution else (0 if plan.num_classes == 1 or instance_output else foreground)
    spec = ObjectsSpec(
        out=str(out), tile_size=plan.tile_size, work_shape=plan.work_shape, max_size=max_size,
        min_distance=min_distance, foreground=foreground, min_area=min_area, step=step, mpp=mpp, probability_channel=channel,
        low_scale=plan.stage1_scale, refined=np.asarray(refined, bool),
        class_name=_class_name(classes, foreground),
        geojson=options.geojson,
    )
    parts = out / PARTS
    if parts.exists():
        shutil.rmtree(parts)  # a resumed run's earlier parts
    grid = spec.grid
    create_arrays(out, [ArraySpec(OBJECTS, plan.work_shape, (plan.tile_size, plan.tile_size), "uint32")],
                  overwrite=True)
    passes: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, int]] = {}
    jobs = ((count_tile, (spec, r, c), (r, c)) for r, c in grid.tiles())
    for key, result in executor.run(jobs):
        passes[key] = result
    first_ids = assign_offsets({key: int(np.sum(counts)) for key, (_, counts, _) in passes.items()})
    rows, cols = grid.shape
    calls = []
    for r, c in grid.tiles():
        owners = {(i, j): (passes[i, j][0], passes[i, j][1], first_ids[i, j])
                  for i in range(max(r - 1, 0), min(r + 2, rows)) for j in range(max(c - 1, 0), min(c + 2, cols))}
        calls.append((spec, r, c, owners))
    executor.run_all(label_tile, calls)
    levels = build_pyramid(out, OBJECTS_GROUP, plan.tile_size, executor.run_all)
    count = sum(int(counts.sum()) for _, counts, _ in passes.values())
    table = _write_table(spec, grid, first_ids, options.table_format)
    geojson = _write_detections(spec, grid, first_ids) if options.geojson else None
    shutil.rmtree(parts, ignore_errors=True)
    return {"labels": OBJECTS_GROUP, "levels": levels, "count": count, "class": spec.class_name,
            "table": table, "geojson": geojson, "max_size_px": max_size, "min_distance_px": min_distance,
            "min_area_px": min_area,
            # Counted per tile: a large irregular region seen in pieces by several tiles counts more than once.
            "too_large_regions_at_most": sum(too_large for _, _, too_large in passes.values())}


def _class_name(classes: list[str], foreground: int | str) -> str:
    """What the objects are called: the class's name ("nucleus" for an instance output's classes)."""
    if isinstance(foreground, str):
        return "nucleus"
    return classes[foreground] if foreground < len(classes) else f"class {foreground}"


def _parts(spec: ObjectsSpec, grid: TileGrid, first_ids: dict[tuple[int, int], int]):
    """``(table, first id)`` of each tile with objects, in id order."""
    import pyarrow.parquet as pq

    for r, c in grid.tiles():
        path = spec.part(r, c)
        if path.is_file():
            yield pq.read_table(path), first_ids[r, c]


def _write_table(spec: ObjectsSpec, grid: TileGrid, first_ids: dict[tuple[int, int], int], table_format: str) -> str:
    """Stream the parts into ``objects.parquet`` / ``objects.csv`` with an ``id`` column first; returns the name."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from wsiseg.instances import table_columns

    name = f"objects.{'csv' if table_format == 'csv' else 'parquet'}"
    path, partial = Path(spec.out) / name, Path(spec.out) / f"{name}.partial"
    fields = [pa.field("id", pa.uint32())] + [pa.field(n, pa.float64()) for n in table_columns(spec.mpp)]
    schema = pa.schema(fields + [pa.field("refined", pa.bool_())])
    writer = pcsv.CSVWriter(str(partial), schema) if table_format == "csv" else pq.ParquetWriter(str(partial), schema)
    try:
        for part, first in _parts(spec, grid, first_ids):
            ids = pa.array(np.arange(first, first + part.num_rows, dtype=np.uint32))
            columns = [ids] + [part.column(f.name) for f in schema if f.name != "id"]
            writer.write_table(pa.table(columns, schema=schema))
    finally:
        writer.close()
    partial.replace(path)
    return name


def _write_detections(spec: ObjectsSpec, grid: TileGrid, first_ids: dict[tuple[int, int], int]) -> str:
    """Stream ``objects.geojson``: one QuPath detection per object, its measurements attached."""
    path, partial = Path(spec.out) / "objects.geojson", Path(spec.out) / "objects.geojson.partial"
    colour = list(label_colour(1 if isinstance(spec.foreground, str) else spec.foreground)[:3])
    with open(partial, "w") as handle:
        handle.write('{"type": "FeatureCollection", "features": [\n')
        first_feature = True
        for part, first in _parts(spec, grid, first_ids):
            columns = part.to_pydict()
            geometry = columns.pop("geometry")
            for index in range(part.num_rows):
                measurements = {name: _number(values[index]) for name, values in columns.items()}
                feature = {
                    "type": "Feature",
                    "geometry": json.loads(geometry[index]),
                    "properties": {
                        "objectType": "detection",
                        "name": f"nucleus {first + index}",
                        "classification": {"name": spec.class_name, "color": colour},
                        "measurements": {"id": first + index, **measurements},
                    },
                }
                handle.write(("" if first_feature else ",\n") + json.dumps(feature))
                first_feature = False
        handle.write("\n]}\n")
    partial.replace(path)
    return path.name


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return int(value)
    return None if isinstance(value, float) and math.isnan(value) else value
