"""Whole slides on a Dask cluster, into OME-Zarr outputs.

:func:`run_job` runs one prepared :class:`~wsiseg.run.job.SlideJob` (the
slide opened, the settings resolved, the output checked): every worker loads
the bundle (:func:`~wsiseg.run.worker.load_models_on_workers`), the run is
planned (:mod:`wsiseg.run.plan`), the output's lock taken, the output created
or reopened, the flow run (:mod:`wsiseg.run.driver`) with a
:class:`~wsiseg.run.executors.DaskExecutor`, the output finished
(:mod:`wsiseg.run.finish`) and the report written last
(:mod:`wsiseg.run.report`), so that an interrupted output never looks
complete. The workers' readers and arrays of the slide and output are
released at the end, whatever happened.

The process that calls it (the driver) never imports torch.
"""

from __future__ import annotations


import os
import time
from pathlib import Path
from typing import Any

from wsiseg.cluster import describe_client, torch_threads_per_host
from wsiseg.config import RunOptions, TwoStageConfig
from wsiseg.guard import OutputLock, disk_full_error
from wsiseg.output import open_array, prepare_output
from wsiseg.run.driver import ProgressCallback, run_flow
from wsiseg.run.executors import DaskExecutor, total_threads
from wsiseg.run.finish import finish_output
from wsiseg.run.job import SlideJob, model_reference, prepare_slide
from wsiseg.run.plan import Plan, make_plan
from wsiseg.run.report import RunReport, Timings, build_report, class_names, read_report, write_report
from wsiseg.run.worker import BundleModels, load_models_on_workers, release_run
from wsiseg.slide import Slide


class ZarrStore:
    """The maps of an OME-Zarr output, opened once per process (see :func:`wsiseg.output.open_array`)."""

    def __init__(self, out: str) -> None:
        self.out = out
        self._present: dict[str, bool] = {}  # asked once per task copy, not once per tile

    def array(self, name: str) -> Any:
        return open_array(self.out, name)

    def has(self, name: str) -> bool:
        if name not in self._present:
            self._present[name] = os.path.isdir(os.path.join(self.out, name))
        return self._present[name]

    def __reduce__(self) -> tuple[Any, ...]:
        return ZarrStore, (self.out,)


def segment_slide(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    client: Any,
    config: TwoStageConfig | None = None,
    options: RunOptions = RunOptions(),
    progress: ProgressCallback | None = None,
) -> RunReport:
    """Segment one slide on a Dask cluster into an OME-Zarr output folder: prepare its job, run it.

    Parameters
    ----------
    path : path
        The slide (any format :func:`~wsiseg.slide.open_slide` reads).
    out : path
        Output folder (``OUT.zarr``); never an input, never a folder wsiseg did not write.
    client : distributed.Client
        From :func:`wsiseg.cluster.start_client`. The slide, the bundle and
        ``out`` must be reachable at the same paths from every worker.
    config : TwoStageConfig, optional
        The flow, run as given; default: the bundle's (:meth:`BundleSettings.for_slides`),
        with Model 1's ratio adapted to the slide's pixel size (:func:`~wsiseg.run.plan.model1_ratio`).
    options : RunOptions
    progress : callable, optional
        ``progress(stage, done, total)`` with stages ``"stage1"``,
        ``"stage2"`` (tiles written) and ``"finish"``.

    Returns
    -------
    RunReport
        The run report, also written to ``OUT.zarr/report.json``.
    """
    from wsiseg.run.job import bundle_settings, for_given_flow

    model = model_reference(options.model)
    settings = bundle_settings(model)
    job = prepare_slide(Path(path), Path(out), model, settings, config or settings.for_slides(),
                        for_given_flow(options, config))
    return run_job(job, client, progress)


def run_job(job: SlideJob, client: Any, progress: ProgressCallback | None = None) -> RunReport:
    """Run a prepared job on ``client``; the report, also written to ``OUT.zarr/report.json``."""
    started = time.perf_counter()
    options, config, out = job.options, job.config, job.output
    facts, model_info, worker_warnings = load_models_on_workers(client, job.model, options.full_resolution)
    models = BundleModels(job.model, options.device, torch_threads_per_host(client))
    plan = make_plan(job.slide, ZarrStore(str(out)), models, facts, config, options.full_resolution,
                     options.batch_size, job.working, options.pixels, options.tissue)
    signature = _signature(job.slide, plan, model_info["checksum"], config)
    with OutputLock(out):
        record, resumed = prepare_output(out, signature, plan.arrays(), options.overwrite, options.resume,
                                         inputs=[Path(job.slide.path)])
        if resumed:
            finished = read_report(out)
            if finished is not None:
                return finished  # nothing left to do
        executor = DaskExecutor(client, options.max_in_flight or max(8, 4 * total_threads(client)))
        try:
            flow = run_flow(plan, config.selection, executor, record, record.entries() if resumed else [],
                            options.tiles_per_task, progress)
            mark = time.perf_counter()
            outputs = finish_output(plan, out, flow.refined, class_names(job, plan), options, executor, client,
                                    progress)
            timings = Timings(**flow.timings, finish=time.perf_counter() - mark, total=time.perf_counter() - started)
            report = build_report(job, plan, flow, model_info, outputs, describe_client(client), worker_warnings,
                                  timings)
            write_report(out, report)
        except OSError as exc:
            error = disk_full_error(exc, out)
            if error is None:
                raise
            raise error from exc
        finally:
            _release(client, job.slide.path, str(out))
    return report


def _signature(slide: Slide, plan: Plan, checksum: str, config: TwoStageConfig) -> dict[str, Any]:
    """What must match for ``--resume`` to continue an output."""
    stat = os.stat(slide.path)
    return {
        "slide": slide.path,
        "slide_bytes": stat.st_size,
        "slide_mtime": stat.st_mtime,
        "model_checksum": checksum,
        "selection": config.selection.describe(),
        **plan.geometry(),
    }


def _release(client: Any, *paths: str) -> None:
    """Close every process's readers and arrays of this run (workers and this driver)."""
    release_run(*paths)
    try:
        client.run(release_run, *paths)
    except Exception:  # noqa: BLE001 - a worker lost at shutdown holds nothing any more
        pass
