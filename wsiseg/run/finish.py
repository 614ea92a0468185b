"""Finishing a slide's output once its tiles are written: pyramids, objects, NGFF metadata, GeoJSON,
the overlay thumbnail; then the run's scratch is removed.

:func:`finish_output` is the last step of :func:`wsiseg.run.slides.run_job`
before the report. The root's ``multiscales`` are written last of the
metadata: until then no NGFF reader takes the folder for an image.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.config import RunOptions
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
from wsiseg.output import build_pyramid, open_array, remove_scratch, write_overlay
from wsiseg.run.driver import ProgressCallback
from wsiseg.run.plan import Plan


def finish_output(
    plan: Plan,
    out: Path,
    refined: np.ndarray,
    classes: list[str],
    options: RunOptions,
    executor: Any,
    progress: ProgressCallback | None,
) -> dict[str, Any]:
    """Pyramids, objects, NGFF metadata, GeoJSON and overlay; returns the report's ``outputs``."""
    steps = 4 + options.objects

    def step(done: int) -> None:
        if progress:
            progress("finish", done, steps)

    image_levels, mask_levels = _pyramids(plan, out, executor)
    step(1)
    outputs: dict[str, Any] = {"image": {"pixels": options.pixels, "levels": image_levels,
                                         "shape_yx": list(plan.image_shape)},
                               "mask": MASK_GROUP, "levels": mask_levels, "refined": REFINED_GROUP,
                               "tissue": TISSUE_GROUP if plan.tissue_level is not None else None,
                               "overlay": "overlay.png"}
    labels = _label_metadata(plan, out, mask_levels, classes)
    if options.objects:
        from wsiseg.run.objects import write_objects

        outputs["objects"] = write_objects(plan, out, refined, options, executor, classes)
        write_label_metadata(out, OBJECTS_GROUP, outputs["objects"]["levels"], plan.work_downsample, plan.source.mpp,
                             None)
        labels.append("objects")
        step(2)
    write_labels_list(out, labels)
    outputs.update(_map_metadata(plan, out))
    write_image_metadata(out, Path(plan.source.path).name, image_levels, plan.image_step, plan.source.mpp)
    if options.geojson:
        outputs["geojson"] = _geojson(plan, out, outputs, classes, options, executor.client)
    step(steps - 2)
    background = thumbnail(out, image_levels)
    write_overlay(out, background, mask_thumbnail(out, mask_levels, max(background.shape[:2])),
                  None if plan.full_resolution else refined, plan.tile_size, plan.work_shape)
    step(steps - 1)
    remove_scratch(out)
    step(steps)
    return outputs


def _pyramids(plan: Plan, out: Path, executor: Any) -> tuple[int, int]:
    """The pixels (copied from the slide where stage 1 did not write them) and the mask, as pyramids;
    their level counts."""
    from wsiseg.tile_tasks import copy_image_band

    if not plan.image_from_stage1:
        rows, side = plan.image_shape[0], plan.tile_size
        executor.run_all(copy_image_band, [(plan, y, min(y + side, rows)) for y in range(0, rows, side)])
    image_levels = build_pyramid(out, "", plan.tile_size, executor.run_all, mean=True)
    return image_levels, build_pyramid(out, MASK_GROUP, plan.tile_size, executor.run_all)


def _label_metadata(plan: Plan, out: Path, mask_levels: int, classes: list[str]) -> list[str]:
    """NGFF metadata of the mask, the refined-tile map and the tissue mask; the label images written."""
    mpp, (wy, wx) = plan.source.mpp, plan.work_downsample
    write_label_metadata(out, MASK_GROUP, mask_levels, (wy, wx), mpp, dict(enumerate(classes)))
    write_label_metadata(out, REFINED_GROUP, 1, (plan.tile_size * wy, plan.tile_size * wx), mpp,
                         {0: "not refined", 1: "refined by Model 2"})
    if plan.tissue_level is None:
        return ["mask", "refined"]
    ty, tx = plan.tissue_step
    write_label_metadata(out, TISSUE_GROUP, 1, (ty * wy, tx * wx), mpp, {0: "background", 1: "tissue"})
    return ["mask", "refined", "tissue"]


def _map_metadata(plan: Plan, out: Path) -> dict[str, str]:
    """NGFF metadata of Model 1's maps (none at full resolution); the report's ``outputs`` entries."""
    if plan.full_resolution:
        return {}
    mpp, (wy, wx) = plan.source.mpp, plan.work_downsample
    low_step = (plan.stage1_scale[0] * wy, plan.stage1_scale[1] * wx)
    write_map_metadata(out, PROBABILITY_GROUP, ("c", "y", "x"), low_step, mpp)
    write_map_metadata(out, UNCERTAINTY_GROUP, ("y", "x"), low_step, mpp)
    write_map_metadata(out, TILE_SCORES_GROUP, ("y", "x"), (plan.tile_size * wy, plan.tile_size * wx), mpp)
    return {"probability": PROBABILITY_GROUP, "uncertainty": UNCERTAINTY_GROUP, "tile_scores": TILE_SCORES_GROUP}


def _geojson(plan: Plan, out: Path, outputs: dict[str, Any], classes: list[str], options: RunOptions, client: Any) -> str:
    """The GeoJSON file's name: the objects' (written with them), else the mask's regions."""
    if options.objects:
        return outputs["objects"]["geojson"]
    from wsiseg.geojson import write_geojson

    return write_geojson(out, plan.tile_size, classes, client, pixel_size=plan.work_downsample).name


def thumbnail(out: Path, levels: int, max_side: int = 1024) -> np.ndarray:
    """A small RGB view ``(h, w, 3)`` uint8 of the slide, from the output's smallest fitting pixels level.

    That level is at most ``2 * max_side`` on its longer side (or the
    coarsest there is), so it is read whole and block-averaged in memory.
    """
    level = next((n for n in range(levels) if max(open_array(out, str(n)).shape[1:]) <= 2 * max_side), levels - 1)
    source = np.asarray(open_array(out, str(level))[...]).transpose(1, 2, 0)
    factor = max(1, math.ceil(max(source.shape[:2]) / max_side))
    h, w = (source.shape[0] // factor) * factor, (source.shape[1] // factor) * factor
    if factor > 1 and h and w:
        source = source[:h, :w].reshape(h // factor, factor, w // factor, factor, 3).mean(axis=(1, 3))
    return source.astype(np.uint8)


def mask_thumbnail(out: Path, levels: int, size: int) -> np.ndarray:
    """The smallest mask level at least twice ``size`` (or 2048) on its longer side."""
    import zarr

    group = zarr.open_group(str(out / MASK_GROUP), mode="r")
    for level in range(levels):
        if max(group[str(level)].shape) <= max(2 * size, 2048) or level == levels - 1:
            return np.asarray(group[str(level)][...])
    raise AssertionError("unreachable")
