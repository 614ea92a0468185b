"""The ``wsiseg`` command line: parse, call the library, print.

Errors a user can cause are :class:`~wsiseg.errors.WsisegError`; they are
printed as one line and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from wsiseg import __version__
from wsiseg.config import DEVICES, INPUT_TRANSFORMS, OUTPUT_PIXELS, TABLE_FORMATS, TwoStageConfig
from wsiseg.errors import WsisegError
from wsiseg.nuclei import INSTANCE_OUTPUTS
from wsiseg.progress import IMAGE_LABELS, TRAIN_LABELS, ProgressBars, is_terminal
from wsiseg.slide import BACKENDS
from wsiseg.train.config import LOSS_NAMES, PHASES, train_defaults
from wsiseg.train.datasets import DATASETS, SPLITS
from wsiseg.uncertainty import SAMPLING_STRATEGIES, UNCERTAINTY_MEASURES

#: The flow's defaults, shown in help texts (stated once, in wsiseg.config).
FLOW_DEFAULTS = TwoStageConfig()
EXIT_USER_ERROR = 2
#: Several slides, at least one failed (the others ran; manifest.csv says which).
EXIT_SLIDES_FAILED = 1
COHORT_STATUSES = ("done", "resumed", "skipped", "failed")
EXIT_INTERRUPTED = 130
#: ``ctx.meta`` key where ``train`` leaves the checkpoint an interrupted run continues from.
CHECKPOINT_META = "wsiseg.checkpoint"


class WsisegGroup(click.Group):
    """Turns library errors into one line on stderr and exit status 2, Ctrl-C into one line and 130."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except WsisegError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            # In a terminal "^C" was echoed where the cursor was: start a line of our own.
            start = "\n" if is_terminal(sys.stderr) else ""
            click.echo(start + interrupted_message(ctx.invoked_subcommand, ctx.meta), err=True)
            sys.exit(EXIT_INTERRUPTED)


def interrupted_message(command: str | None, meta: Mapping[str, Any]) -> str:
    """The line printed when ``command`` is interrupted: how to continue it, where it can be continued.

    ``meta`` is the click context's ``meta``, where ``train`` records its
    checkpoint under :data:`CHECKPOINT_META`.
    """
    if command == "segment":
        return "Interrupted; run the same command with --resume to continue."
    if command == "train":
        checkpoint = meta.get(CHECKPOINT_META, "OUT.ckpt")
        return f"Interrupted; run the same command again to continue from its checkpoint ({checkpoint})."
    return "Interrupted."


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


@main.command()
@click.argument("slides", nargs=-1, type=click.Path(path_type=Path))
@click.option("--from-list", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Also the slides listed in FILE: one path per line, relative to FILE's folder; "
                   "blank lines and # lines ignored.")
@click.option("--model", "-m", default=None, metavar="BUNDLE",
              help="Model bundle (.safetensors). Default: the model shipped with wsiseg.")
@click.option("--threshold", "-t", type=float, default=None,
              help="Refine tiles whose mean uncertainty is >= this (0 refines all, > 1 none). "
                   f"Default: the bundle's ({FLOW_DEFAULTS.selection.value:g} when it has none).")
@click.option("--top", type=int, default=None, metavar="N", help="Refine the N most uncertain tiles.")
@click.option("--budget", type=float, default=None, metavar="F", help="Refine this fraction of tiles, most uncertain first.")
@click.option("--full-resolution", is_flag=True,
              help="Full resolution everywhere: the bundle's separate full-resolution model on every tile (no "
                   "stage 1) where it has one; else (the shipped H&E model) Model 2 on every tile, Model 1 running "
                   "only for its context.")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="Output OME-Zarr folder (one slide) or folder for the <name>.zarr outputs and manifest.csv "
                   "(folders, --from-list, several slides). Default: ./<slide name>.zarr, or the current folder.")
@click.option("--parallel", type=int, default=None, metavar="N",
              help="Slides in flight at once on the cluster (default: 2 with several slides).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Run on a Dask cluster, e.g. tcp://host:8786. Slide, model and output must be at the same "
                   "paths on every worker.")
@click.option("--workers", type=int, default=None,
              help="Local worker processes of a Dask cluster started for the run (default: one per core; 4 sharing "
                   "the GPU when one is visible). 0: run in this process, without a cluster. Default: images of "
                   "at most 3072 x 3072 working pixels run in this process, larger ones on a local cluster.")
@click.option("--tile-size", type=int, default=None, help="Tile side in pixels (default: ~512, aligned to the file's tiles).")
@click.option("--halo", type=int, default=None,
              help=f"Context pixels read around each tile (default: the bundle's, or {FLOW_DEFAULTS.halo}).")
@click.option("--ratio", type=int, default=None,
              help=f"Model 1's downsampling factor (default: the bundle's, or {FLOW_DEFAULTS.ratio}, made smaller "
                   "on a slide read coarser than the model's pixel size, to keep Model 1 near its trained pixels).")
@click.option("--uncertainty", type=click.Choice(list(UNCERTAINTY_MEASURES)), default=None,
              help="Uncertainty measure (default: the bundle's, or entropy).")
@click.option("--blend", type=int, default=None,
              help=f"Blend ramp (pixels) between refined and unrefined tiles (default {FLOW_DEFAULTS.blend}).")
@click.option("--batch-size", type=int, default=None,
              help="Tiles per Model 2 forward pass (default: 1 on the CPU, as fast as larger batches there "
                   "with less memory; 4 on a GPU).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), default="auto",
              show_default=True, help="Slide reader.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (with several slides: redo finished ones).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run into the same output (always, with several slides).")
@click.option("--pixels", type=click.Choice(OUTPUT_PIXELS), default="low", show_default=True,
              help="The slide pixels OUT.zarr holds as its image, under the mask: low = the view Model 1 read "
                   "(1/ratio per side, no extra decoding, about 1/ratio^2 of the storage), full = a copy at full "
                   "resolution (see benchmarks/RESULTS.md, 'Output pixels').")
@click.option("--mpp", type=float, default=None, metavar="UM",
              help="Micrometres per pixel of level 0, for files that do not say (replaces the file's value): "
                   "outputs are then in micrometres and the model's pixel size is matched.")
@click.option("--tissue-mask/--no-tissue-mask", "tissue", default=True, show_default=True,
              help="Detect tissue on a thumbnail first (Otsu on optical density, or on intensity where the "
                   "background is dark, as for fluorescence): outside tissue the mask is 0 and no tile is "
                   "refined. Stored as labels/tissue.")
@click.option("--objects", is_flag=True,
              help="Also split the mask's nuclei into objects: labels/objects (one id per nucleus, touching "
                   "nuclei split) and a table of their measurements (objects.parquet).")
@click.option("--max-object-size", type=int, default=None, metavar="PX",
              help="With --objects: regions wider or taller than this many mask pixels are not nuclei and are "
                   "left out of the objects (default: the halo, at most the tile size).")
@click.option("--min-object-area", type=int, default=None, metavar="PX",
              help="With --objects: objects of fewer mask pixels are specks, not nuclei, and are left out "
                   "(default: 8 square micrometres; none without a pixel size).")
@click.option("--table-format", type=click.Choice(TABLE_FORMATS), default="parquet", show_default=True,
              help="With --objects: the table's format.")
@click.option("--geojson", is_flag=True,
              help="Also write GeoJSON QuPath imports: with --objects the nuclei as detections carrying their "
                   "measurements (objects.geojson), else the mask's regions as annotations (mask.geojson).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def segment(slides: tuple[Path, ...], **opts: Any) -> None:
    """Segment SLIDES (whole-slide images, TIFF/OME-TIFF, OME-Zarr, PNG/JPEG) into OME-Zarr.

    Each output OUT.zarr is one OME-Zarr (NGFF 0.4) image that napari and
    QuPath open: the slide's pixels, with the mask and the refined-tile map
    (and, with --objects, the nuclei) as its labels; Model 1's probability
    and uncertainty maps under maps/; report.json and overlay.png.
    'wsiseg info OUT.zarr' describes it.

    SLIDES may also be folders of slides (files with a slide suffix, not in
    subfolders). With folders, --from-list or several slides, each slide goes
    to OUT/<name>.zarr (slides sharing a name get their folder's name in
    front: a_slide.zarr, b_slide.zarr), finished outputs are skipped and
    interrupted ones resumed, a slide that fails does not stop the others,
    OUT/manifest.csv lists every slide, and the exit status is 1 when one failed.
    """
    from wsiseg.config import RunOptions
    from wsiseg.run.job import prepare_run
    from wsiseg.uncertainty import TileSelection

    if not slides and opts["from_list"] is None:
        raise WsisegError("give slides, folders of slides or --from-list FILE")
    chosen = [k for k in ("threshold", "top", "budget") if opts[k] is not None]
    if len(chosen) > 1:
        raise WsisegError("give only one of --threshold, --top and --budget")
    if opts["scheduler"] and opts["workers"] is not None:
        raise WsisegError("give either --scheduler or --workers, not both")
    selection = None  # the bundle's default threshold
    if opts["top"] is not None:
        selection = TileSelection.top_n(opts["top"])
    elif opts["budget"] is not None:
        selection = TileSelection.budget(opts["budget"])
    elif opts["threshold"] is not None:
        selection = TileSelection.threshold(opts["threshold"])
    _quiet_libraries()
    overrides = {"selection": selection, **{k: opts[k] for k in ("tile_size", "halo", "ratio", "uncertainty", "blend")}}
    options = RunOptions(**{k: opts[k] for k in (
        "model", "full_resolution", "device", "batch_size", "backend", "overwrite", "resume", "geojson",
        "pixels", "mpp", "objects", "max_object_size", "min_object_area", "table_format", "tissue")})
    run = prepare_run(slides, opts["out"], overrides, options, opts["from_list"], opts["parallel"])
    bars = ProgressBars(enabled=not opts["quiet"])
    try:
        if run.is_cohort:
            _segment_cohort(run, opts, bars)
        else:
            _segment_one(run, opts, bars)
    finally:
        bars.close()


def _segment_one(run: Any, opts: dict[str, Any], bars: ProgressBars) -> None:
    """One slide named: any error stops the run (exit 2)."""
    from wsiseg.run.cohort import run_segment

    (job,) = run.jobs
    if not opts["quiet"]:
        click.echo(f"{job.path} -> {job.output}", err=True)
    for warning in job.warnings:  # printed even with --quiet, before a long run
        click.echo(f"Warning: {warning}", err=True)
    progress = None if opts["quiet"] else (lambda slide, stage, done, total: bars(stage, done, total))
    (outcome,) = run_segment(run, opts["scheduler"], opts["workers"], progress)
    bars.close()
    report = outcome.report
    for warning in [w for w in report.warnings if w not in job.warnings]:  # the run's own (workers, domain check)
        click.echo(f"Warning: {warning}", err=True)
    click.echo(
        f"{job.output}: {report.tiles.refined} of {report.tiles.total} tiles refined "
        f"({100 * report.tiles.refined_fraction:.1f} %), {report.timings.total:.1f} s"
    )


def _segment_cohort(run: Any, opts: dict[str, Any], bars: ProgressBars) -> None:
    """Folders, lists, several slides: a line per slide, a summary, exit status 1 when one failed."""
    from wsiseg.run.cohort import MANIFEST_NAME, run_segment

    def done(outcome: Any) -> None:
        bars.close()
        row = outcome.row()
        click.echo(_cohort_line(row))
        for warning in outcome.warnings:
            click.echo(f"Warning: {row['slide']}: {warning}", err=True)

    progress = _slide_bars(bars) if opts["parallel"] == 1 and not opts["quiet"] else None
    outcomes = run_segment(run, opts["scheduler"], opts["workers"], progress, done)
    counts = {status: sum(o.status == status for o in outcomes) for status in COHORT_STATUSES}
    click.echo(f"{len(outcomes)} slides: " + ", ".join(f"{n} {status}" for status, n in counts.items())
               + f"; manifest {run.out_dir / MANIFEST_NAME}")
    if counts["failed"]:
        sys.exit(EXIT_SLIDES_FAILED)


def _slide_bars(bars: ProgressBars) -> Any:
    """``progress(slide, stage, done, total)`` drawn as ``bars``, under a line naming each new slide."""
    current: list[Path] = []

    def progress(slide: Path, stage: str, done: int, total: int) -> None:
        if current != [slide]:
            bars.close()
            current[:] = [slide]
            click.echo(str(slide), err=True)
        bars(stage, done, total)

    return progress


def _cohort_line(row: dict[str, Any]) -> str:
    """One slide's result: ``STATUS SLIDE -> OUTPUT: ...``."""
    if row["status"] == "failed":
        return f"failed   {row['slide']}: {row['error']}"
    line = (f"{row['status']:8s} {row['slide']} -> {row['output']}: "
            f"{row['tiles_refined']} of {row['tiles_total']} tiles refined")
    return line if row["status"] == "skipped" else f"{line}, {row['seconds']:.1f} s"


@main.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(BACKENDS), default="auto",
              show_default=True)
def info(slide: Path, backend: str) -> None:
    """Describe SLIDE (format, levels and their sizes, pixel size), an output
    OUT.zarr of 'wsiseg segment' (pixels, mask, objects, maps, what ran), or a
    model bundle (a .safetensors file, or a shipped name: default, bowl): what
    it was trained on, its pixel size, threshold and recorded scores."""
    _quiet_libraries()
    from wsiseg.bundle import resolve_model, shipped_name
    from wsiseg.describe import describe_bundle, describe_output, is_output
    from wsiseg.slide import describe, open_slide

    if slide.suffix == ".safetensors" or shipped_name(str(slide)) is not None:
        lines = describe_bundle(resolve_model(str(slide)))
    elif is_output(slide):
        lines = describe_output(slide)
    else:
        lines = describe(open_slide(slide, backend))
    for line in lines:
        click.echo(line)


DATASET_CHOICE = click.Choice(DATASETS)


#: ``wsiseg train``'s option defaults: :class:`~wsiseg.train.config.TrainConfig`'s, stated there once.
TRAIN = train_defaults()


@main.command()
@click.option("--dataset", required=True, type=DATASET_CHOICE, help="Data set, read from its released layout.")
@click.option("--data-root", required=True, type=click.Path(path_type=Path), help="Folder of the data set.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Bundle to write (.safetensors).")
@click.option("--arch", default=TRAIN["arch"], show_default=True,
              help="Architecture: unet, segnet, fcn, deeplabv3, ifbfnet (see 'wsiseg models').")
@click.option("--backbone", default=TRAIN["backbone"], show_default=True, help="Backbone (see 'wsiseg models').")
@click.option("--backbone-weights", type=click.Path(path_type=Path), default=TRAIN["backbone_weights"],
              help="Local file of pretrained backbone weights (never downloaded).")
@click.option("--ratio", default=TRAIN["ratio"], show_default=True, help="Model 1's downsampling factor R.")
@click.option("--epochs", default=TRAIN["epochs"], show_default=True, help="Epochs per phase.")
@click.option("--batch-size", default=TRAIN["batch_size"], show_default=True)
@click.option("--lr", default=TRAIN["lr"], show_default=True, help="Adam learning rate.")
@click.option("--loss", type=click.Choice(LOSS_NAMES), default=TRAIN["loss"], show_default=True,
              help="focal (the two-stage paper), ce, ohem (IFBFNet's), lad (locally adaptive) or focal_dice "
                   "(focal plus the nucleus mask's soft Dice).")
@click.option("--aux-weight", default=TRAIN["aux_weight"], show_default=True, help="Weight of an auxiliary head's loss (IFBFNet).")
@click.option("--lad-window", default=TRAIN["lad_window"], show_default=True, help="Window of the locally adaptive loss.")
@click.option("--lad-power", default=TRAIN["lad_power"], show_default=True, help="Minkowski power of the locally adaptive loss.")
@click.option("--sampling", type=click.Choice(SAMPLING_STRATEGIES), default=TRAIN["sampling"], show_default=True,
              help="How stage 2 picks a patch from Model 1's tile uncertainty.")
@click.option("--image-size", default=TRAIN["image_size"], show_default=True,
              help="Resize images to this square (the paper's protocol); 0 keeps the native pixel size.")
@click.option("--crop-size", default=TRAIN["crop_size"], show_default=True, help="Crop side when --image-size is 0.")
@click.option("--patches", default=TRAIN["patches"], show_default=True, help="About this many tiles per image when resizing (4, 16, 64, 128).")
@click.option("--tile-size", type=int, default=TRAIN["tile_size"], help="Tile side when --image-size is 0 (default crop/4).")
@click.option("--halo", default=TRAIN["halo"], show_default=True, help="Context pixels around each tile.")
@click.option("--finetune/--no-finetune", default=TRAIN["finetune"], show_default=True, help="Start Model 2 from Model 1.")
@click.option("--context/--no-context", default=TRAIN["context"], show_default=True, help="Give Model 2 Model 1's features.")
@click.option("--stage", type=click.Choice(list(PHASES)), default=TRAIN["stage"], show_default=True)
@click.option("--model1-from", type=click.Path(path_type=Path), default=TRAIN["model1_from"],
              help="Skip stage 1 and use this bundle's Model 1 (same --arch, --backbone, --ratio, --input): "
                   "stage-2 settings compared on one Model 1.")
@click.option("--init-from", type=click.Path(path_type=Path), default=TRAIN["init_from"],
              help="Fine-tune a bundle: each model starts from this bundle's model of the same role (same --arch, "
                   "--backbone, --ratio, --input), e.g. wsiseg/data/default.safetensors on your own images.")
@click.option("--augment/--no-augment", default=TRAIN["augment"], show_default=True, help="The paper's augmentation (the next four).")
@click.option("--brightness", default=TRAIN["brightness"], show_default=True, help="Brightness jitter: multiply by U(1-b, 1+b).")
@click.option("--contrast", default=TRAIN["contrast"], show_default=True, help="Contrast jitter: scale deviations from the mean by U(1-c, 1+c).")
@click.option("--translate", default=TRAIN["translate"], show_default=True, help="Translation: upscale by up to this fraction, then crop.")
@click.option("--rotate/--no-rotate", default=TRAIN["rotate"],
              help="Rotations by 90 degrees and vertical flips (default: where orientation is arbitrary: PH2, BOWL).")
@click.option("--stain-jitter", default=TRAIN["stain_jitter"], show_default=True,
              help="H&E stain augmentation (Tellez et al.): each stain's density times U(1-s, 1+s), shifted; 0 off.")
@click.option("--scale-jitter", default=TRAIN["scale_jitter"], show_default=True,
              help="With --image-size 0: crops at a random scale in [1/(1+j), 1+j] (20x and 40x alike); 0 off.")
@click.option("--brightfield-repeats", default=TRAIN["brightfield_repeats"], show_default=True,
              help="Draw bright-field images (light background) this many times per epoch, fluorescence once: "
                   "more weight for stained tissue where a data set holds little of it.")
@click.option("--synthetic-he", default=TRAIN["synthetic_he"], show_default=True,
              help="Replace this fraction of training crops by an H&E-like rendering of their nucleus mask "
                   "(stroma, fibres, cytoplasm, glass; binary nucleus masks); 0 off.")
@click.option("--input", "input_transform", type=click.Choice(INPUT_TRANSFORMS), default=TRAIN["input_transform"], show_default=True,
              help="What the network sees: the RGB image, or the hematoxylin density of colour deconvolution "
                   "(one nuclear-stain channel; stains look alike). Recorded in the bundle.")
@click.option("--multiclass", is_flag=True, default=TRAIN["multiclass"], help="KITTI / BDD: 19 classes instead of vehicle vs rest.")
@click.option("--split-seed", default=TRAIN["split_seed"], show_default=True, help="Seed of the 70/30 split.")
@click.option("--seed", default=TRAIN["seed"], show_default=True)
@click.option("--mpp", type=float, default=TRAIN["mpp"],
              help="Micrometres per pixel the models train at (recorded in the bundle); crops are resampled to it "
                   "from the data set's own pixel size where that is known (default: the data set's).")
@click.option("--data-mpp", type=float, default=TRAIN["data_mpp"],
              help="Micrometres per pixel of the data set's images (default: its own; NuInsSeg about 0.2, BOWL 0.4).")
@click.option("--touching-gaps/--no-touching-gaps", default=TRAIN["touching_gaps"], show_default=True,
              help="Train on masks whose touching nuclei are kept apart by a background gap (their borders), so "
                   "that --objects splits them; needs instances (NuInsSeg, BOWL, a folder of id masks).")
@click.option("--instance-output", type=click.Choice(["none", *INSTANCE_OUTPUTS]), default=TRAIN["instance_output"],
              show_default=True,
              help="What the models learn beside 'nucleus': border (background / inside / border) or distance "
                   "(each nucleus's distance to its own border, in thirds); --objects then splits touching nuclei "
                   "at what the network predicts. Needs instances (NuInsSeg, BOWL, a folder of id masks).")
@click.option("--gamma-jitter", default=TRAIN["gamma_jitter"], show_default=True,
              help="Raise each crop's intensities to a power in [1/(1+g), 1+g]: paler and darker stains; 0 off.")
@click.option("--add-dataset", "extra_datasets", multiple=True, default=TRAIN["extra_datasets"], metavar="NAME=ROOT",
              help="More training data (its train split), e.g. bowl=data/stage1_train; scored on --dataset only.")
@click.option("--threshold", default=TRAIN["threshold"], show_default=True,
              help="Default tile threshold stored in the bundle.")
@click.option("--freeze-bn-after", type=int, default=TRAIN["freeze_bn_after"],
              help="After this many epochs of each phase, train against frozen BatchNorm statistics "
                   "(for data mixing very different images, e.g. fluorescence and brightfield).")
@click.option("--device", type=click.Choice(DEVICES), default=TRAIN["device"], show_default=True)
@click.option("--val-images", default=TRAIN["val_images"], show_default=True, help="Test images scored at the end (0: all).")
@click.option("--workers", default=TRAIN["workers"], show_default=True,
              help="Processes that make training batches ahead of the step (0: in this process); on a GPU, "
                   "about the number of CPU cores. N >= 1 gives the same batches for every N, not those of 0.")
def train(out: Path, **opts: Any) -> None:
    """Train Model 1 and Model 2 (and/or the full-resolution baseline) with the paper's protocol.

    Resumes from OUT.ckpt when an earlier run with the same settings was interrupted.
    """
    from wsiseg.train.config import TrainConfig
    from wsiseg.train.fit import checkpoint_path, train as run_training

    _quiet_libraries()
    config = TrainConfig(**{k: (str(v) if isinstance(v, Path) else v) for k, v in opts.items()})
    if out.exists():
        raise WsisegError(f"{out} already exists; choose another --out or delete it")
    if checkpoint_path(out).exists():
        click.echo(f"resuming from {checkpoint_path(out)}", err=True)
    click.get_current_context().meta[CHECKPOINT_META] = checkpoint_path(out)
    bars = ProgressBars(labels=TRAIN_LABELS)
    try:
        path = run_training(config, out, progress=bars,
                            evaluate_progress=lambda done, total: bars("scoring", done, total))
    finally:
        bars.close()
    from wsiseg.bundle import load_bundle
    from wsiseg.evaluate import MethodScores, format_table

    validation = load_bundle(path).config.get("validation", {})
    click.echo(f"wrote {path}")
    if validation.get("rows"):
        click.echo(f"test split ({validation['images']} images):")
        for line in format_table([MethodScores(**row) for row in validation["rows"]]):
            click.echo("  " + line)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--dataset", required=True, type=DATASET_CHOICE)
@click.option("--data-root", required=True, type=click.Path(path_type=Path))
@click.option("--baseline", type=click.Path(path_type=Path), default=None,
              help="Bundle whose single model is the full-resolution baseline (default: BUNDLE's own).")
@click.option("--threshold", "thresholds", type=float, multiple=True,
              help="Two-stage thresholds (repeatable). Default: the paper's 1, 0.75, 0.5, 0.25, 0.")
@click.option("--split", type=click.Choice(SPLITS), default="test", show_default=True)
@click.option("--split-seed", type=int, default=None, help="Default: the seed BUNDLE was trained with.")
@click.option("--multiclass", is_flag=True)
@click.option("--limit", type=int, default=0, help="Score only the first N images.")
@click.option("--tile-size", type=int, default=None,
              help="Tile side (default: about 512, as 'wsiseg segment'; the bundle's is its training images').")
@click.option("--halo", type=int, default=None, help="Override the bundle's halo.")
@click.option("--ratio", type=int, default=None,
              help="Model 1's downsampling instead of the bundle's (as 'wsiseg segment --ratio').")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
              help="Where the timed inference runs: the paper's comparison is CPU seconds per image.")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="Folder for evaluation.csv / .json / speed_vs_dice.png (default: evaluation-<bundle name>).")
@click.option("--scan-mpp", type=float, default=None, metavar="UM",
              help="Resample the images to this pixel size first, as if scanned so (0.5: 20x), then score them "
                   "as 'wsiseg segment' would segment such a slide (needs a data set with a pixel size).")
@click.option("--work-mpp", type=float, default=None, metavar="UM",
              help="Segment at this pixel size instead of the bundle's rule (upsampling too).")
@click.option("--tissue-mask/--no-tissue-mask", "tissue", default=True, show_default=True,
              help="Detect tissue first, as 'wsiseg segment' does.")
def evaluate(bundle: Path, **opts: Any) -> None:
    """Dice, IoU, refined fraction and time per image: baseline vs two-stage over thresholds;
    AJI and panoptic quality of the objects where the truth has instances.

    Each image is segmented as 'wsiseg segment' segments a slide of its pixel
    size (tiles of about 512 pixels, the pixel-size and ratio rules, the
    tissue mask); the setting is printed first. s/image times the run only.
    """
    from wsiseg.evaluate import PixelSizes, evaluate_bundle, format_table

    _quiet_libraries()
    bar = ProgressBars(labels=IMAGE_LABELS)
    try:
        rows, paths = evaluate_bundle(
            bundle, opts["dataset"], opts["data_root"], tuple(opts["thresholds"]), opts["baseline"], opts["split"],
            opts["split_seed"], opts["multiclass"], opts["limit"],
            {"tile_size": opts["tile_size"], "halo": opts["halo"], "ratio": opts["ratio"]}, opts["device"], opts["out"],
            progress=lambda done, total: bar("images", done, total),
            pixel_sizes=PixelSizes(opts["scan_mpp"], opts["work_mpp"]), tissue=opts["tissue"],
        )
    finally:
        bar.close()
    import json

    setting = json.loads(paths["json"].read_text())["setting"]
    click.echo(f"scored {setting}, tissue mask {'on' if opts['tissue'] else 'off'}")
    for line in format_table(rows):
        click.echo(line)
    click.echo(f"wrote {paths['csv']}, {paths['json'].name}, {paths['plot'].name}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--dataset", required=True, type=DATASET_CHOICE, help="Your labelled images, in any layout train reads.")
@click.option("--data-root", required=True, type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="The calibrated bundle (default: <BUNDLE>-calibrated.safetensors beside it).")
@click.option("--max-loss", default=0.5, show_default=True,
              help="Dice points the two-stage run may lose against the bundle's full-resolution baseline.")
@click.option("--split", type=click.Choice(SPLITS), default="test", show_default=True)
@click.option("--split-seed", type=int, default=None, help="Default: the seed BUNDLE was trained with.")
@click.option("--multiclass", is_flag=True)
@click.option("--limit", type=int, default=0, help="Use only the first N images.")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
def calibrate(bundle: Path, **opts: Any) -> None:
    """Choose BUNDLE's default threshold on your own labelled images and save it in a copy.

    The chosen threshold is the highest whose Dice is within --max-loss points
    of the full-resolution baseline's: the fewest refined tiles for that quality.
    """
    from wsiseg.calibrate import calibrate as run_calibration
    from wsiseg.evaluate import format_table

    _quiet_libraries()
    bar = ProgressBars(labels=IMAGE_LABELS)
    try:
        result = run_calibration(
            bundle, opts["dataset"], opts["data_root"], opts["out"], opts["max_loss"] / 100, split=opts["split"],
            split_seed=opts["split_seed"], multiclass=opts["multiclass"], limit=opts["limit"], device=opts["device"],
            progress=lambda done, total: bar("images", done, total),
        )
    finally:
        bar.close()
    for line in format_table(result.rows):
        click.echo(line)
    if not result.within:
        click.echo(f"Warning: no threshold came within {opts['max_loss']:g} Dice points of the baseline; "
                   "chose the best-scoring one", err=True)
    click.echo(f"threshold {result.threshold:g} -> {result.path}")


@main.command()
def models() -> None:
    """List the architectures and backbones wsiseg can build."""
    from wsiseg.models import available_backbones, available_models

    click.echo("architectures: " + ", ".join(available_models()))
    click.echo("backbones:     " + ", ".join(available_backbones()))


if __name__ == "__main__":  # pragma: no cover
    main()
