"""Cohorts of slides on one Dask cluster: found in folders or listed, several in flight.

:func:`find_slides` turns slides, folders of slides and a list file into
slide paths; :func:`plan_outputs` gives each its own output folder;
:func:`segment_cohort` runs :func:`~wsiseg.run.slides.segment_slide` on
``parallel`` slides at a time (threads of this driver sharing one client),
skips slides whose output is complete, resumes interrupted ones, records a
slide that fails with a :class:`~wsiseg.errors.WsisegError` and goes on, and
writes ``manifest.csv``. :func:`run_cohort` checks everything, starts the
cluster and runs it: what ``wsiseg segment`` calls for folders, lists and
several slides.

Output names: a slide's stem (``a/s1.svs`` -> ``s1.zarr``). Slides sharing a
stem are told apart by as few of their parent folders' names as it takes
(``a/slide.jpg``, ``b/slide.png`` -> ``a_slide.zarr``, ``b_slide.zarr``;
``x/scans/s.tif``, ``y/scans/s.tif`` -> ``x_scans_s.zarr``, ``y_scans_s.zarr``),
and by their suffix as well when two of them share a folder (``s.tif``,
``s.png`` -> ``s_tif.zarr``, ``s_png.zarr``). A name that still collides with
another slide's is an error before anything runs.
"""

from __future__ import annotations

import csv
import json
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any

from wsiseg.config import RunOptions, TwoStageConfig
from wsiseg.errors import InputError, WsisegError
from wsiseg.guard import RECORD_DIR, check_output_path, is_wsiseg_output, not_a_folder_error
from wsiseg.run.driver import ProgressCallback

#: File suffixes a folder is searched for (not ``.dcm``: a DICOM slide is a
#: folder of files, one per level; name one of its files directly or in a list).
SLIDE_SUFFIXES = frozenset({".svs", ".tif", ".tiff", ".btf", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu",
                            ".svslide", ".png", ".jpg", ".jpeg", ".bmp"})
MANIFEST_NAME = "manifest.csv"
MANIFEST_FIELDS = ("slide", "output", "status", "tiles_total", "tiles_refined", "seconds", "error")

#: ``progress(slide, stage, done, total)``: :data:`~wsiseg.run.driver.ProgressCallback` naming its slide.
SlideProgress = Callable[[Path, str, int, int], None]
#: ``on_done(row, warnings)`` as each slide ends: its manifest row and its slide's warnings (one line each).
SlideDone = Callable[[dict[str, Any], Sequence[str]], None]


class _Stopped(BaseException):
    """Raised in a slide's thread when the cohort stops (an interruption or a failure elsewhere)."""


def is_zarr_folder(path: Path) -> bool:
    """A folder that is one OME-Zarr slide, not a folder of slides."""
    return path.suffix.lower() == ".zarr" or any((path / name).exists() for name in ("zarr.json", ".zattrs", ".zgroup"))


def is_cohort(inputs: Sequence[Path], listing: Path | None = None) -> bool:
    """Several slides, a folder of slides or a list file: outputs go into a folder, with a manifest."""
    if listing is not None or len(inputs) != 1:
        return True
    return inputs[0].is_dir() and not is_zarr_folder(inputs[0])


def slides_in_folder(folder: Path) -> list[Path]:
    """The slides directly in ``folder`` (by suffix, not in subfolders, not hidden), sorted by name."""
    return sorted(
        p for p in folder.iterdir()
        if p.suffix.lower() in SLIDE_SUFFIXES and not p.name.startswith(".") and not p.is_dir()
    )


def read_slide_list(listing: Path) -> list[Path]:
    """One slide per line; blank lines and ``#`` lines ignored; relative paths from the list's folder."""
    try:
        lines = listing.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the slide list {listing}: {exc.__class__.__name__}") from exc
    entries = (line.strip() for line in lines)
    return [listing.parent / Path(entry).expanduser() for entry in entries if entry and not entry.startswith("#")]


def find_slides(inputs: Sequence[Path], listing: Path | None = None) -> list[Path]:
    """Slides named, found in folders (see :func:`slides_in_folder`) and listed, in that order, each once.

    A path named directly or in the list is kept even when it does not
    exist: it fails as that slide, not as the cohort.

    Raises
    ------
    InputError
        When no slide is given or found, or the list cannot be read.
    """
    found: list[Path] = []
    for item in inputs:
        found.extend(slides_in_folder(item) if item.is_dir() and not is_zarr_folder(item) else [item])
    if listing is not None:
        found.extend(read_slide_list(listing))
    if not found:
        where = ", ".join(str(p) for p in [*inputs, *([listing] if listing else [])]) or "the arguments"
        raise InputError(f"no slides found in {where} (folders are searched for {', '.join(sorted(SLIDE_SUFFIXES))}, "
                         "not in subfolders)")
    return _unique(found)


def _unique(paths: Iterable[Path]) -> list[Path]:
    """The first of the paths naming each file (compared resolved)."""
    seen: set[Path] = set()
    kept = []
    for path in paths:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            kept.append(path)
    return kept


def plan_outputs(slides: Sequence[Path], out_dir: Path) -> list[Path]:
    """Each slide's output folder in ``out_dir``, all distinct (the rule is in this module's docstring).

    Raises
    ------
    InputError
        When two slides would still share an output.
    """
    from wsiseg.run.slides import default_output

    names = [default_output(slide).stem for slide in slides]
    by_stem: dict[str, list[int]] = defaultdict(list)
    for index, name in enumerate(names):
        by_stem[name.casefold()].append(index)
    for members in by_stem.values():
        if len(members) > 1:
            paths = [Path(os.path.normpath(slides[i].absolute())) for i in members]
            labels = _distinct_labels(paths, [names[i] for i in members])
            for index, label in zip(members, labels):
                names[index] = label
    _refuse_shared_names(slides, names)
    return [out_dir / f"{name}.zarr" for name in names]


def _distinct_labels(paths: Sequence[Path], stems: Sequence[str]) -> list[str]:
    """``<folders>_<stem>[_<suffix>]`` for slides sharing a stem: the fewest parent folders that differ."""
    with_suffix = len({p.parent for p in paths}) < len(paths)
    depth = max(len(p.parent.parts) for p in paths)
    for k in range(0 if with_suffix else 1, depth + 1):
        labels = [_label(p, stem, k, with_suffix) for p, stem in zip(paths, stems)]
        if len({label.casefold() for label in labels}) == len(labels):
            return labels
    return labels  # identical spellings of one name: reported by _refuse_shared_names


def _label(path: Path, stem: str, folders: int, with_suffix: bool) -> str:
    parents = [part for part in path.parent.parts if part not in (path.anchor, "")][-folders:] if folders else []
    suffix = [path.suffix.lstrip(".").lower()] if with_suffix and path.suffix else []
    return "_".join([*parents, stem, *suffix])


def _refuse_shared_names(slides: Sequence[Path], names: Sequence[str]) -> None:
    first: dict[str, int] = {}
    for index, name in enumerate(names):
        other = first.setdefault(name.casefold(), index)
        if other != index:
            raise InputError(f"{slides[other]} and {slides[index]} would both be written to {name}.zarr; "
                             "rename one or segment it on its own with --out")


def check_cohort(slides: Sequence[Path], out_dir: Path, parallel: int) -> list[Path]:
    """The outputs of a cohort, once its arguments are checked (nothing is written).

    Raises
    ------
    InputError
        A bad ``parallel``, an ``out_dir`` that is a file or a ``.zarr``,
        two slides sharing an output, or an output that is, holds or lies in an input.
    """
    if parallel < 1:
        raise InputError(f"--parallel must be at least 1, got {parallel}")
    if out_dir.suffix == ".zarr":
        raise InputError("with several slides, --out is a folder for the outputs, not one .zarr")
    if out_dir.exists() and not out_dir.is_dir():
        raise not_a_folder_error(out_dir)
    outputs = plan_outputs(slides, out_dir)
    for output in outputs:
        check_output_path(output, slides)
    return outputs


def segment_cohort(
    slides: Sequence[Path],
    out_dir: Path,
    client: Any,
    config: TwoStageConfig | None = None,
    options: RunOptions = RunOptions(),
    parallel: int = 1,
    progress: SlideProgress | None = None,
    on_done: SlideDone | None = None,
) -> list[dict[str, Any]]:
    """Segment ``slides`` into ``out_dir`` on one client, ``parallel`` at a time; write the manifest.

    A slide whose output holds a complete report is ``skipped``; one whose
    output holds a run record without a report is ``resumed``; else it is
    ``done``, or ``failed`` (with the error's line) when it raises a
    :class:`~wsiseg.errors.WsisegError`. ``options.overwrite`` redoes
    finished and interrupted outputs instead; ``options.resume`` is ignored.
    An interruption (or an unexpected error) stops the slides in flight at
    their next progress step, leaves their outputs resumable, writes no
    manifest and is re-raised.

    Parameters
    ----------
    slides : sequence of Path
        From :func:`find_slides`.
    out_dir : Path
        Folder for the ``.zarr`` outputs (:func:`plan_outputs`) and ``manifest.csv``.
    client : distributed.Client
    config : TwoStageConfig, optional
        Default: the bundle's.
    options : RunOptions
    parallel : int
        Slides in flight at once.
    progress : callable, optional
        ``progress(slide, stage, done, total)``, called from the slides' threads.
    on_done : callable, optional
        ``on_done(row, warnings)`` in the calling thread as each slide ends.

    Returns
    -------
    list of dict
        One manifest row per slide (:data:`MANIFEST_FIELDS`), in the order of ``slides``.
    """
    outputs = check_cohort(slides, out_dir, parallel)
    out_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def job(slide: Path, out: Path) -> tuple[dict[str, Any], Sequence[str]]:
        return cohort_slide(slide, out, client, config, options, _slide_progress(slide, progress, stop))

    rows = _run_jobs([(job, slide, out) for slide, out in zip(slides, outputs)], parallel, stop, on_done)
    write_manifest(rows, out_dir / MANIFEST_NAME)
    return rows


def _slide_progress(slide: Path, progress: SlideProgress | None, stop: threading.Event) -> ProgressCallback:
    """A slide's progress callback: stops its run once the cohort stops, passes the rest on."""

    def report(stage: str, done: int, total: int) -> None:
        if stop.is_set():
            raise _Stopped
        if progress:
            progress(slide, stage, done, total)

    return report


def _run_jobs(
    jobs: Sequence[tuple[Callable[..., Any], Path, Path]],
    parallel: int,
    stop: threading.Event,
    on_done: SlideDone | None,
) -> list[dict[str, Any]]:
    """Run the slides' jobs on ``parallel`` threads; their rows in job order."""
    rows: list[dict[str, Any]] = [{} for _ in jobs]
    pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="wsiseg-slide")
    try:
        futures: dict[Future[Any], int] = {pool.submit(*job): index for index, job in enumerate(jobs)}
        for future in as_completed(futures):
            row, warnings = future.result()
            rows[futures[future]] = row
            if on_done:
                on_done(row, warnings)
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return rows


def cohort_slide(
    slide: Path,
    out: Path,
    client: Any,
    config: TwoStageConfig | None,
    options: RunOptions,
    progress: ProgressCallback | None = None,
) -> tuple[dict[str, Any], Sequence[str]]:
    """One slide of a cohort: its manifest row and its warnings."""
    from wsiseg.run.slides import segment_slide

    row: dict[str, Any] = {"slide": str(slide), "output": str(out), "status": "", "tiles_total": "",
                           "tiles_refined": "", "seconds": "", "error": ""}
    started = time.perf_counter()
    try:
        state = output_state(out, slide)
        if state == "complete" and not options.overwrite:
            report = json.loads((out / "report.json").read_text())
            return {**row, "status": "skipped", **_tiles(report)}, report_warnings(report)
        resume = state == "interrupted" and not options.overwrite
        report = segment_slide(slide, out, client, config, replace(options, resume=resume), progress)
    except WsisegError as exc:
        return {**row, "status": "failed", "error": one_line(exc), "seconds": _since(started)}, []
    status = "resumed" if resume else "done"
    return {**row, "status": status, **_tiles(report), "seconds": _since(started)}, report_warnings(report)


def output_state(out: Path, slide: Path) -> str:
    """``"complete"`` (a report), ``"interrupted"`` (a run record, no report) or ``"new"``.

    Raises
    ------
    InputError
        When ``out`` holds the output, finished or not, of another slide.
    """
    owner = _owner(out)
    if owner is not None and Path(owner) != slide.resolve():
        raise InputError(f"{out} holds the output of another slide ({owner}); move it away or use --overwrite")
    if (out / "report.json").is_file():
        return "complete"
    return "interrupted" if is_wsiseg_output(out) else "new"


def _owner(out: Path) -> str | None:
    """The slide an output was made from: its report's input, else its run record's."""
    for path, keys in ((out / "report.json", ("input", "path")), (out / RECORD_DIR / "run.json", ("slide",))):
        try:
            value: Any = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, str):
            return value
    return None


def _tiles(report: dict[str, Any]) -> dict[str, Any]:
    return {"tiles_total": report["tiles"]["total"], "tiles_refined": report["tiles"]["refined"]}


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 2)


def one_line(error: BaseException) -> str:
    """An error's message on one line."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def write_manifest(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """``manifest.csv``: one row per slide, columns :data:`MANIFEST_FIELDS`."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def run_cohort(
    inputs: Sequence[Path],
    out_dir: Path | None,
    overrides: dict[str, Any],
    options: RunOptions,
    listing: Path | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    parallel: int | None = None,
    progress: SlideProgress | None = None,
    on_done: SlideDone | None = None,
) -> tuple[list[dict[str, Any]], Path]:
    """Find the slides, check every argument, start the cluster, segment the cohort.

    Nothing runs and no cluster starts when an argument is wrong (no slide
    found, an unreadable list or bundle, two slides sharing an output).

    Parameters
    ----------
    inputs : sequence of Path
        Slides and folders of slides (see :func:`find_slides`).
    out_dir : Path or None
        Folder for the outputs and the manifest (default: the current folder).
    overrides : dict
        :class:`TwoStageConfig` fields to change from the bundle's (None values ignored).
    listing : Path, optional
        A list file (see :func:`read_slide_list`).
    scheduler, workers :
        As :func:`wsiseg.cluster.start_client`.
    parallel : int, optional
        Slides in flight (default: 2, or 1 for one slide).

    Returns
    -------
    rows : list of dict
        As :func:`segment_cohort`.
    manifest : Path
    """
    from wsiseg.cluster import start_client
    from wsiseg.run.slides import bundle_settings

    out_dir = out_dir if out_dir is not None else Path(".")
    slides = find_slides(inputs, listing)
    parallel = parallel if parallel is not None else min(2, len(slides))
    config = bundle_settings(options.model).for_slides().with_overrides(**overrides)
    check_cohort(slides, out_dir, parallel)
    client = start_client(scheduler, workers)
    try:
        rows = segment_cohort(slides, out_dir, client, config, options, parallel, progress, on_done)
    finally:
        client.close()
    return rows, out_dir / MANIFEST_NAME


def report_warnings(report: dict[str, Any]) -> list[str]:
    """A run's warnings, one line each: the slide's (levels dropped, ...) then the run's (workers, bundle)."""
    return [*report.get("input", {}).get("warnings", []), *report.get("warnings", [])]
