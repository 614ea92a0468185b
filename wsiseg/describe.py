"""``wsiseg info``: what an output holds (read from its NGFF metadata and report), and what a model bundle is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wsiseg.bundle import inspect_bundle
from wsiseg.guard import RECORD_DIR
from wsiseg.ngff import MAPS, MASK_GROUP, OBJECTS_GROUP, TISSUE_GROUP
from wsiseg.nuclei import instance_output_of
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


def describe_bundle(path: str | Path) -> list[str]:
    """Lines describing model bundle ``path`` from its header alone (no weights are loaded):
    its models, what they were trained on (name, licence, citation), their pixel size, the
    default flow, the scores recorded with it and its domain profile."""
    header = inspect_bundle(path)
    config = header["config"]
    roles = {"model1": "Model 1", "model2": "Model 2", "model": "baseline"}
    models = ", ".join(f"{roles.get(role, role)} {spec.get('arch')}/{spec.get('backbone')}"
                       for role, spec in header["models"].items())
    lines = [f"model:     {path} (wsiseg bundle: {models})"]
    data = config.get("training_data")
    if isinstance(data, dict):
        lines.append(f"trained:   {data.get('name')} ({data.get('license')})")
        if data.get("citation"):
            lines.append(f"cite:      {data['citation']}")
    elif config.get("dataset"):
        lines.append(f"trained:   the {config['dataset']} data set")
    if config.get("mpp"):
        span = config.get("mpp_range")
        across = f", trained across {span[0]:.3g}-{span[1]:.3g} um" if span else ""
        lines.append(f"pixels:    {config['mpp']:g} um per pixel{across}")
    classes = config.get("classes")
    if isinstance(classes, list) and classes:
        kind = instance_output_of(classes)
        split = (f" (instance output '{kind}': --objects splits touching nuclei at it)" if kind else "")
        lines.append(f"classes:   {', '.join(classes)}{split}")
    lines.append(f"flow:      Model 1 at 1/{config.get('ratio')} resolution, {config.get('uncertainty', 'entropy')} "
                 f"threshold {config.get('threshold')} "
                 f"(tiles refined where Model 1's uncertainty exceeds it)")
    lines.extend(_score_lines(config.get("evaluation"), config.get("threshold")))
    domain = config.get("domain")
    if isinstance(domain, dict):
        lines.append(f"domain:    {' and '.join(domain.get('backgrounds', []))} backgrounds; 99 % of tile scores "
                     f"<= {domain.get('score_high')}; nuclei on >= {100 * domain.get('foreground_low', 0):.2f} % of "
                     f"the tissue of 99 % of images ({domain.get('measured_on')}): what the domain check compares with")
    return lines


def _score_lines(evaluation: Any, threshold: Any) -> list[str]:
    """The recorded full-resolution (the baseline, else Model 2 everywhere) and default-threshold rows of a
    bundle's evaluation, one line each."""
    if not isinstance(evaluation, dict) or not evaluation.get("rows"):
        return []
    where = " ".join(str(part) for part in (evaluation.get("images"), evaluation.get("dataset"), "test images") if part)
    lines = []
    has_baseline = any(row.get("method") == "baseline" for row in evaluation["rows"])
    for row in evaluation["rows"]:
        if row.get("method") == "baseline":
            name = "full resolution"
        elif not has_baseline and row.get("threshold") == 0 and threshold != 0:
            name = "full resolution (Model 2 everywhere)"
        elif row.get("threshold") == threshold:
            name = f"two-stage t={threshold:g}, {100 * row['refined_fraction']:.1f} % of tiles refined"
        else:
            continue
        objects = f", PQ {row['pq']:.3f}, AJI {row['aji']:.3f}" if row.get("pq") is not None else ""
        lines.append(f"scores:    {name}: Dice {100 * row['dice']:.2f} % (pooled {100 * row['dice_pooled']:.2f} %)"
                     f"{objects} on {where}")
    return lines
