"""The engine: one slide (or image) into an OME-Zarr output, with the executor given.

:func:`run_slide` runs one prepared :class:`~wsiseg.run.job.SlideJob` (the
slide opened, the flow resolved, the output checked): the executor loads the
bundle where its tasks run (:meth:`~wsiseg.run.executors.DaskExecutor.prepare_models`),
the run is planned (:mod:`wsiseg.run.plan`), the output's lock taken, the
output created or reopened, the flow run (:mod:`wsiseg.run.driver`), the
output finished (:mod:`wsiseg.run.finish`) and the report written last
(:mod:`wsiseg.run.report`), so that an interrupted output never looks
complete. The readers and arrays of the slide and output are released at
the end, whatever happened.

The executor decides where the tasks run: :class:`~wsiseg.run.executors.InlineExecutor`
in this process (small images: no cluster to start), or
:class:`~wsiseg.run.executors.DaskExecutor` on a Dask cluster, where the
process that drives the run never imports torch. A cohort is a loop over
:func:`run_slide` (:mod:`wsiseg.run.cohort`).
"""

from __future__ import annotations


import os
import time
from pathlib import Path
from typing import Any

from wsiseg.config import RunOptions, TwoStageConfig
from wsiseg.guard import OutputLock, disk_full_error
from wsiseg.output import open_array, prepare_output
from wsiseg.run.driver import ProgressCallback, run_flow
from wsiseg.run.executors import DaskExecutor, Executor, InlineExecutor
from wsiseg.run.finish import finish_output
from wsiseg.run.job import SlideJob, full_resolution_of, given_flow, model_reference, prepare_slide
from wsiseg.run.plan import Plan, make_plan
from wsiseg.run.report import RunReport, Timings, build_report, class_names, read_report, write_report
from wsiseg.run.worker import BundleModels
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
    client: Any = None,
    config: TwoStageConfig | None = None,
    options: RunOptions = RunOptions(),
    progress: ProgressCallback | None = None,
) -> RunReport:
    """Segment one slide into an OME-Zarr output folder: prepare its job, run it.

    Parameters
    ----------
    path : path
        The slide (any format :func:`~wsiseg.slide.open_slide` reads).
    out : path
        Output folder (``OUT.zarr``); never an input, never a folder wsiseg did not write.
    client : distributed.Client, optional
        From :func:`wsiseg.cluster.start_client`: the tasks run on its
        workers, and the slide, the bundle and ``out`` must be reachable at
        the same paths from every worker. None: in this process.
    config : TwoStageConfig, optional
        The flow, run as given; default: the bundle's, resolved for the slide
        (:func:`~wsiseg.config.resolve_flow`).
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
    options, overrides = full_resolution_of(model, for_given_flow(options, config), given_flow(config))
    job = prepare_slide(Path(path), Path(out), model, bundle_settings(model), overrides, options)
    executor = InlineExecutor() if client is None else DaskExecutor(client, options.max_in_flight)
    return run_slide(job, executor, progress)


def run_slide(job: SlideJob, executor: Executor, progress: ProgressCallback | None = None) -> RunReport:
    """Run a prepared job with ``executor``; the report, also written to ``OUT.zarr/report.json``."""
    started = time.perf_counter()
    options, config, out = job.options, job.config, job.output
    facts, model_info, executor_warnings = executor.prepare_models(job.model, options.full_resolution)
    models = BundleModels(job.model, options.device, executor.torch_threads())
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
        try:
            flow = run_flow(plan, config.selection, executor, record, record.entries() if resumed else [],
                            options.tiles_per_task, progress)
            mark = time.perf_counter()
            outputs = finish_output(plan, out, flow.refined, class_names(job, plan), options, executor, progress)
            timings = Timings(**flow.timings, finish=time.perf_counter() - mark, total=time.perf_counter() - started)
            report = build_report(job, plan, flow, model_info, outputs, executor.describe(), executor_warnings,
                                  timings)
            write_report(out, report)
        except OSError as exc:
            error = disk_full_error(exc, out)
            if error is None:
                raise
            raise error from exc
        finally:
            executor.release(job.slide.path, str(out))
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
