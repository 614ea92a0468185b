"""A segmentation run prepared once, before any cluster starts.

:func:`prepare_run` is the one place that turns what ``wsiseg segment`` was
given into jobs: it reads the bundle's header (its settings), resolves the
flow's settings (the bundle's, then the command's overrides), finds the
slides (one slide; or folders, lists, several slides: a cohort), gives each
its output and checks it, opens each slide (applying ``--mpp``), decides the
pixel size it is read at, and gathers the warnings of the setup, one line
each. A bad argument therefore costs nothing: no cluster has started.

The run (:func:`wsiseg.run.slides.run_job`, :func:`wsiseg.run.cohort.run_jobs`)
takes the jobs and reopens nothing. One slide is a cohort of one without a
manifest: its errors end the run instead of being recorded.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.bundle import DEFAULT_MODEL, inspect_bundle, resolve_model, shipped_name
from wsiseg.config import BundleSettings, RunOptions, TwoStageConfig, resolve_flow
from wsiseg.errors import InputError, WsisegError
from wsiseg.guard import check_output_path, not_a_folder_error
from wsiseg.run.inputs import check_cohort, default_output, find_slides, is_cohort, one_line, output_state
from wsiseg.run.plan import working_scale
from wsiseg.slide import Slide, open_slide
from wsiseg.uncertainty import TileSelection

#: ``SlideJob.state``: what the output holds when the job is prepared.
NEW, INTERRUPTED, COMPLETE = "new", "interrupted", "complete"


@dataclass(frozen=True)
class SlideJob:
    """One slide, ready to run.

    Attributes
    ----------
    path : Path
        The slide as given.
    output : Path
        Its output folder, absolute and checked (never an input).
    model : str
        The bundle: a resolved path, or :data:`~wsiseg.bundle.DEFAULT_MODEL`.
    settings : BundleSettings
        The bundle's settings, from its header.
    config : TwoStageConfig
        The flow: the bundle's for slides, with the run's overrides.
    options : RunOptions
        The run's options (``resume`` set for an interrupted output of a cohort).
    slide : Slide or None
        The opened slide (``--mpp`` applied); None when the job is skipped or failed.
    working : (int, float)
        Level and coarsening factor the slide is read at (the model's pixel size).
    scale_note : dict
        What was decided about the pixel size, and why (the report's ``working_resolution``).
    warnings : tuple of str
        The setup's warnings, one line each: the slide's, the bundle's, the pixel size's.
    state : str
        The output's state when prepared: ``new``, ``interrupted`` or ``complete`` (skipped).
    error : str or None
        Why the job cannot run (cohorts record it as the slide's failure).
    """

    path: Path
    output: Path
    model: str
    settings: BundleSettings
    config: TwoStageConfig
    options: RunOptions
    slide: Slide | None = None
    working: tuple[int, float] = (0, 1)
    scale_note: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    state: str = NEW
    error: str | None = None

    @property
    def working_pixels(self) -> int:
        """Pixels of the slide at the resolution it is worked at (0 without a slide)."""
        if self.slide is None:
            return 0
        level, coarsen = self.working
        height, width = self.slide.levels[level].shape
        return int(height / coarsen) * int(width / coarsen)

    @property
    def tile_size_note(self) -> str:
        """Where the run's tile size comes from (the report's ``settings.tile_size_from``)."""
        if self.config.tile_size is not None:
            return "the run's --tile-size"
        trained = self.settings.flow.tile_size
        return "about 512, aligned to the slide's file tiles" + (
            f" (the bundle's {trained} is the tile of its training images)" if trained else ""
        )


@dataclass(frozen=True)
class SegmentRun:
    """The jobs of one ``wsiseg segment`` command.

    Attributes
    ----------
    jobs : tuple of SlideJob
        In the order the slides were given or found.
    out_dir : Path or None
        A cohort's folder of outputs and ``manifest.csv``; None for one slide.
    parallel : int
        Slides in flight at once.
    """

    jobs: tuple[SlideJob, ...]
    out_dir: Path | None = None
    parallel: int = 1

    @property
    def is_cohort(self) -> bool:
        return self.out_dir is not None


def model_reference(model: str | os.PathLike[str] | None) -> str:
    """A bundle path (resolved), or ``wsiseg:NAME`` for a shipped bundle (``wsiseg:default`` for None)."""
    name = shipped_name(model)
    if name is not None:
        return DEFAULT_MODEL if name == "default" else f"wsiseg:{name}"
    return str(resolve_model(model))


def bundle_settings(model: str | os.PathLike[str] | None) -> BundleSettings:
    """A bundle's settings, read from its header only (no torch, no weights)."""
    ref = model_reference(model)
    return BundleSettings.from_config(inspect_bundle(resolve_model(ref))["config"], f"model bundle {ref!r}")


def full_resolution_of(model: str, options: RunOptions, overrides: Mapping[str, Any]) -> tuple[RunOptions, dict[str, Any]]:
    """What ``--full-resolution`` runs with this bundle: its separate full-resolution model on every
    tile where it has one; else Model 2 on every tile (threshold 0), Model 1 running for its context."""
    if not options.full_resolution or "model" in inspect_bundle(resolve_model(model))["models"]:
        return options, dict(overrides)
    return dataclasses.replace(options, full_resolution=False), {**overrides, "selection": TileSelection.threshold(0.0)}


def prepare_run(
    inputs: Sequence[Path],
    out: Path | None,
    overrides: Mapping[str, Any],
    options: RunOptions,
    listing: Path | None = None,
    parallel: int | None = None,
) -> SegmentRun:
    """Everything ``wsiseg segment`` was given, checked and turned into jobs (nothing runs).

    Parameters
    ----------
    inputs : sequence of Path
        Slides and folders of slides (see :func:`wsiseg.run.cohort.find_slides`).
    out : Path or None
        One slide: its output (default ``./<name>.zarr``). A cohort: the folder
        of outputs and manifest (default: the current folder).
    overrides : mapping
        :class:`TwoStageConfig` fields to change from the bundle's (None values ignored).
    options : RunOptions
    listing : Path, optional
        A list file of slides (a cohort).
    parallel : int, optional
        Slides in flight (default: 2, or 1 for one slide).

    Raises
    ------
    WsisegError
        A bad argument: no slide found, an unreadable list or bundle, outputs
        that collide or lie in inputs; for one slide, any problem with it.
    """
    model = model_reference(options.model)
    settings = bundle_settings(model)
    options, overrides = full_resolution_of(model, options, overrides)
    if not is_cohort(inputs, listing):
        return SegmentRun((prepare_slide(inputs[0], out, model, settings, overrides, options),))
    slides = find_slides(inputs, listing)
    return prepare_cohort(slides, out if out is not None else Path("."), options, overrides, parallel, model, settings)


def given_flow(config: TwoStageConfig | None) -> dict[str, Any]:
    """A caller's own flow as overrides of every field (None: the bundle's flow, no override);
    run as it is with :attr:`RunOptions.fixed_ratio` (see :func:`for_given_flow`)."""
    if config is None:
        return {}
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def for_given_flow(options: RunOptions, config: TwoStageConfig | None) -> RunOptions:
    """``options`` for a caller's own flow: a ``config`` given is run as it is (its ratio on every
    slide, ``fixed_ratio``); None (the bundle's flow) adapts Model 1's ratio to each slide."""
    return dataclasses.replace(options, fixed_ratio=True) if config is not None else options


def prepare_slide(
    path: Path,
    out: Path | None,
    model: str,
    settings: BundleSettings,
    overrides: Mapping[str, Any],
    options: RunOptions,
) -> SlideJob:
    """One slide's job; its output may exist only with ``--overwrite`` or ``--resume``.

    Raises
    ------
    WsisegError
        The slide cannot be read, or its output is not one it may write.
    """
    output = out if out is not None else default_output(path)
    check_output_path(output, [path])
    if (output.exists() or output.is_symlink()) and not output.is_dir():
        raise not_a_folder_error(output)
    if output.exists() and not (options.overwrite or options.resume):
        raise InputError(f"{output} already exists; use --overwrite to replace it or --resume to continue it")
    return _opened(path, output, model, settings, overrides, options, NEW)


def prepare_cohort(
    slides: Sequence[Path],
    out_dir: Path,
    options: RunOptions,
    overrides: Mapping[str, Any] | None = None,
    parallel: int | None = None,
    model: str | None = None,
    settings: BundleSettings | None = None,
) -> SegmentRun:
    """The jobs of a cohort: each slide's output in ``out_dir``, its state, the slide opened.

    A slide whose output holds a complete report is skipped (unless
    ``options.overwrite``); one whose output was interrupted is resumed; a
    slide that cannot be prepared (a corrupt file, another slide's output)
    gets a job with its ``error``, recorded as failed when the cohort runs.

    Raises
    ------
    WsisegError
        Arguments that concern the whole cohort (see :func:`wsiseg.run.cohort.check_cohort`).
    """
    model = model or model_reference(options.model)
    settings = settings or bundle_settings(model)
    overrides = overrides or {}
    parallel = parallel if parallel is not None else min(2, len(slides))
    outputs = check_cohort(slides, out_dir, parallel)
    jobs = tuple(_cohort_job(slide, output, model, settings, overrides, options)
                 for slide, output in zip(slides, outputs))
    return SegmentRun(jobs, out_dir, parallel)


def _cohort_job(
    slide: Path, output: Path, model: str, settings: BundleSettings, overrides: Mapping[str, Any],
    options: RunOptions,
) -> SlideJob:
    bare = SlideJob(slide, output.absolute(), model, settings, resolve_flow(settings, None, overrides).config, options)
    try:
        state = output_state(output, slide)
        if state == COMPLETE and not options.overwrite:
            return dataclasses.replace(bare, state=COMPLETE)
        resume = state == INTERRUPTED and not options.overwrite
        return _opened(slide, output, model, settings, overrides, dataclasses.replace(options, resume=resume),
                       INTERRUPTED if resume else NEW)
    except WsisegError as exc:
        return dataclasses.replace(bare, error=one_line(exc))


def _opened(
    path: Path, output: Path, model: str, settings: BundleSettings, overrides: Mapping[str, Any],
    options: RunOptions, state: str,
) -> SlideJob:
    """The job with its slide opened, its flow resolved (:func:`~wsiseg.config.resolve_flow`), its pixel
    size decided and its warnings gathered."""
    slide = open_slide(path, options.backend)
    if options.mpp:
        slide = dataclasses.replace(slide, mpp=(options.mpp, options.mpp))
    resolved = resolve_flow(settings, float(np.mean(slide.mpp)) if slide.mpp else None, overrides,
                            rescale=options.rescale, full_resolution=options.full_resolution,
                            fixed_ratio=options.fixed_ratio)
    working, note = working_scale(slide, settings.mpp, options.rescale, settings.mpp_range)
    note.update(resolved.note)
    warnings = [*slide.warnings, *_bundle_warnings(settings), *_scale_warnings(slide, settings, options, note)]
    return SlideJob(path, output.absolute(), model, settings, resolved.config, options, slide, working, note,
                    tuple(warnings), state)


def _bundle_warnings(settings: BundleSettings) -> list[str]:
    """One line when the bundle's models were trained on images resized to a square
    (``--image-size``): slides are segmented at their own pixel size, which may not match."""
    if not settings.image_size:
        return []
    side = settings.image_size
    return [
        f"this bundle was trained on images resized to {side} x {side} (--image-size); slides are segmented "
        "at their own pixel size, which may not match; train with --image-size 0 for slides"
    ]


def _scale_warnings(slide: Slide, settings: BundleSettings, options: RunOptions, note: Mapping[str, Any]) -> list[str]:
    """One line when the slide's pixel size is unknown to a model that has one, or coarser than
    any it was trained at."""
    if not settings.mpp or not options.rescale:
        return []
    name = Path(slide.path).name
    if not slide.mpp:
        return [
            f"the model was trained at {settings.mpp:g} um/pixel but {name} records no pixel "
            "size, so it is segmented at its own pixels; give --mpp UM (micrometres per pixel) to match"
        ]
    if settings.mpp_range and "coarser" in note.get("decision", ""):
        low, high = settings.mpp_range
        return [
            f"{name} has {sum(slide.mpp) / 2:.3g} um pixels, coarser than the {low:.3g}-{high:.3g} um the model "
            "was trained at; it is segmented as it is (not upsampled), so small nuclei may be missed"
        ]
    return []
