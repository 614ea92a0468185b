"""``wsiseg info OUT.zarr``: what an output holds, read from its NGFF metadata and report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wsiseg.guard import RECORD_DIR
from wsiseg.ngff import MAPS, MASK_GROUP, OBJECTS_GROUP, TISSUE_GROUP
from wsiseg.run.report import read_report


def is_output(path: Path) -> bool:
    """A folder wsiseg wrote (finished or not)."""
    return (Path(path) / RECORD_DIR / "run.json").is_file()


def describe_output(path: str | Path) -> list[str]:
    """Lines describing output ``path``: its pixels, label images, maps and tables.

    Sizes are ``(y, x)`` (``(c, y, x)`` for the pixels), like the arrays.
    An output whose run did not finish says so and how to finish it.
    """
    import zarr

    out = Path(path)
    root = zarr.open_group(str(out), mode="r")
    report = read_report(out)
    if "multiscales" not in root.attrs or report is None:
        return [f"output:    {out} (wsiseg run not finished: run the same command with --resume)"]
    lines = [f"output:    {out} (OME-Zarr {root.attrs['multiscales'][0]['version']} image, wsiseg run complete)",
             f"slide:     {report.input.path}"]
    pixels = report.outputs.get("image", {}).get("pixels")
    note = {"low": " (low: Model 1's view)", "full": " (full)"}.get(pixels, "")
    lines.append(f"pixels:    {_group_line(root, '')}{note}")
    classes = root[MASK_GROUP].attrs["image-label"].get("properties", [])
    names = ", ".join(f"{p['label-value']} {p['class']}" for p in classes)
    lines.append(f"mask:      {_group_line(root, MASK_GROUP)}; classes {names}")
    tiles = report.tiles
    lines.append(f"refined:   {tiles.refined} of {tiles.total} tiles")
    tissue = report.tissue
    if tissue and TISSUE_GROUP in root:
        lines.append(f"tissue:    {100 * tissue['fraction']:.1f} % of the slide, {tissue['tiles']} of {tiles.total} "
                     f"tiles ({_group_line(root, TISSUE_GROUP)})")
    objects = report.outputs.get("objects")
    if objects and OBJECTS_GROUP in root:
        lines.append(f"objects:   {objects['count']} ({_group_line(root, OBJECTS_GROUP)}); table {objects['table']}")
    if MAPS in root:
        lines.append("maps:      " + ", ".join(sorted(root[MAPS].group_keys())))
    if report.outputs.get("geojson"):
        lines.append(f"geojson:   {report.outputs['geojson']}")
    lines.extend(f"warning:   {warning}" for warning in report.warnings)
    return lines


def _group_line(root: Any, name: str) -> str:
    """``768 x 1000 (y, x), 3 levels, 0.5 x 0.5 um per pixel`` for a multiscale group."""
    group = root[name] if name else root
    meta = group.attrs["multiscales"][0]
    axes = [axis["name"] for axis in meta["axes"]]
    shape = group[meta["datasets"][0]["path"]].shape
    levels = len(meta["datasets"])
    scale = meta["datasets"][0]["coordinateTransformations"][0]["scale"][-2:]
    unit = "um" if meta["axes"][-1].get("unit") == "micrometer" else "slide pixels"
    return (f"{' x '.join(map(str, shape))} ({', '.join(axes)}), {levels} level{'s' if levels > 1 else ''}, "
            f"{scale[0]:g} x {scale[1]:g} {unit} per pixel")
