"""Cohorts of slides on one Dask cluster: found in folders or listed, several in flight.

:func:`find_slides` turns slides, folders of slides and a list file into
slide paths; :func:`plan_outputs` gives each its own output folder, and
:func:`~wsiseg.run.job.prepare_run` makes their jobs. :func:`run_jobs` runs
prepared jobs with one executor (:func:`~wsiseg.run.slides.run_slide`
each: inline one after the other, or ``parallel`` threads of this driver
sharing one cluster), skips those whose output was
complete, resumes interrupted ones, records a slide that fails with a
:class:`~wsiseg.errors.WsisegError` and goes on, and writes ``manifest.csv``;
one slide is a cohort of one without a manifest, whose error ends the run.
:func:`run_segment` runs them inline when they are small, else starts
a cluster for them: what ``wsiseg segment`` calls. :func:`segment_cohort` does both on a client of the caller's.
"""

from __future__ import annotations

import csv
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsiseg.config import RunOptions, TwoStageConfig
from wsiseg.errors import WsisegError
from wsiseg.run.driver import ProgressCallback
from wsiseg.run.inputs import one_line
from wsiseg.run.executors import DaskExecutor, Executor, InlineExecutor
from wsiseg.run.job import COMPLETE, INTERRUPTED, SegmentRun, SlideJob, for_given_flow, given_flow, prepare_cohort
from wsiseg.run.slides import run_slide
from wsiseg.run.report import RunReport, read_report

MANIFEST_NAME = "manifest.csv"
MANIFEST_FIELDS = ("slide", "output", "status", "tiles_total", "tiles_refined", "seconds", "error")

#: ``progress(slide, stage, done, total)``: :data:`~wsiseg.run.driver.ProgressCallback` naming its slide.
SlideProgress = Callable[[Path, str, int, int], None]


class _Stopped(BaseException):
    """Raised in a slide's thread when the cohort stops (an interruption or a failure elsewhere)."""


def write_manifest(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """``manifest.csv``: one row per slide, columns :data:`MANIFEST_FIELDS`."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


@dataclass
class SlideOutcome:
    """How one job of a run ended.

    Attributes
    ----------
    job : SlideJob
    status : str
        ``done``, ``resumed``, ``skipped`` (its output was complete) or ``failed``.
    report : RunReport or None
        The output's report (None when the slide failed).
    error : str
        Why it failed, on one line.
    seconds : float or None
        Wall seconds of its run (None when skipped).
    """

    job: SlideJob
    status: str
    report: RunReport | None = None
    error: str = ""
    seconds: float | None = None

    @property
    def warnings(self) -> list[str]:
        """The run's warnings, one line each (the report's, else the job's)."""
        return list(self.report.warnings) if self.report is not None else list(self.job.warnings)

    def row(self) -> dict[str, Any]:
        """The slide's manifest row (:data:`MANIFEST_FIELDS`)."""
        tiles = self.report.tiles if self.report is not None else None
        return {"slide": str(self.job.path), "output": str(self.job.output), "status": self.status,
                "tiles_total": tiles.total if tiles else "", "tiles_refined": tiles.refined if tiles else "",
                "seconds": "" if self.seconds is None else self.seconds, "error": self.error}


#: ``on_done(outcome)`` in the calling thread as each slide ends.
SlideDone = Callable[[SlideOutcome], None]


#: Images of at most this many working pixels run in this process, without a cluster, unless a
#: cluster is asked for (benchmarks/RESULTS.md, "One engine: in this process or on a cluster").
INLINE_MAX_PIXELS = 3072 * 3072


def runs_inline(run: SegmentRun, scheduler: str | None = None, workers: int | None = None) -> bool:
    """Whether ``run`` goes without a cluster: ``workers`` is 0, or no cluster was asked for
    (``--scheduler``, ``--workers N``) and every slide to segment is small (:data:`INLINE_MAX_PIXELS`
    working pixels at most)."""
    if scheduler:
        return False
    if workers is not None:
        return workers == 0
    return all(job.slide is None or job.working_pixels <= INLINE_MAX_PIXELS for job in run.jobs)


def run_segment(
    run: SegmentRun,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: SlideProgress | None = None,
    on_done: SlideDone | None = None,
) -> list[SlideOutcome]:
    """Run the prepared jobs: in this process when they are small (:func:`runs_inline`), else on a
    cluster started for them (:func:`wsiseg.cluster.start_client`) and closed after."""
    from wsiseg.cluster import start_client

    if runs_inline(run, scheduler, workers):
        return run_jobs(run, InlineExecutor(), progress, on_done)
    client = start_client(scheduler, workers)
    try:
        limit = next((job.options.max_in_flight for job in run.jobs), None)
        return run_jobs(run, DaskExecutor(client, limit), progress, on_done)
    finally:
        client.close()


def run_jobs(
    run: SegmentRun,
    executor: Executor,
    progress: SlideProgress | None = None,
    on_done: SlideDone | None = None,
) -> list[SlideOutcome]:
    """Run prepared jobs with ``executor``; their outcomes in job order.

    On a cluster ``run.parallel`` slides are in flight at once (one thread of
    this driver each); inline, one after the other. A cohort records a slide
    that fails with a :class:`~wsiseg.errors.WsisegError` and goes on, then
    writes ``manifest.csv``; one slide's error is raised. An interruption (or
    an unexpected error) stops the slides in flight at their next progress
    step, leaves their outputs resumable, writes no manifest and is re-raised.
    """
    if run.is_cohort:
        run.out_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    jobs = [(_run_one, job, executor, run.is_cohort, _slide_progress(job.path, progress, stop)) for job in run.jobs]
    parallel = 1 if isinstance(executor, InlineExecutor) else run.parallel
    outcomes = _run_threads(jobs, parallel, stop, on_done)
    if run.is_cohort:
        write_manifest([outcome.row() for outcome in outcomes], run.out_dir / MANIFEST_NAME)
    return outcomes


def segment_cohort(
    slides: Sequence[Path],
    out_dir: Path,
    client: Any = None,
    config: TwoStageConfig | None = None,
    options: RunOptions = RunOptions(),
    parallel: int = 1,
    progress: SlideProgress | None = None,
    on_done: SlideDone | None = None,
) -> list[dict[str, Any]]:
    """Segment ``slides`` into ``out_dir`` on a client of the caller's (None: in this process),
    ``parallel`` at a time on a cluster; write the manifest and return its rows (see
    :func:`~wsiseg.run.job.prepare_cohort`, :func:`run_jobs`)."""
    run = prepare_cohort(slides, out_dir, for_given_flow(options, config), given_flow(config), parallel)
    executor = InlineExecutor() if client is None else DaskExecutor(client, options.max_in_flight)
    return [outcome.row() for outcome in run_jobs(run, executor, progress, on_done)]


def _run_one(job: SlideJob, executor: Executor, record_errors: bool, progress: ProgressCallback) -> SlideOutcome:
    """One job: skipped, failed (recorded, in a cohort), or run."""
    if job.error is not None:
        return SlideOutcome(job, "failed", error=job.error, seconds=0.0)
    if job.state == COMPLETE:
        return SlideOutcome(job, "skipped", read_report(job.output))
    started = time.perf_counter()
    try:
        report = run_slide(job, executor, progress)
    except WsisegError as exc:
        if not record_errors:
            raise
        return SlideOutcome(job, "failed", error=one_line(exc), seconds=round(time.perf_counter() - started, 2))
    status = "resumed" if job.state == INTERRUPTED else "done"
    return SlideOutcome(job, status, report, seconds=round(time.perf_counter() - started, 2))


def _slide_progress(slide: Path, progress: SlideProgress | None, stop: threading.Event) -> ProgressCallback:
    """A slide's progress callback: stops its run once the others stop, passes the rest on."""

    def report(stage: str, done: int, total: int) -> None:
        if stop.is_set():
            raise _Stopped
        if progress:
            progress(slide, stage, done, total)

    return report


def _run_threads(
    jobs: Sequence[tuple[Callable[..., SlideOutcome], Any, ...]],
    parallel: int,
    stop: threading.Event,
    on_done: SlideDone | None,
) -> list[SlideOutcome]:
    """Run the jobs on ``parallel`` threads; their outcomes in job order."""
    outcomes: list[SlideOutcome | None] = [None] * len(jobs)
    if parallel <= 1:  # one after the other, in this thread
        for index, job in enumerate(jobs):
            outcomes[index] = job[0](*job[1:])
            if on_done:
                on_done(outcomes[index])
        return [outcome for outcome in outcomes if outcome is not None]
    pool = ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="wsiseg-slide")
    try:
        futures: dict[Future[Any], int] = {pool.submit(*job): index for index, job in enumerate(jobs)}
        for future in as_completed(futures):
            outcome = future.result()
            outcomes[futures[future]] = outcome
            if on_done:
                on_done(outcome)
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return [outcome for outcome in outcomes if outcome is not None]
