"""The run report: one typed record of what ran, on what, how long, with which versions.

:class:`RunReport` is what a slide run returns and writes to ``report.json``
(:func:`write_report`), and what :func:`read_report` gives back to ``wsiseg
info``, cohorts, benchmarks and tests. Its tile counts (:class:`TileCounts`),
times (:class:`Timings`) and warnings have the same names as an in-memory
run's (:class:`~wsiseg.run.in_memory.SegmentationResult`).

Sizes are given as ``[height, width]`` (``y, x``), like every array of the output.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg import __version__
from wsiseg.domain import DomainEvidence, check_domain
from wsiseg.run.driver import FlowResult
from wsiseg.run.inputs import REPORT_NAME
from wsiseg.run.job import SlideJob
from wsiseg.run.plan import Plan

VERSIONED_PACKAGES = (
    "torch", "torchvision", "dask", "distributed", "zarr", "tifffile", "openslide-python", "openslide-bin", "numpy",
)


@dataclass
class TileCounts:
    """Tiles of a run: all, refined (by Model 2, or the baseline), and done by an earlier, interrupted run."""

    total: int
    refined: int
    refined_fraction: float
    resumed: int = 0

    @classmethod
    def of(cls, refined: np.ndarray, resumed: int = 0) -> TileCounts:
        """From the ``(rows, cols)`` bool map of refined tiles."""
        return cls(int(refined.size), int(refined.sum()), float(refined.mean()) if refined.size else 0.0, int(resumed))


@dataclass
class Timings:
    """Wall seconds per stage: stage 1 (tissue detection included), selection, stage 2 (composing included),
    finishing the output (slides) or composing alone (images in memory), and the whole run."""

    stage1: float = 0.0
    select: float = 0.0
    stage2: float = 0.0
    total: float = 0.0
    finish: float | None = None
    compose: float | None = None

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class InputInfo:
    """The slide: where, in what format and reader, its level sizes and pixel size, and what was
    wrong with it (``warnings``: levels dropped, ...)."""

    path: str
    format: str
    backend: str
    size_yx: list[int]
    levels_yx: list[list[int]]
    mpp_yx: list[float] | None
    warnings: list[str] = field(default_factory=list)


@dataclass
class RunReport:
    """``report.json`` of a slide run, typed. Nested records the report only passes on stay dicts.

    ``warnings`` are the run's, one line each: the slide's first (also under
    ``input``), then the bundle's and pixel size's, the workers', the domain check's.
    """

    status: str
    wsiseg_version: str
    warnings: list[str]
    input: InputInfo
    model: dict[str, Any]
    mode: str
    working_resolution: dict[str, Any]
    settings: dict[str, Any]
    stage1: dict[str, Any] | None
    tissue: dict[str, Any] | None
    domain: dict[str, Any] | None
    tiles: TileCounts
    label_pixels: dict[str, int]
    scheduler: dict[str, Any]
    versions: dict[str, str]
    outputs: dict[str, Any]
    #: Seconds inside tasks, summed over worker threads, per stage and part (read, model, ...).
    task_seconds: dict[str, dict[str, float]]
    #: Model work done in this session (not counting resumed tiles), per stage.
    model_gflop: dict[str, float]
    timings: Timings = field(default_factory=Timings)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``report.json`` (keys in this order)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(input=asdict(self.input), tiles=asdict(self.tiles), timings=self.timings.to_dict())
        return values

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunReport:
        """From :meth:`to_dict`'s object (``report.json``); keys unknown here are ignored."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values.update(input=InputInfo(**data["input"]), tiles=TileCounts(**data["tiles"]),
                      timings=Timings(**data.get("timings", {})))
        return cls(**values)


def write_report(out: Path, report: RunReport) -> Path:
    """Write ``OUT/report.json`` atomically: it marks the output complete (see :func:`wsiseg.output.write_json_atomic`)."""
    from wsiseg.output import write_json_atomic

    return write_json_atomic(Path(out) / REPORT_NAME, report.to_dict())


def read_report(out: str | Path) -> RunReport | None:
    """The report of output ``out``, or None where there is none (an unfinished or foreign folder)."""
    try:
        return RunReport.from_dict(json.loads((Path(out) / REPORT_NAME).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_report(
    job: SlideJob,
    plan: Plan,
    flow: FlowResult,
    model_info: dict[str, Any],
    outputs: dict[str, Any],
    scheduler: dict[str, Any],
    worker_warnings: Sequence[str] = (),
    timings: Timings | None = None,
) -> RunReport:
    """The report of a finished slide run of ``job``.

    Its warnings are the job's (the slide's, the bundle's, the pixel size's),
    then ``worker_warnings`` (the workers' setup), then the domain check's.
    """
    config, options = job.config, job.options
    classes = class_names(job, plan)
    slide = plan.source
    label_totals = np.zeros(max(2, plan.num_classes), np.int64)
    for histogram in flow.counts.values():
        label_totals[: len(histogram)] += np.asarray(histogram, np.int64)
    wy, wx = plan.work_downsample
    domain, domain_warnings = check_domain(job.settings.domain, DomainEvidence.of_flow(flow))
    return RunReport(
        status="complete",
        wsiseg_version=__version__,
        warnings=[*job.warnings, *worker_warnings, *domain_warnings],
        input=InputInfo(slide.path, slide.format, slide.backend, list(slide.shape),
                        [list(level.shape) for level in slide.levels], list(slide.mpp) if slide.mpp else None,
                        list(getattr(slide, "warnings", ()))),
        model=model_info,
        mode="full-resolution" if plan.full_resolution else "two-stage",
        working_resolution={"level": plan.work_level, "coarsen": plan.work_coarsen, "size_yx": list(plan.work_shape),
                            "downsample_yx": [wy, wx], **job.scale_note},
        settings={
            "selection": config.selection.describe(),
            "uncertainty": plan.uncertainty,
            "tile_size": plan.tile_size,
            "halo": plan.halo,
            "blend": plan.blend,
            "context": plan.context,
            "batch_size": options.batch_size or "auto (1 on the CPU, 4 on a GPU)",
            "tiles_per_task": options.tiles_per_task,
            "device": options.device,
            "tile_size_from": job.tile_size_note,
        },
        stage1=None if plan.full_resolution else {
            "level": plan.stage1_level, "coarsen": plan.stage1_coarsen, "scale": list(plan.stage1_scale), "shape": list(plan.stage1_shape),
            "blocks": plan.stage1_grid.num_tiles, "blocks_run": flow.stage1_blocks_run,
        },
        tissue=None if flow.tissue is None else {
            **(flow.tissue_summary or {}), "tiles": int((flow.tissue > 0).sum()),
            "refined_fraction": round(float(flow.refined[flow.tissue > 0].mean()), 4) if (flow.tissue > 0).any() else 0.0,
        },
        domain=domain,
        tiles=TileCounts.of(flow.refined, flow.resumed_tiles),
        label_pixels={str(c): int(n) for c, n in zip(classes, label_totals)},
        scheduler=scheduler,
        versions=versions(),
        outputs=outputs,
        task_seconds=flow.task_seconds,
        model_gflop=flow.gflop,
        timings=timings or Timings(),
    )


def class_names(job: SlideJob, plan: Plan) -> list[str]:
    """The mask's class names: the bundle's, else ``background, foreground`` or ``class i``."""
    if job.settings.classes:
        return list(job.settings.classes)
    return ["background", "foreground"] if plan.num_classes == 1 else [f"class {i}" for i in range(plan.num_classes)]


def versions() -> dict[str, str]:
    """Python's and the main packages' versions."""
    found = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found
