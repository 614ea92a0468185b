"""The run report (``report.json``): what ran, on what, how long, with which versions.

Sizes are given as ``[height, width]`` (``y, x``), like every array of the output.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from wsiseg import __version__
from wsiseg.config import RunOptions, TwoStageConfig
from wsiseg.run.driver import FlowResult
from wsiseg.run.plan import Plan

#: A tile is uncertain when Model 1's mean uncertainty over it is at least this.
UNCERTAIN_TILE = 0.5
#: More than this fraction of uncertain tissue tiles and the run warns that the images look out of the
#: model's domain (measured in benchmarks/RESULTS.md, "Domain check").
OUT_OF_DOMAIN = 0.5

VERSIONED_PACKAGES = (
    "torch", "torchvision", "dask", "distributed", "zarr", "tifffile", "openslide-python", "openslide-bin", "numpy",
)


def build_report(
    plan: Plan,
    config: TwoStageConfig,
    options: RunOptions,
    flow: FlowResult,
    model_info: dict[str, Any],
    scale_note: dict[str, Any],
    classes: list[str],
    outputs: dict[str, Any],
    scheduler: dict[str, Any],
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """The report of a finished slide run (timings are added by the caller).

    ``warnings`` are the run's own (one line each: the workers' setup, the
    bundle); the domain check's is added to them; the slide's are under ``input``.
    """
    slide = plan.source
    label_totals = np.zeros(max(2, plan.num_classes), np.int64)
    for histogram in flow.counts.values():
        label_totals[: len(histogram)] += np.asarray(histogram, np.int64)
    wy, wx = plan.work_downsample
    domain, domain_warning = domain_check(flow)
    return {
        "status": "complete",
        "wsiseg_version": __version__,
        "warnings": [*warnings, *([domain_warning] if domain_warning else [])],
        "input": {
            "path": slide.path,
            "format": slide.format,
            "backend": slide.backend,
            "size_yx": list(slide.shape),
            "levels_yx": [list(level.shape) for level in slide.levels],
            "mpp_yx": list(slide.mpp) if slide.mpp else None,
            "warnings": list(getattr(slide, "warnings", ())),
        },
        "model": model_info,
        "mode": "full-resolution" if plan.full_resolution else "two-stage",
        "working_resolution": {
            "level": plan.work_level,
            "coarsen": plan.work_coarsen,
            "size_yx": list(plan.work_shape),
            "downsample_yx": [wy, wx],
            **scale_note,
        },
        "settings": {
            "selection": config.selection.describe(),
            "uncertainty": plan.uncertainty,
            "tile_size": plan.tile_size,
            "halo": plan.halo,
            "blend": plan.blend,
            "context": plan.context,
            "batch_size": options.batch_size or "auto (1 on the CPU, 4 on a GPU)",
            "tiles_per_task": options.tiles_per_task,
            "device": options.device,
        },
        "stage1": None if plan.full_resolution else {
            "level": plan.level,
            "coarsen": plan.coarsen,
            "scale": list(plan.scale),
            "shape": list(plan.low_shape),
        },
        "tissue": None if flow.tissue is None else {
            **(flow.tissue_summary or {}),
            "tiles": int((flow.tissue > 0).sum()),
        },
        "domain": domain,
        "tiles": {
            "total": int(flow.refined.size),
            "refined": int(flow.refined.sum()),
            "refined_fraction": float(flow.refined.mean()),
            "resumed": flow.resumed_tiles,
        },
        "label_pixels": {str(c): int(n) for c, n in zip(classes, label_totals)},
        "scheduler": scheduler,
        "versions": versions(),
        "outputs": outputs,
        # Seconds inside tasks, summed over worker threads, per stage and part (read, model, ...).
        "task_seconds": flow.task_seconds,
        "model_gflop": flow.gflop,  # work done in this session (not counting resumed tiles)
    }


def domain_check(flow: FlowResult) -> tuple[dict[str, Any] | None, str | None]:
    """How uncertain Model 1 was over the tissue tiles, and a warning line when most of them are uncertain.

    Returns
    -------
    (summary, warning)
        ``summary`` (None at full resolution): ``tissue_tiles``,
        ``mean_uncertainty`` and ``uncertain_fraction`` (tiles scoring at least
        :data:`UNCERTAIN_TILE`) over them, ``refined_fraction`` over them, ``limit``.
    """
    if flow.scores is None:
        return None, None
    on_tissue = np.ones(flow.scores.shape, bool) if flow.tissue is None else flow.tissue > 0
    summary: dict[str, Any] = {"tissue_tiles": int(on_tissue.sum()), "limit": OUT_OF_DOMAIN}
    if not on_tissue.any():
        return summary, None
    scores = flow.scores[on_tissue]
    uncertain = float((scores >= UNCERTAIN_TILE).mean())
    summary.update(mean_uncertainty=round(float(scores.mean()), 4), uncertain_fraction=round(uncertain, 4),
                   refined_fraction=round(float(flow.refined[on_tissue].mean()), 4))
    if uncertain <= OUT_OF_DOMAIN:
        return summary, None
    return summary, (
        f"the model is uncertain on {100 * uncertain:.0f} % of the tissue tiles (more than "
        f"{100 * OUT_OF_DOMAIN:.0f} %): these images look out of its domain, so its mask may be poor and the "
        "two-stage run saves little; fine-tune it on such images: wsiseg train --dataset folder "
        "--data-root DIR (DIR/images, DIR/masks) --init-from MODEL --stage all --image-size 0"
    )


def versions() -> dict[str, str]:
    """Python's and the main packages' versions."""
    found = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found
