"""Whole slides on a Dask cluster, into OME-Zarr outputs.

:func:`segment_slide` opens the slide, reads the bundle's settings from its
header, has every worker load the bundle (and report its models' strides and
its malloc settings), plans the run (:mod:`wsiseg.run.plan`), takes the
output's lock, creates or reopens the output, runs the flow
(:mod:`wsiseg.run.driver`) with a :class:`~wsiseg.run.executors.DaskExecutor`,
then finishes the output: mask pyramid, NGFF metadata, overlay, optional
GeoJSON, and the report, written last so that an interrupted output never
looks complete. The workers' readers and arrays of the slide and output are
released at the end, whatever happened.

The process that calls it (the driver) never imports torch.
"""

from __future__ import annotations

import json
import math
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.bundle import DEFAULT_MODEL, inspect_bundle, resolve_model
from wsiseg.config import BundleSettings, RunOptions, TwoStageConfig
from wsiseg.errors import InputError
from wsiseg.guard import OutputLock, check_output_path, disk_full_error, not_a_folder_error
from wsiseg.output import (
    build_pyramid,
    open_array,
    prepare_output,
    remove_scratch,
    write_overlay,
    write_report,
)
from wsiseg.run.driver import ProgressCallback, run_flow
from wsiseg.run.executors import DaskExecutor, total_threads
from wsiseg.run.plan import ModelFacts, Plan, make_plan, working_scale
from wsiseg.run.report import build_report
from wsiseg.run.worker import (
    BundleModels,
    default_malloc,
    describe_bundle,
    malloc_settings,
    process_id,
    release_run,
)
from wsiseg.ngff import (
    MASK_GROUP,
    OBJECTS_GROUP,
    PROBABILITY_GROUP,
    REFINED_GROUP,
    TILE_SCORES_GROUP,
    TISSUE_GROUP,
    UNCERTAINTY_GROUP,
    write_image_metadata,
    write_label_metadata,
    write_labels_list,
    write_map_metadata,
)
from wsiseg.slide import Slide, open_slide


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


def model_reference(model: str | os.PathLike[str] | None) -> str:
    """A bundle path (resolved) or :data:`~wsiseg.bundle.DEFAULT_MODEL`."""
    if model is None or str(model) == DEFAULT_MODEL:
        return DEFAULT_MODEL
    return str(resolve_model(model))


def bundle_settings(model: str | os.PathLike[str] | None) -> BundleSettings:
    """A bundle's settings, read from its header only (no torch, no weights)."""
    ref = model_reference(model)
    return BundleSettings.from_config(inspect_bundle(resolve_model(ref))["config"], f"model bundle {ref!r}")


def segment_slide(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    client: Any,
    config: TwoStageConfig | None = None,
    options: RunOptions = RunOptions(),
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Segment one slide on a Dask cluster into an OME-Zarr output folder.

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
        The flow; default: the bundle's (:meth:`BundleSettings.for_slides`).
    options : RunOptions
    progress : callable, optional
        ``progress(stage, done, total)`` with stages ``"stage1"``,
        ``"stage2"`` (tiles written) and ``"finish"``.

    Returns
    -------
    dict
        The run report, also written to ``OUT.zarr/report.json``.
    """
    started = time.perf_counter()
    out = Path(out).absolute()
    slide = open_slide(path, options.backend)
    if options.mpp:
        slide = dataclasses.replace(slide, mpp=(options.mpp, options.mpp))
    model_ref = model_reference(options.model)
    settings = bundle_settings(model_ref)
    config = config or settings.for_slides()
    facts, model_info, warnings = _load_models_on_workers(client, model_ref, options.full_resolution)
    warnings += _bundle_warnings(settings)
    if settings.mpp and not slide.mpp and options.rescale:
        warnings.append(
            f"the model was trained at {settings.mpp:g} um/pixel but {Path(slide.path).name} records no pixel "
            "size, so it is segmented at its own pixels; give --mpp UM (micrometres per pixel) to match"
        )
    working, scale_note = working_scale(slide, settings.mpp, options.rescale)
    from wsiseg.cluster import torch_threads_per_host

    models = BundleModels(model_ref, options.device, torch_threads_per_host(client))
    plan = make_plan(slide, ZarrStore(str(out)), models, facts, config, options.full_resolution,
                     options.batch_size, working, options.pixels, options.tissue)
    signature = _signature(slide, plan, model_info["checksum"], config)
    with OutputLock(out):
        record, resumed = prepare_output(out, signature, plan.arrays(), options.overwrite, options.resume,
                                         inputs=[Path(slide.path)])
        if resumed and (out / "report.json").is_file():
            return json.loads((out / "report.json").read_text())  # nothing left to do
        executor = DaskExecutor(client, options.max_in_flight or max(8, 4 * total_threads(client)))
        try:
            flow = run_flow(plan, config.selection, executor, record, record.entries() if resumed else [],
                            options.tiles_per_task, progress)
            mark = time.perf_counter()
            classes = list(settings.classes or _default_classes(plan.num_classes))
            outputs = _finish(plan, out, flow.refined, classes, options, executor, client, progress)
            report = build_report(plan, config, options, flow, model_info, scale_note, classes, outputs,
                                  _describe(client), warnings)
            report["timings"] = {**flow.timings, "finish": time.perf_counter() - mark,
                                 "total": time.perf_counter() - started}
            write_report(out, report)
        except OSError as exc:
            error = disk_full_error(exc, out)
            if error is None:
                raise
            raise error from exc
        finally:
            _release(client, slide.path, str(out))
    return report


def _load_models_on_workers(
    client: Any, model_ref: str, full_resolution: bool
) -> tuple[ModelFacts, dict[str, Any], list[str]]:
    """Every worker loads (and checksums) the bundle now, in parallel; the first describes it.

    Returns
    -------
    (facts, model info, warnings)
        The warnings (one line each) say what of the workers' setup slows the run.
    """
    workers = _connected_workers(client)
    described = client.gather([
        client.submit(describe_bundle, model_ref, workers=[worker], allow_other_workers=True, pure=False)
        for worker in workers
    ])[0]
    roles = described["roles"]
    if full_resolution and "model" not in roles:
        raise InputError(
            "--full-resolution needs a bundle with a single full-resolution model (role 'model'); "
            f"this one holds {', '.join(sorted(roles))}"
        )
    if not full_resolution and not {"model1", "model2"} <= set(roles):
        raise InputError("this bundle holds no Model 1 / Model 2 pair; use --full-resolution with it")
    stage2 = roles["model" if full_resolution else "model2"]
    facts = ModelFacts(
        {role: facts["feature_stride"] for role, facts in roles.items()}, stage2["num_classes"],
        {role: facts["grid_stride"] for role, facts in roles.items()},
    )
    info = {"bundle": model_ref, "checksum": described["checksum"],
            "roles": {role: facts["spec"] for role, facts in roles.items()}}
    return facts, info, _malloc_warnings(client)


#: Seconds a run waits for a first worker to join a cluster that has none yet.
WORKER_WAIT_S = 60.0


def _connected_workers(client: Any) -> list[str]:
    """The addresses of the cluster's workers, waiting up to ``WORKER_WAIT_S`` for a first one
    (a scheduler started before its workers; a local cluster's workers still registering)."""
    workers = list(client.scheduler_info(n_workers=-1)["workers"])
    if workers:
        return workers
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except TimeoutError:
        raise InputError(
            f"the Dask cluster at {client.scheduler.address} has no workers after {WORKER_WAIT_S:g} s; "
            "start some with 'dask worker ADDRESS'"
        ) from None
    return list(client.scheduler_info(n_workers=-1)["workers"])


def _malloc_warnings(client: Any) -> list[str]:
    """One line when worker processes run with glibc's or the nanny's malloc settings.

    Workers that are threads of this process (a local cluster without
    processes) are left out: they run with the settings of the process the user started.
    """
    here = process_id()
    processes = client.run(process_id, on_error="ignore")  # a worker lost meanwhile is not judged
    settings = {address: found for address, found in client.run(malloc_settings, on_error="ignore").items()
                if address in processes and tuple(processes[address]) != here}
    slow = sum(default_malloc(found) for found in settings.values())
    if not slow:
        return []
    return [
        f"{slow} of {len(settings)} workers run with glibc's or Dask's default malloc settings, which slow "
        "torch 1.5-3x on the CPU; start them with DASK_CONFIG pointing to a folder holding "
        "examples/dask-worker.yaml (see README)"
    ]


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


def _default_classes(num_classes: int) -> list[str]:
    return ["background", "foreground"] if num_classes == 1 else [f"class {i}" for i in range(num_classes)]


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


def _finish(
    plan: Plan,
    out: Path,
    refined: np.ndarray,
    classes: list[str],
    options: RunOptions,
    executor: DaskExecutor,
    client: Any,
    progress: ProgressCallback | None,
) -> dict[str, Any]:
    """Pyramids, objects, NGFF metadata, overlay and GeoJSON; returns the report's ``outputs``.

    The root's ``multiscales`` are written last of the metadata: until then no
    NGFF reader takes the folder for an image.
    """
    from wsiseg.tile_tasks import copy_image_band

    steps = 4 + options.objects
    slide, mpp = plan.source, plan.source.mpp
    if not plan.image_from_stage1:
        rows, side = plan.image_shape[0], plan.tile_size
        executor.run_all(copy_image_band, [(plan, y, min(y + side, rows)) for y in range(0, rows, side)])
    image_levels = build_pyramid(out, "", plan.tile_size, executor.run_all, mean=True)
    mask_levels = build_pyramid(out, MASK_GROUP, plan.tile_size, executor.run_all)
    if progress:
        progress("finish", 1, steps)
    wy, wx = plan.work_downsample
    tile_step = (plan.tile_size * wy, plan.tile_size * wx)
    write_label_metadata(out, MASK_GROUP, mask_levels, (wy, wx), mpp, dict(enumerate(classes)))
    write_label_metadata(out, REFINED_GROUP, 1, tile_step, mpp, {0: "not refined", 1: "refined by Model 2"})
    labels = ["mask", "refined"]
    if plan.tissue_level is not None:
        ty, tx = plan.tissue_step
        write_label_metadata(out, TISSUE_GROUP, 1, (ty * wy, tx * wx), mpp, {0: "background", 1: "tissue"})
        labels.append("tissue")
    outputs: dict[str, Any] = {"image": {"pixels": options.pixels, "levels": image_levels,
                                         "shape_yx": list(plan.image_shape)},
                               "mask": MASK_GROUP, "levels": mask_levels, "refined": REFINED_GROUP,
                               "tissue": TISSUE_GROUP if plan.tissue_level is not None else None,
                               "overlay": "overlay.png"}
    if options.objects:
        from wsiseg.run.objects import write_objects

        outputs["objects"] = write_objects(plan, out, refined, options, executor, classes)
        write_label_metadata(out, OBJECTS_GROUP, outputs["objects"]["levels"], (wy, wx), mpp, None)
        labels.append("objects")
        if progress:
            progress("finish", 2, steps)
    write_labels_list(out, labels)
    if not plan.full_resolution:
        low_step = (plan.scale[0] * wy, plan.scale[1] * wx)
        write_map_metadata(out, PROBABILITY_GROUP, ("c", "y", "x"), low_step, mpp)
        write_map_metadata(out, UNCERTAINTY_GROUP, ("y", "x"), low_step, mpp)
        write_map_metadata(out, TILE_SCORES_GROUP, ("y", "x"), tile_step, mpp)
        outputs.update(probability=PROBABILITY_GROUP, uncertainty=UNCERTAINTY_GROUP, tile_scores=TILE_SCORES_GROUP)
    write_image_metadata(out, Path(slide.path).name, image_levels, plan.image_step, mpp)
    if options.geojson:
        if options.objects:
            outputs["geojson"] = outputs["objects"]["geojson"]
        else:
            from wsiseg.geojson import write_geojson

            outputs["geojson"] = write_geojson(out, plan.tile_size, classes, client, pixel_size=(wy, wx)).name
    if progress:
        progress("finish", steps - 2, steps)
    background = _thumbnail(out, image_levels)
    write_overlay(out, background, _mask_thumbnail(out, mask_levels, max(background.shape[:2])),
                  None if plan.full_resolution else refined, plan.tile_size, plan.work_shape)
    if progress:
        progress("finish", steps - 1, steps)
    remove_scratch(out)
    if progress:
        progress("finish", steps, steps)
    return outputs


def _release(client: Any, *paths: str) -> None:
    """Close every process's readers and arrays of this run (workers and this driver)."""
    release_run(*paths)
    try:
        client.run(release_run, *paths)
    except Exception:  # noqa: BLE001 - a worker lost at shutdown holds nothing any more
        pass


def _describe(client: Any) -> dict[str, Any]:
    from wsiseg.cluster import describe_client

    return describe_client(client)


def _thumbnail(out: Path, levels: int, max_side: int = 1024) -> np.ndarray:
    """A small RGB view ``(h, w, 3)`` uint8 of the slide, from the output's smallest fitting pixels level."""
    import dask.array as da

    level = next((n for n in range(levels) if max(open_array(out, str(n)).shape[1:]) <= 2 * max_side), levels - 1)
    source = da.from_zarr(open_array(out, str(level))).transpose(1, 2, 0)
    factor = max(1, math.ceil(max(source.shape[:2]) / max_side))
    if factor > 1:
        h, w = (source.shape[0] // factor) * factor, (source.shape[1] // factor) * factor
        if h and w:
            source = da.coarsen(np.mean, source[:h, :w], {0: factor, 1: factor}, trim_excess=True)
    return np.asarray(source.compute(scheduler="threads")).astype(np.uint8)


def _mask_thumbnail(out: Path, levels: int, size: int) -> np.ndarray:
    """The smallest mask level at least twice ``size`` (or 2048) on its longer side."""
    import zarr

    group = zarr.open_group(str(out / MASK_GROUP), mode="r")
    for level in range(levels):
        if max(group[str(level)].shape) <= max(2 * size, 2048) or level == levels - 1:
            return np.asarray(group[str(level)][...])
    raise AssertionError("unreachable")


def default_output(slide: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<out_dir or cwd>/<slide stem>.zarr``."""
    stem = Path(slide).name
    for suffix in (".ome.tiff", ".ome.tif", ".zarr"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        stem = Path(stem).stem
    return Path(out_dir or ".") / f"{stem}.zarr"


def segment_one(
    slide: Path,
    out: Path | None,
    overrides: dict[str, Any],
    options: RunOptions,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    on_start: Any = None,
) -> tuple[Path, dict[str, Any]]:
    """``wsiseg segment SLIDE``: check everything, start a cluster, segment, close it.

    The slide, the bundle and the output are checked before any cluster
    starts, so a bad argument costs nothing. (Folders, lists and several
    slides go to :func:`wsiseg.run.cohort.run_cohort`.)

    Parameters
    ----------
    out : Path or None
        The output (default ``./<name>.zarr``).
    overrides : dict
        :class:`TwoStageConfig` fields to change from the bundle's (None values ignored).
    on_start : callable, optional
        ``on_start(slide, output, warnings)`` once the checks pass; ``warnings``
        is the slide's :attr:`~wsiseg.slide.Slide.warnings` (one line each).

    Returns
    -------
    output, report
    """
    from wsiseg.cluster import start_client

    warnings = open_slide(slide, options.backend).warnings
    config = bundle_settings(options.model).for_slides().with_overrides(**overrides)
    output = out if out is not None else default_output(slide)
    check_output_path(output, [slide])
    if (output.exists() or output.is_symlink()) and not output.is_dir():
        raise not_a_folder_error(output)
    if output.exists() and not (options.overwrite or options.resume):
        raise InputError(f"{output} already exists; use --overwrite to replace it or --resume to continue it")
    client = start_client(scheduler, workers)
    try:
        if on_start:
            on_start(slide, output, warnings)
        return output, segment_slide(slide, output, client, config, options, progress)
    finally:
        client.close()
