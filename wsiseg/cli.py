"""The ``wsiseg`` command line: parse, call the library, print.

Errors a user can cause are :class:`~wsiseg.errors.WsisegError`; they are
printed as one line and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from wsiseg import __version__
from wsiseg.errors import WsisegError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class WsisegGroup(click.Group):
    """Turns library errors into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except WsisegError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("\nInterrupted; run again with --resume to continue.", err=True)
            sys.exit(EXIT_INTERRUPTED)


@click.group(cls=WsisegGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="wsiseg")
def main() -> None:
    """Two-stage segmentation of whole-slide and other very large images.

    A cheap Model 1 segments a downsampled view; a Model 2 re-segments at
    full resolution only the tiles where Model 1 is uncertain.
    """


def _quiet_libraries() -> None:
    """Keep third-party log chatter (tifffile warnings, Dask shutdown notes) off the terminal."""
    for name in ("tifffile", "distributed", "distributed.client", "distributed.worker", "distributed.nanny"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


class ProgressBars:
    """Draws one click progress bar per stage from ``progress(stage, done, total)`` calls."""

    LABELS = {
        "lowres": "low-res view ",
        "stage1": "stage 1      ",
        "stage2": "tiles        ",
        "finish": "finishing    ",
    }

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.stage: str | None = None
        self.bar: Any = None
        self.done = 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = click.progressbar(length=total, label=self.LABELS.get(stage, stage), file=sys.stderr, show_pos=True)
            self.bar.__enter__()
            self.done = 0
        if done > self.done:
            self.bar.update(done - self.done)
            self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@main.command()
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "-m", default=None, metavar="BUNDLE",
              help="Model bundle (.safetensors). Default: the model shipped with wsiseg.")
@click.option("--threshold", "-t", type=float, default=None,
              help="Refine tiles whose mean uncertainty is >= this (0 refines all, > 1 none). Default 0.25.")
@click.option("--top", type=int, default=None, metavar="N", help="Refine the N most uncertain tiles.")
@click.option("--budget", type=float, default=None, metavar="F", help="Refine this fraction of tiles, most uncertain first.")
@click.option("--full-resolution", is_flag=True,
              help="Baseline: run the bundle's single model on every tile (no stage 1).")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="Output OME-Zarr folder (one slide) or folder for <name>.zarr outputs (several). "
                   "Default: ./<slide name>.zarr")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Run on a Dask cluster, e.g. tcp://host:8786. Slide, model and output must be at the same "
                   "paths on every worker.")
@click.option("--workers", type=int, default=None, help="Local worker processes (default: one per core).")
@click.option("--tile-size", type=int, default=None, help="Tile side in pixels (default: ~512, aligned to the file's tiles).")
@click.option("--halo", type=int, default=None, help="Context pixels read around each tile (default: the bundle's, or 32).")
@click.option("--ratio", type=int, default=None, help="Model 1's downsampling factor (default: the bundle's, or 4).")
@click.option("--uncertainty", type=click.Choice(["entropy", "margin"]), default=None,
              help="Uncertainty measure (default: the bundle's, or entropy).")
@click.option("--blend", type=int, default=16, show_default=True, help="Blend ramp (pixels) between refined and unrefined tiles.")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Tiles per Model 2 forward pass.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "tifffile", "openslide", "zarr", "image"]), default="auto",
              show_default=True, help="Slide reader.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run into the same output.")
@click.option("--geojson", is_flag=True, help="Also write mask contours as GeoJSON (QuPath imports it).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def segment(slides: tuple[Path, ...], **opts: Any) -> None:
    """Segment SLIDES (whole-slide images, TIFF/OME-TIFF, OME-Zarr, PNG/JPEG) into OME-Zarr.

    Each output holds the mask (a multiscale label image napari and QuPath
    open), Model 1's probability and uncertainty maps, the refined-tile map,
    report.json and overlay.png.
    """
    from wsiseg.uncertainty import TileSelection

    chosen = [k for k in ("threshold", "top", "budget") if opts[k] is not None]
    if len(chosen) > 1:
        raise WsisegError("give only one of --threshold, --top and --budget")
    if opts["scheduler"] and opts["workers"]:
        raise WsisegError("give either --scheduler or --workers, not both")
    if opts["overwrite"] and opts["resume"]:
        raise WsisegError("give either --overwrite or --resume, not both")
    if opts["top"] is not None:
        selection = TileSelection.top_n(opts["top"])
    elif opts["budget"] is not None:
        selection = TileSelection.budget(opts["budget"])
    else:
        selection = TileSelection.threshold(0.25 if opts["threshold"] is None else opts["threshold"])
    _quiet_libraries()

    from wsiseg.cluster import start_client
    from wsiseg.segment import SegmentOptions, default_output, segment_slide
    from wsiseg.slide import open_slide

    from wsiseg.bundle import inspect_bundle, resolve_model

    # Fail on bad input before starting any cluster.
    for slide in slides:
        open_slide(slide, opts["backend"])
    inspect_bundle(resolve_model(opts["model"]))
    outputs = _output_paths(slides, opts["out"], default_output)
    for out in outputs:
        if out.exists() and not (opts["overwrite"] or opts["resume"]):
            raise WsisegError(f"{out} already exists; use --overwrite to replace it or --resume to continue it")
    options = SegmentOptions(
        model=opts["model"], selection=selection, full_resolution=opts["full_resolution"],
        tile_size=opts["tile_size"], halo=opts["halo"], ratio=opts["ratio"], uncertainty=opts["uncertainty"],
        blend=opts["blend"], batch_size=opts["batch_size"], device=opts["device"], backend=opts["backend"],
        overwrite=opts["overwrite"], resume=opts["resume"], geojson=opts["geojson"],
    )
    client = start_client(opts["scheduler"], opts["workers"])
    try:
        for slide, out in zip(slides, outputs):
            if not opts["quiet"]:
                click.echo(f"{slide} -> {out}", err=True)
            bars = ProgressBars(enabled=not opts["quiet"])
            try:
                report = segment_slide(slide, out, options, client, progress=bars)
            finally:
                bars.close()
            tiles = report["tiles"]
            click.echo(
                f"{out}: {tiles['refined']} of {tiles['total']} tiles refined "
                f"({100 * tiles['refined_fraction']:.1f} %), {report['timings']['total']:.1f} s"
            )
    finally:
        client.close()


def _output_paths(slides: tuple[Path, ...], out: Path | None, default_output: Any) -> list[Path]:
    if len(slides) == 1:
        return [out if out is not None else default_output(slides[0])]
    if out is not None and out.suffix == ".zarr":
        raise WsisegError("with several slides, --out is a folder for the outputs, not one .zarr")
    paths = [default_output(s, out) for s in slides]
    if len(set(paths)) != len(paths):
        raise WsisegError("two slides share a file name; segment them separately with --out")
    return paths


@main.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["auto", "tifffile", "openslide", "zarr", "image"]), default="auto",
              show_default=True)
def info(slide: Path, backend: str) -> None:
    """Describe SLIDE: format, levels and their sizes, pixel size."""
    _quiet_libraries()
    from wsiseg.slide import describe, open_slide

    for line in describe(open_slide(slide, backend)):
        click.echo(line)


def _not_yet(command: str) -> None:
    raise WsisegError(f"'wsiseg {command}' is not available yet in wsiseg {__version__}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train(args: tuple[str, ...]) -> None:
    """Train a two-stage pair on a data set (not available yet)."""
    _not_yet("train")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def evaluate(args: tuple[str, ...]) -> None:
    """Compare two-stage and full-resolution inference (not available yet)."""
    _not_yet("evaluate")


@main.command()
def models() -> None:
    """List the architectures and backbones wsiseg can build."""
    from wsiseg.models import available_backbones, available_models

    click.echo("architectures: " + ", ".join(available_models()))
    click.echo("backbones:     " + ", ".join(available_backbones()))


if __name__ == "__main__":  # pragma: no cover
    main()
