"""wsiseg's GeoJSON ring tracer against what shapely and scikit-image give.

    python benchmarks/geojson_tracer.py [--size 2048] [--repeats 5] [--seed 0]

The mask is ``size x size`` of nucleus-like discs (radius 4-14 pixels, some
touching, some overlapping, one in eight a ring with a hole), binary, as
:func:`wsiseg.geojson.tile_features` traces one class of a mask tile. Three
ways to turn it into shapely polygons with holes:

- ``wsiseg``: :func:`wsiseg.geojson.mask_polygons` (pixel-edge rings traced
  in NumPy, holes assigned with an STRtree);
- ``shapely runs``: one box per horizontal run of foreground pixels, merged by
  ``shapely.union_all``, split into polygons, collinear vertices dropped with
  ``shapely.simplify(.., 0)``;
- ``shapely pixels``: one box per foreground pixel, merged by
  ``shapely.coverage_union_all`` (which needs neighbours to share whole
  edges, as pixel boxes do and runs of different lengths do not), likewise;
- ``skimage contours``: ``skimage.measure.find_contours`` at level 0.5
  (marching squares through pixel centres), rings to polygons, holes
  assigned by containment.

Exact means: every polygon's symmetric difference with wsiseg's is empty
(same pixels, same holes) and the vertex count is the same (only corners).
Prints the best of ``--repeats`` wall times (the machine is shared) and the
checks, as a Markdown table.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def disc_mask(size: int, seed: int) -> np.ndarray:
    """``(size, size)`` bool: discs of radius 4-14 at about 1 per 1000 pixels, one in eight a ring."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), bool)
    count = size * size // 1000
    yy, xx = np.mgrid[-16:17, -16:17]
    for y, x, radius, ring in zip(rng.integers(16, size - 16, count), rng.integers(16, size - 16, count),
                                  rng.uniform(4, 14, count), rng.random(count) < 1 / 8):
        distance = np.hypot(yy, xx)
        disc = distance <= radius
        if ring:
            disc &= distance > radius / 2
        mask[y - 16 : y + 17, x - 16 : x + 17] |= disc
    return mask


def wsiseg_polygons(mask: np.ndarray) -> list[Any]:
    from wsiseg.geojson import mask_polygons

    return mask_polygons(mask)


def _polygons(merged: Any) -> list[Any]:
    """The polygons of a union, collinear vertices dropped."""
    import shapely

    return list(shapely.simplify(shapely.get_parts(merged), 0))


def shapely_runs(mask: np.ndarray) -> list[Any]:
    """Boxes of the horizontal runs of foreground pixels, merged by ``shapely.union_all``."""
    import shapely

    steps = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, starts = np.nonzero(steps == 1)
    _, ends = np.nonzero(steps == -1)
    return _polygons(shapely.union_all(shapely.box(starts, rows, ends, rows + 1)))


def shapely_pixels(mask: np.ndarray) -> list[Any]:
    """One box per foreground pixel, merged by ``shapely.coverage_union_all`` (boxes sharing whole edges)."""
    import shapely

    rows, cols = np.nonzero(mask)
    return _polygons(shapely.coverage_union_all(shapely.box(cols, rows, cols + 1, rows + 1)))


def skimage_contours(mask: np.ndarray) -> list[Any]:
    """Marching-squares rings (through pixel centres), outer ones with the holes they contain."""
    import shapely
    from skimage.measure import find_contours

    rings = [shapely.Polygon(c[:, ::-1] + 0.5) for c in find_contours(np.pad(mask, 1).astype(np.uint8), 0.5)]
    rings = [shapely.Polygon(np.asarray(r.exterior.coords) - 1) for r in rings if r.area > 0]
    # find_contours walks outer boundaries one way and holes the other (x right, y down: outer "ccw").
    outers = [r for r in rings if r.exterior.is_ccw]
    holes = [r for r in rings if not r.exterior.is_ccw]
    tree = shapely.STRtree(outers)
    owned: list[list[Any]] = [[] for _ in outers]
    for hole in holes:
        point = hole.representative_point()
        inside = [i for i in tree.query(hole) if outers[i].contains(point)]
        if inside:
            owned[min(inside, key=lambda i: outers[i].area)].append(hole.exterior.coords)
    return [shapely.Polygon(o.exterior.coords, h) for o, h in zip(outers, owned)]


METHODS: dict[str, Callable[[np.ndarray], list[Any]]] = {
    "wsiseg": wsiseg_polygons,
    "shapely runs, union_all": shapely_runs,
    "shapely pixels, coverage_union_all": shapely_pixels,
    "skimage contours": skimage_contours,
}


def compare(reference: list[Any], polygons: list[Any]) -> dict[str, Any]:
    """Polygon, hole and vertex counts, and the area where the two sets of polygons differ."""
    import shapely

    def vertices(p: Any) -> int:
        return len(p.exterior.coords) - 1 + sum(len(i.coords) - 1 for i in p.interiors)

    ours, theirs = shapely.union_all(reference), shapely.union_all(polygons)
    return {
        "polygons": len(polygons),
        "holes": sum(len(p.interiors) for p in polygons),
        "vertices": sum(vertices(p) for p in polygons),
        "area_differs": float(shapely.symmetric_difference(ours, theirs).area),
        "valid": bool(all(p.is_valid for p in polygons)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    mask = disc_mask(args.size, args.seed)
    results = {name: method(mask) for name, method in METHODS.items()}  # warm-up, and the polygons compared
    best = {name: float("inf") for name in METHODS}
    for _ in range(args.repeats):
        for name, method in METHODS.items():  # interleaved: a busy spell slows every method alike
            start = time.perf_counter()
            method(mask)
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"{args.size} x {args.size} mask, {mask.mean():.1%} foreground; best of {args.repeats}\n")
    print("| method | s | polygons | holes | vertices | area differing from wsiseg's (px) | all valid |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, polygons in results.items():
        c = compare(results["wsiseg"], polygons)
        print(f"| {name} | {best[name]:.3f} | {c['polygons']} | {c['holes']} | {c['vertices']} "
              f"| {c['area_differs']:.1f} | {c['valid']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
