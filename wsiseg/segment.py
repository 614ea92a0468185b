"""Whole-slide two-stage segmentation as Dask tasks, written to OME-Zarr.

The flow of :mod:`wsiseg.two_stage`, out of core:

1. **Stage 1.** One task per low-resolution block reads the block plus a
   halo from the pyramid level whose downsample is closest to the ratio
   (coarsening a finer level by a whole factor when no level matches), runs
   Model 1 on it, writes Model 1's probabilities, uncertainty and features
   projected for Model 2 (see :mod:`wsiseg.two_stage`), and returns the
   integrals of uncertainty over the tile footprints it covers.
2. **Select** (in the driver): tile scores are the summed integrals over
   their areas; the selection marks the tiles to refine.
3. **Stage 2.** Read tasks decode, once each, the parts of the slide the
   selected windows need (a tile's chunk, or the strip of it inside a
   neighbour's halo); refine tasks take a few selected tiles, assemble their
   windows from those reads, sample Model 1's stored context, run Model 2,
   compose with Model 1's upsampled probabilities and write each tile's mask
   chunk. Compose tasks write the unrefined tiles from Model 1 alone. The
   mask's chunk grid is the tile grid, so no two tasks ever write one chunk.
4. **Finish:** mask pyramid (one task per band of chunks), NGFF metadata,
   overlay, report.

The driver submits work in row-major order with a bounded number of tasks
in flight, appending every finished piece to the run record so that
``resume=True`` continues an interrupted run without redoing finished tiles.
Models are loaded by each worker process once, from the bundle's path; the
driver itself never imports torch.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg import __version__
from wsiseg.errors import InputError
from wsiseg.output import (
    CONTEXT_ARRAY,
    LOWRES_ARRAY,
    ArraySpec,
    build_pyramid,
    open_array,
    prepare_output,
    remove_scratch,
    write_multiscales,
    write_overlay,
    write_report,
)
from wsiseg.slide import Slide, open_slide
from wsiseg.tiling import Box, TileGrid, blend_weights, neighbourhood, round_up
from wsiseg.uncertainty import TileSelection, scores_from_integrals, tile_integrals, uncertainty_map

ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SegmentOptions:
    """Settings of :func:`segment_slide`; None means "the bundle's value, else the default".

    Attributes
    ----------
    model : str or None
        Bundle path, or None / ``"wsiseg:default"`` for the shipped model.
    selection : TileSelection or None
        Which tiles Model 2 refines; None: the bundle's default threshold
        (``config["threshold"]``), else 0.25.
    full_resolution : bool
        Run the bundle's single model on every tile instead (the baseline).
    tile_size : int or None
        Full-resolution tile side; None picks a multiple of the slide's own
        tile size near the bundle's ``slide_tile_size`` (else 512), so that
        every file tile is decoded at most once.
    halo, ratio, uncertainty : optional
        Model 2's halo (pixels), Model 1's downsampling ratio, the
        uncertainty measure; defaults from the bundle (32, 4, entropy).
    blend : int
        Ramp width (pixels) between refined and unrefined tiles.
    batch_size : int or None
        Tiles per Model 2 forward pass; None: 1 on the CPU, 4 on a GPU
        (see :class:`~wsiseg.two_stage.ModelRunner`).
    tiles_per_task : int
        Selected tiles per Model 2 task (a task runs them in batches).
    stage1_block, stage1_halo : int
        Model 1's low-resolution block side and halo.
    device : str
        ``auto``, ``cpu`` or ``cuda`` on the workers.
    backend : str
        Slide reader (see :func:`wsiseg.slide.open_slide`).
    overwrite, resume : bool
        Replace an existing output, or continue an interrupted one.
    geojson : bool
        Also write ``mask.geojson`` (polygons QuPath imports).
    rescale : bool
        When both the slide's and the bundle's micrometres per pixel are
        known, work at the bundle's pixel size (a coarser level, or block
        means by a whole factor); a slide with coarser pixels than the model's
        is not upsampled.
    max_in_flight : int or None
        Tasks submitted ahead of completion (default 4 per worker thread).
    """

    model: str | None = None
    selection: TileSelection | None = None
    full_resolution: bool = False
    tile_size: int | None = None
    halo: int | None = None
    ratio: int | None = None
    uncertainty: str | None = None
    blend: int = 16
    batch_size: int | None = None
    tiles_per_task: int = 4
    stage1_block: int = 512
    stage1_halo: int = 32
    device: str = "auto"
    backend: str = "auto"
    overwrite: bool = False
    resume: bool = False
    geojson: bool = False
    rescale: bool = True
    max_in_flight: int | None = None


@dataclass(frozen=True)
class SlidePlan:
    """Everything a task needs, small and picklable (no models, no file handles)."""

    slide: Slide
    model_ref: str
    stage2_role: str
    out: str
    full_resolution: bool
    work_level: int
    work_coarsen: int
    tile_size: int
    halo: int
    blend: int
    level: int
    coarsen: int
    low_shape: tuple[int, int]
    scale: tuple[float, float]
    block: int
    stage1_halo: int
    stride1: int
    context_shape: tuple[int, int]
    uncertainty: str
    context: bool
    num_classes: int
    batch_size: int | None
    device: str
    torch_threads: dict[str, int]

    @property
    def work_shape(self) -> tuple[int, int]:
        """Size of the working resolution: level ``work_level`` coarsened by ``work_coarsen``."""
        h, w = self.slide.levels[self.work_level].shape
        return -(-h // self.work_coarsen), -(-w // self.work_coarsen)

    @property
    def work_downsample(self) -> tuple[float, float]:
        """Level-0 pixels per working pixel."""
        (h0, w0), (h, w) = self.slide.shape, self.work_shape
        return h0 / h, w0 / w

    @property
    def grid(self) -> TileGrid:
        return TileGrid(*self.work_shape, self.tile_size)

    @property
    def block_grid(self) -> TileGrid:
        return TileGrid(*self.low_shape, self.block)


# --------------------------------------------------------------------------- worker side

_CACHE_LOCK = threading.Lock()
_BUNDLES: dict[tuple[str, float], Any] = {}
_RUNNERS: dict[tuple[str, str, str], Any] = {}
_THREADS_SET: list[int] = []


def _setup_thread(plan: SlidePlan) -> None:
    """Set torch's threads for the calling task thread (see :func:`torch_threads_per_host`).

    The count is decided once per process, but applied in every task: torch's
    OpenMP thread count belongs to the thread that sets it, and a worker with
    several threads runs tasks on each of them.
    """
    import torch

    if not _THREADS_SET:
        try:
            from distributed import get_worker

            from wsiseg.cluster import worker_host

            threads = plan.torch_threads.get(worker_host(get_worker().address), 1)
        except (ImportError, ValueError):
            threads = max(1, os.cpu_count() or 1)
        _THREADS_SET.append(threads)
    if torch.get_num_threads() != _THREADS_SET[0]:
        torch.set_num_threads(_THREADS_SET[0])


def _bundle(model_ref: str) -> Any:
    """This process's copy of a bundle, loaded (and checksummed) once per file version."""
    from wsiseg.bundle import load_bundle, resolve_model

    path = resolve_model(model_ref)
    key = (str(path), path.stat().st_mtime)
    with _CACHE_LOCK:
        if key not in _BUNDLES:
            _BUNDLES[key] = load_bundle(path)
        return _BUNDLES[key]


def _runner(plan: SlidePlan, role: str) -> Any:
    """This process's :class:`ModelRunner` for a bundle role, loaded once."""
    from wsiseg.two_stage import ModelRunner

    _setup_thread(plan)
    key = (plan.model_ref, role, plan.device)
    runner = _RUNNERS.get(key)
    if runner is None:
        bundle = _bundle(plan.model_ref)
        with _CACHE_LOCK:
            runner = _RUNNERS.get(key)
            if runner is None:
                runner = ModelRunner(bundle.models[role], plan.device)
                _RUNNERS[key] = runner
    return runner


def describe_bundle(model_ref: str) -> dict[str, Any]:
    """What the driver needs to plan a run, computed where torch lives (a worker).

    Returns
    -------
    dict
        ``config``, ``checksum``, ``two_stage`` and, per role, ``spec``,
        ``num_classes``, ``feature_channels`` and ``feature_stride``.
    """
    bundle = _bundle(model_ref)
    return {
        "config": bundle.config,
        "checksum": bundle.checksum,
        "two_stage": bundle.is_two_stage,
        "roles": {
            role: {
                "spec": dict(model.spec),
                "num_classes": int(model.num_classes),
                "feature_channels": int(model.feature_channels),
                "feature_stride": int(model.feature_stride),
            }
            for role, model in bundle.models.items()
        },
    }


def read_scaled(slide: Slide, level: int, coarsen: int, box: Box) -> np.ndarray:
    """Pixels of ``box`` in the coordinates of ``level`` coarsened by ``coarsen``.

    Coarsened reads go in strips, so that no large region of the finer level
    is ever held at once.

    Returns
    -------
    np.ndarray
        ``(h, w, 3)`` uint8; block means of ``coarsen x coarsen`` level pixels.
    """
    from wsiseg.two_stage import downsample_mean

    if coarsen == 1:
        return slide.read_region(level, box)
    height, width = slide.levels[level].shape
    strip = max(1, 4096 // (coarsen * coarsen))
    pixels = np.empty((*box.shape, 3), np.uint8)
    for y in range(box.y0, box.y1, strip):
        y1 = min(y + strip, box.y1)
        source = Box(y * coarsen, min(y1 * coarsen, height), box.x0 * coarsen, min(box.x1 * coarsen, width))
        pixels[y - box.y0 : y1 - box.y0] = downsample_mean(slide.read_region(level, source), coarsen)
    return pixels


def task_stage1(plan: SlidePlan, row: int, col: int) -> dict[str, Any]:
    """Model 1 on one low-resolution block (plus halo), read from the slide.

    Writes the block's probabilities, uncertainty, projected context (for
    Model 2) and low-resolution pixels (for the thumbnail), and returns the
    integrals of uncertainty over the tile footprints it covers.
    """
    from wsiseg.two_stage import predict_tiles

    runner = _runner(plan, "model1")
    project = _runner(plan, plan.stage2_role).model.project_context if plan.context else None
    grid = plan.block_grid
    block = grid.tile(row, col)
    reads: list[np.ndarray] = []
    read_seconds = [0.0]
    t0 = time.perf_counter()

    def read_window(window: Box) -> np.ndarray:
        t = time.perf_counter()
        reads.append(read_scaled(plan.slide, plan.level, plan.coarsen, window))
        read_seconds[0] += time.perf_counter() - t
        return reads[-1]

    with runner.counting() as work:
        # The same call the in-memory engine makes per block (wsiseg.two_stage.predict_image).
        ((_, _, probs, projected),) = predict_tiles(runner, read_window, grid, plan.stage1_halo, [(row, col)], 1, project=project)
    t1 = time.perf_counter()
    probs = probs.numpy()
    uncertainty = uncertainty_map(probs, plan.uncertainty)
    open_array(plan.out, "probability/0")[:, block.y0 : block.y1, block.x0 : block.x1] = probs
    open_array(plan.out, "uncertainty/0")[block.y0 : block.y1, block.x0 : block.x1] = uncertainty
    inner = block.relative_to(grid.window(row, col, round_up(plan.stage1_halo, runner.stride)))
    open_array(plan.out, LOWRES_ARRAY)[block.y0 : block.y1, block.x0 : block.x1] = reads[0][inner.slices()]
    if projected is not None:
        fy0, fx0 = block.y0 // runner.stride, block.x0 // runner.stride
        open_array(plan.out, CONTEXT_ARRAY)[:, fy0 : fy0 + projected.shape[1], fx0 : fx0 + projected.shape[2]] = (
            projected.numpy()
        )
    tiles = plan.grid
    r0, c0, sums, areas = tile_integrals(
        uncertainty, tiles.edges(0), tiles.edges(1), plan.scale, origin=(block.y0, block.x0)
    )
    timings = {"read": read_seconds[0], "model": t1 - t0 - read_seconds[0], "write": time.perf_counter() - t1}
    return {"r0": r0, "c0": c0, "sums": sums.tolist(), "areas": areas.tolist(), "timings": timings,
            "gflop": {"stage1": work["gflop"]}}


Piece = tuple[Box, np.ndarray]


def task_read(plan: SlidePlan, boxes: list[Box]) -> tuple[list[Piece], float]:
    """Decode full-resolution regions of one chunk of the tile grid.

    The boxes are the file-tile cells that selected windows need from the
    chunk, so each file tile is decoded once, and only when needed.
    """
    t0 = time.perf_counter()
    pieces = [(box, read_scaled(plan.slide, plan.work_level, plan.work_coarsen, box)) for box in boxes]
    return pieces, time.perf_counter() - t0


def _assemble(window: Box, reads: list[tuple[list[Piece], float]]) -> np.ndarray:
    out = np.empty((*window.shape, 3), np.uint8)
    covered = np.zeros(window.shape, bool)
    for box, pixels in (piece for pieces, _ in reads for piece in pieces):
        y0, y1 = max(box.y0, window.y0), min(box.y1, window.y1)
        x0, x1 = max(box.x0, window.x0), min(box.x1, window.x1)
        if y0 >= y1 or x0 >= x1:
            continue
        out[y0 - window.y0 : y1 - window.y0, x0 - window.x0 : x1 - window.x0] = pixels[
            y0 - box.y0 : y1 - box.y0, x0 - box.x0 : x1 - box.x0
        ]
        covered[y0 - window.y0 : y1 - window.y0, x0 - window.x0 : x1 - window.x0] = True
    if not covered.all():
        raise RuntimeError(f"window {tuple(window)} was not fully read")  # a planning bug
    return out


def _write_labels(plan: SlidePlan, tile: Box, probs: np.ndarray) -> list[int]:
    from wsiseg.models.base import probabilities_to_labels

    labels = probabilities_to_labels(probs)
    open_array(plan.out, "mask/0")[tile.y0 : tile.y1, tile.x0 : tile.x1] = labels
    return np.bincount(labels.ravel(), minlength=max(2, plan.num_classes)).tolist()


def _map_reader(plan: SlidePlan, name: str) -> Callable[[Box], Any]:
    """``read(box) -> (C, bh, bw)`` tensor of a stored low-resolution map."""
    import torch

    array = open_array(plan.out, name)
    return lambda box: torch.from_numpy(np.asarray(array[:, box.y0 : box.y1, box.x0 : box.x1]))


def _stage1_reader(plan: SlidePlan, tiles: list[Box]) -> Callable[[Box], Any]:
    """Model 1's stored probabilities for :func:`~wsiseg.two_stage.upsample_stage1` over
    ``tiles``, read once over the union of their crops."""
    from wsiseg.two_stage import stage1_crop, union_reader

    crops = [stage1_crop(tile, plan.scale, plan.low_shape) for tile in tiles]
    return union_reader(_map_reader(plan, "probability/0"), crops)


def task_refine(
    plan: SlidePlan,
    tiles: list[tuple[int, int]],
    neighbourhoods: list[np.ndarray],
    reads: list[tuple[list[Piece], float]],
) -> dict[str, Any]:
    """Model 2 on a batch of selected tiles; compose; write their mask chunks."""
    from wsiseg.two_stage import compose_tile, context_reader, predict_tiles, upsample_stage1

    timings = {"read": sum(seconds for _, seconds in reads)}
    runner2 = _runner(plan, plan.stage2_role)
    grid = plan.grid
    context_for = None
    context_seconds = [0.0]
    if not plan.full_resolution and plan.context:
        sample = context_reader(
            _map_reader(plan, CONTEXT_ARRAY), plan.context_shape, plan.scale, plan.stride1, runner2.stride
        )

        def context_for(windows: list[Box], shape: tuple[int, int]) -> Any:
            t = time.perf_counter()
            context = sample(windows, shape)
            context_seconds[0] += time.perf_counter() - t
            return context

    flags = dict(zip(tiles, neighbourhoods))
    counts: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    with runner2.counting() as work2:
        predictions = list(predict_tiles(
            runner2, lambda w: _assemble(w, reads), grid, plan.halo, tiles, plan.batch_size, context_for
        ))
    t1 = time.perf_counter()
    read_probs = None if plan.full_resolution else _stage1_reader(plan, [grid.tile(r, c) for r, c in tiles])
    for row, col, p2, _ in predictions:
        tile = grid.tile(row, col)
        if plan.full_resolution:
            probs = p2.numpy()
        else:
            weights = blend_weights(flags[(row, col)], 1, 1, tile, plan.blend)
            probs = compose_tile(lambda tile=tile: upsample_stage1(read_probs, plan.low_shape, plan.scale, tile), p2, weights)
        counts[f"{row},{col}"] = _write_labels(plan, tile, probs)
    timings.update(model=t1 - t0 - context_seconds[0], context=context_seconds[0], compose=time.perf_counter() - t1)
    return {"tiles": [list(t) for t in tiles], "counts": counts, "timings": timings, "gflop": {"stage2": work2["gflop"]}}


def task_compose(plan: SlidePlan, tiles: list[tuple[int, int]]) -> dict[str, Any]:
    """Unrefined tiles: Model 1's upsampled probabilities to labels, written.

    The tiles' probability crops are read as one box, so each stored chunk is
    decoded once per task. A tile whose crop gives one label everywhere (see
    :func:`~wsiseg.models.base.uniform_label`; glass and empty background,
    most of a slide) is not upsampled, and when that label is background it
    is not written either: the mask's fill value is 0.
    """
    from wsiseg.models.base import uniform_label
    from wsiseg.two_stage import stage1_crop, upsample_stage1

    t0 = time.perf_counter()
    boxes = [plan.grid.tile(row, col) for row, col in tiles]
    read = _stage1_reader(plan, boxes)
    counts = {}
    for (row, col), tile in zip(tiles, boxes):
        label = uniform_label(read(stage1_crop(tile, plan.scale, plan.low_shape)).numpy())
        if label is None:
            counts[f"{row},{col}"] = _write_labels(plan, tile, upsample_stage1(read, plan.low_shape, plan.scale, tile).numpy())
            continue
        if label != 0:  # background is the mask's fill value: nothing to write
            open_array(plan.out, "mask/0")[tile.y0 : tile.y1, tile.x0 : tile.x1] = label
        counts[f"{row},{col}"] = [0] * max(2, plan.num_classes)
        counts[f"{row},{col}"][label] = tile.shape[0] * tile.shape[1]
    return {"tiles": [list(t) for t in tiles], "counts": counts, "timings": {"compose": time.perf_counter() - t0}}


# --------------------------------------------------------------------------- planning


#: Threshold for bundles that state none.
FALLBACK_THRESHOLD = 0.25


def default_selection(config: dict[str, Any]) -> TileSelection:
    """The selection used when none is given: the bundle's ``threshold``, else :data:`FALLBACK_THRESHOLD`."""
    return TileSelection.threshold(float(config.get("threshold", FALLBACK_THRESHOLD)))


def auto_tile_size(file_tile: tuple[int, int] | None, stride: int, target: int = 512) -> int:
    """A tile side near ``target``: a multiple of the model stride and, when such
    a multiple exists under ``2 * target``, of the file's own tile side too (so
    that no file tile straddles two of ours and none is decoded twice)."""
    if file_tile and file_tile[0] == file_tile[1]:
        unit = math.lcm(stride, int(file_tile[0]))
        if unit <= 2 * target:
            multiples = max(1, round(target / unit))
            return multiples * unit
    return round_up(target, stride)


def _signature(slide: Slide, plan_fields: dict[str, Any], checksum: str, selection: TileSelection) -> dict[str, Any]:
    stat = os.stat(slide.path)
    return {
        "slide": slide.path,
        "slide_bytes": stat.st_size,
        "slide_mtime": stat.st_mtime,
        "model_checksum": checksum,
        "selection": selection.describe(),
        **plan_fields,
    }


def _plan(
    slide: Slide, out: Path, options: SegmentOptions, client: Any
) -> tuple[SlidePlan, dict[str, Any], dict[str, Any]]:
    """The run's plan, the bundle's description (:func:`describe_bundle`) and the report's model entry.

    The bundle is loaded and checksummed by a worker, so the driver never
    imports torch (about 0.8 GB of resident memory with torchvision).
    """
    from wsiseg.bundle import DEFAULT_MODEL, resolve_model
    from wsiseg.cluster import torch_threads_per_host

    model_ref = str(resolve_model(options.model)) if options.model and options.model != DEFAULT_MODEL else DEFAULT_MODEL
    # One task per worker: every worker loads (and checksums) the bundle now, in parallel,
    # rather than in its first stage-1 task.
    workers = list(client.scheduler_info(n_workers=-1)["workers"])
    bundle = client.gather([
        client.submit(describe_bundle, model_ref, workers=[worker], allow_other_workers=True, pure=False)
        for worker in workers
    ])[0]
    config, roles = bundle["config"], bundle["roles"]
    if options.full_resolution:
        if "model" not in roles:
            raise InputError(
                "--full-resolution needs a bundle with a single full-resolution model (role 'model'); "
                f"this one holds {', '.join(sorted(roles))}"
            )
        stage2_role, model2, model1 = "model", roles["model"], None
    else:
        if not bundle["two_stage"]:
            raise InputError("this bundle holds no Model 1 / Model 2 pair; use --full-resolution with it")
        stage2_role, model2, model1 = "model2", roles["model2"], roles["model1"]
    stride2 = model2["feature_stride"]
    work_level, work_coarsen, scale_note = _working_scale(slide, config.get("mpp"), options.rescale)
    file_tile = slide.levels[work_level].tile_shape if work_coarsen == 1 else None
    # The bundle's "tile_size" is for its data set's images; slides take "slide_tile_size" or ~512.
    tile = options.tile_size or auto_tile_size(file_tile, stride2, int(config.get("slide_tile_size") or 512))
    if tile % stride2:
        raise InputError(f"--tile-size {tile} must be a multiple of the model's feature stride {stride2}")
    halo = round_up(options.halo if options.halo is not None else int(config.get("halo", 32)), stride2)
    if halo > tile:
        raise InputError(f"--halo {halo} must not exceed the tile size {tile}")
    ratio = int(options.ratio or config.get("ratio", 4))
    if ratio < 1:
        raise InputError(f"--ratio must be at least 1, got {ratio}")
    measure = options.uncertainty or str(config.get("uncertainty", "entropy"))
    work_h = -(-slide.levels[work_level].shape[0] // work_coarsen)
    work_w = -(-slide.levels[work_level].shape[1] // work_coarsen)
    work_ds = float(np.mean(slide.levels[work_level].downsample)) * work_coarsen
    if options.full_resolution:
        level, coarsen, low_shape, scale, block, stride1 = 0, 1, (1, 1), (1.0, 1.0), 1, 1
    else:
        level, coarsen = slide.best_level_for(ratio * work_ds)
        lh, lw = slide.levels[level].shape
        low_shape = (-(-lh // coarsen), -(-lw // coarsen))
        scale = (work_h / lh * coarsen, work_w / lw * coarsen)
        stride1 = model1["feature_stride"]
        block = round_up(options.stage1_block, stride1)
    plan = SlidePlan(
        slide=slide,
        model_ref=model_ref,
        stage2_role=stage2_role,
        out=str(out),
        full_resolution=options.full_resolution,
        work_level=work_level,
        work_coarsen=work_coarsen,
        tile_size=tile,
        halo=halo,
        blend=options.blend,
        level=level,
        coarsen=coarsen,
        low_shape=low_shape,
        scale=scale,
        block=block,
        stage1_halo=options.stage1_halo,
        stride1=stride1,
        context_shape=(-(-low_shape[0] // stride1), -(-low_shape[1] // stride1)),
        uncertainty=measure,
        context=bool(config.get("context", True)) and not options.full_resolution,
        num_classes=model2["num_classes"],
        batch_size=options.batch_size,
        device=options.device,
        torch_threads=torch_threads_per_host(client),
    )
    model_info = {
        "pixel_scale": scale_note,
        "bundle": model_ref,
        "checksum": bundle["checksum"],
        "roles": {role: facts["spec"] for role, facts in roles.items()},
        "classes": config.get("classes"),
    }
    return plan, bundle, model_info


def _working_scale(slide: Slide, model_mpp: Any, rescale: bool) -> tuple[int, int, dict[str, Any]]:
    """Level and whole coarsening factor at which the slide matches the model's pixel size.

    Returns
    -------
    level, coarsen, note
        ``note`` says what was decided and why (for the report).
    """
    note: dict[str, Any] = {"model_mpp": model_mpp, "slide_mpp": list(slide.mpp) if slide.mpp else None}
    if not rescale or not model_mpp or not slide.mpp:
        note["decision"] = "native pixels" if rescale else "native pixels (rescaling off)"
        return 0, 1, note
    factor = float(model_mpp) / float(np.mean(slide.mpp))
    if factor < 1.5:
        note["decision"] = "native pixels" + (
            "" if factor > 1 / 1.5 else " (the slide's pixels are coarser than the model's; not upsampled)"
        )
        note["scale_mismatch"] = round(factor, 3)
        return 0, 1, note
    level, coarsen = slide.best_level_for(float(round(factor)))
    done = float(np.mean(slide.levels[level].downsample)) * coarsen
    note.update(decision=f"downsampled by {done:.3g} to the model's pixel size", scale_mismatch=round(factor / done, 3))
    return level, coarsen, note


def _arrays(plan: SlidePlan) -> list[ArraySpec]:
    grid = plan.grid
    t = plan.tile_size
    arrays = [
        ArraySpec("mask/0", plan.work_shape, (t, t), "uint8"),
        ArraySpec("refined/0", grid.shape, grid.shape, "uint8"),
    ]
    if not plan.full_resolution:
        b, (h, w), c = plan.block, plan.low_shape, plan.num_classes
        arrays += [
            ArraySpec("probability/0", (c, h, w), (c, b, b), "float32"),
            ArraySpec("uncertainty/0", (h, w), (b, b), "float32"),
            ArraySpec("tile_scores/0", grid.shape, grid.shape, "float32"),
            ArraySpec(LOWRES_ARRAY, (h, w, 3), (b, b, 3), "uint8"),
        ]
        if plan.context:
            fb = plan.block // plan.stride1
            arrays.append(ArraySpec(CONTEXT_ARRAY, (c, *plan.context_shape), (c, fb, fb), "float32"))
    return arrays


# --------------------------------------------------------------------------- driver


class _Submitter:
    """Submits jobs lazily, keeping at most ``limit`` running; yields results in completion order."""

    def __init__(self, client: Any, limit: int) -> None:
        from distributed import as_completed

        self.client = client
        self.limit = limit
        self.running = as_completed([], with_results=False)
        self.all: list[Any] = []

    def run(self, jobs: Iterator[tuple[Callable[..., Any], tuple[Any, ...], Any]]) -> Iterator[tuple[Any, Any]]:
        in_flight: dict[Any, Any] = {}
        jobs = iter(jobs)
        exhausted = False

        def fill() -> None:
            nonlocal exhausted
            while not exhausted and len(in_flight) < self.limit:
                try:
                    fn, args, meta = next(jobs)
                except StopIteration:
                    exhausted = True
                    return
                future = self.client.submit(fn, *args, pure=False)
                in_flight[future.key] = meta
                self.running.add(future)

        fill()
        if not in_flight:
            return
        for future in self.running:
            meta = in_flight.pop(future.key)
            result = future.result()
            future.release()
            fill()
            yield meta, result
            if not in_flight and exhausted:
                return

    def cancel(self) -> None:
        try:
            self.running.clear()
        except Exception:  # noqa: BLE001 - best effort on shutdown
            pass


def segment_slide(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: SegmentOptions,
    client: Any,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Segment one slide on a Dask cluster into an OME-Zarr output folder.

    Parameters
    ----------
    path : path
        The slide (any format :func:`~wsiseg.slide.open_slide` reads).
    out : path
        Output folder (``OUT.zarr``).
    options : SegmentOptions
    client : distributed.Client
        From :func:`wsiseg.cluster.start_client`. The slide, the bundle and
        ``out`` must be reachable at the same paths from every worker.
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
    plan, bundle, model_info = _plan(slide, out, options, client)
    if options.selection is None:
        options = replace(options, selection=default_selection(bundle["config"]))
    fields = {
        k: v for k, v in asdict(plan).items()
        if k not in ("slide", "model_ref", "out", "device", "torch_threads", "stage2_role")
    }
    signature = _signature(slide, fields, bundle["checksum"], options.selection)
    record, resumed = prepare_output(out, signature, _arrays(plan), options.overwrite, options.resume)
    if resumed and (out / "report.json").is_file():
        return json.loads((out / "report.json").read_text())  # nothing left to do
    entries = record.entries() if resumed else []
    limit = options.max_in_flight or max(8, 4 * _total_threads(client))
    submitter = _Submitter(client, limit)
    timings: dict[str, float] = {}
    task_seconds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    gflop: dict[str, list[float]] = defaultdict(list)  # per task; summed with fsum: independent of arrival order

    def add_task_times(stage: str, result: Any) -> None:
        for key, value in (result.get("timings", {}) if isinstance(result, dict) else {}).items():
            task_seconds[stage][key] += value
        for key, value in (result.get("gflop", {}) if isinstance(result, dict) else {}).items():
            gflop[key].append(value)

    try:
        grid = plan.grid
        sums, areas = np.zeros(grid.shape), np.zeros(grid.shape)
        if not plan.full_resolution:
            mark = time.perf_counter()
            blocks = list(plan.block_grid.tiles())
            done_stage1 = {tuple(e["stage1"]): e for e in entries if "stage1" in e}
            todo = [b for b in blocks if b not in done_stage1]
            results = list(done_stage1.values())
            count = len(blocks) - len(todo)
            for meta, result in submitter.run((task_stage1, (plan, r, c), (r, c)) for r, c in todo):
                entry = {"stage1": list(meta), **{k: result[k] for k in ("r0", "c0", "sums", "areas")}}
                record.append(entry)
                results.append(entry)
                add_task_times("stage1", result)
                count += 1
                if progress:
                    progress("stage1", count, len(blocks))
            for entry in results:
                s, a = np.asarray(entry["sums"]), np.asarray(entry["areas"])
                if s.size:
                    r0, c0 = entry["r0"], entry["c0"]
                    sums[r0 : r0 + s.shape[0], c0 : c0 + s.shape[1]] += s
                    areas[r0 : r0 + a.shape[0], c0 : c0 + a.shape[1]] += a
            timings["stage1"] = time.perf_counter() - mark

        mark = time.perf_counter()
        if plan.full_resolution:
            scores = None
            refined = np.ones(grid.shape, bool)
        else:
            scores = scores_from_integrals(sums, areas)
            refined = options.selection.select(scores)
            open_array(out, "tile_scores/0")[...] = scores
        open_array(out, "refined/0")[...] = refined.astype(np.uint8)
        timings["select"] = time.perf_counter() - mark

        mark = time.perf_counter()
        counts: dict[str, list[int]] = {}
        for e in entries:
            counts.update(e.get("counts", {}))
        done_tiles = {tuple(t) for e in entries for t in e.get("tiles", [])}
        resumed_tiles = len(done_tiles)
        total = grid.num_tiles
        written = len(done_tiles)
        jobs = _stage2_jobs(plan, refined, done_tiles, options.tiles_per_task, client)
        for _, result in submitter.run(jobs):
            record.append({"tiles": result["tiles"], "counts": result["counts"]})
            counts.update(result["counts"])
            add_task_times("stage2", result)
            written += len(result["tiles"])
            if progress:
                progress("stage2", written, total)
        timings["stage2"] = time.perf_counter() - mark
    except BaseException:
        submitter.cancel()
        raise

    mark = time.perf_counter()
    report = _finish(plan, out, refined, scores, counts, model_info, options, client, progress)
    timings["finish"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started
    report["tiles"]["resumed"] = resumed_tiles
    report["timings"] = timings
    # Seconds inside tasks, summed over worker threads, per stage and part (read, model, ...).
    report["task_seconds"] = {stage: dict(parts) for stage, parts in task_seconds.items()}
    report["model_gflop"] = {key: math.fsum(values) for key, values in gflop.items()}  # work done in this session (not counting resumed tiles)
    write_report(out, report)
    return report


def _total_threads(client: Any) -> int:
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))


def _stage2_jobs(
    plan: SlidePlan, refined: np.ndarray, done: set[tuple[int, int]], tiles_per_task: int, client: Any
) -> Iterator[tuple[Callable[..., Any], tuple[Any, ...], Any]]:
    """Refine and compose jobs in row-major order, with their read tasks.

    Each chunk of the tile grid that a selected window overlaps is read by
    one task, covering the union of what the windows need from it, so every
    file tile is decoded at most once (when tiles align with file tiles).
    """
    grid = plan.grid
    rows, cols = grid.shape
    # Batches: selected tiles grouped by window shape (batched forward passes),
    # unrefined tiles in runs; both in row-major order.
    batches: list[tuple[str, list[tuple[int, int]]]] = []
    pending: dict[Any, list[tuple[int, int]]] = defaultdict(list)
    compose_size = max(4 * tiles_per_task, 16)
    for row, col in grid.tiles():
        if (row, col) in done:
            continue
        key: Any = grid.window(row, col, plan.halo).shape if refined[row, col] else "compose"
        pending[key].append((row, col))
        limit = tiles_per_task if key != "compose" else compose_size
        if len(pending[key]) == limit:
            batches.append(("compose" if key == "compose" else "refine", pending.pop(key)))
    for key, tiles in pending.items():
        batches.append(("compose" if key == "compose" else "refine", tiles))
    batches.sort(key=lambda b: b[1][0])
    # What each chunk must provide: the file-tile cells inside it that a
    # selected window overlaps (the whole overlap when the file is not tiled).
    cell = _read_cell(plan)
    needs: dict[tuple[int, int], set[Box]] = defaultdict(set)
    chunk_users: dict[tuple[int, int], int] = defaultdict(int)
    batch_chunks: list[list[tuple[int, int]]] = []
    for kind, tiles in batches:
        chunks: set[tuple[int, int]] = set()
        if kind == "refine":
            for row, col in tiles:
                window = grid.window(row, col, plan.halo)
                for r in range(max(0, row - 1), min(rows, row + 2)):
                    for c in range(max(0, col - 1), min(cols, col + 2)):
                        part = _intersect(grid.tile(r, c), window)
                        if part is None:
                            continue
                        needs[(r, c)].update(_cells(part, grid.tile(r, c), cell))
                        chunks.add((r, c))
        for chunk in chunks:
            chunk_users[chunk] += 1
        batch_chunks.append(sorted(chunks))
    reads: dict[tuple[int, int], Any] = {}
    for (kind, tiles), chunks in zip(batches, batch_chunks):
        if kind == "compose":
            yield task_compose, (plan, tiles), tiles
            continue
        pieces = []
        for chunk in chunks:
            if chunk not in reads:
                reads[chunk] = client.submit(task_read, plan, sorted(needs[chunk]), pure=False)
            pieces.append(reads[chunk])
        neighbourhoods = [neighbourhood(refined, r, c) for r, c in tiles]
        yield task_refine, (plan, tiles, neighbourhoods, pieces), tiles
        for chunk in chunks:
            chunk_users[chunk] -= 1
            if chunk_users[chunk] == 0:
                del reads[chunk]  # the scheduler keeps it until its users finish


def _intersect(a: Box, b: Box) -> Box | None:
    box = Box(max(a.y0, b.y0), min(a.y1, b.y1), max(a.x0, b.x0), min(a.x1, b.x1))
    return box if box.y0 < box.y1 and box.x0 < box.x1 else None


def _read_cell(plan: SlidePlan) -> int | None:
    """The file's tile side when our tiles are made of whole file tiles, else None."""
    tile = plan.slide.levels[plan.work_level].tile_shape
    if plan.work_coarsen == 1 and tile and tile[0] == tile[1] and plan.tile_size % tile[0] == 0:
        return int(tile[0])
    return None


def _cells(part: Box, chunk: Box, cell: int | None) -> list[Box]:
    """File-tile cells (clipped to ``chunk``) that ``part`` overlaps; ``[part]`` without cells."""
    if cell is None:
        return [part]
    return [
        _intersect(Box(cy * cell, (cy + 1) * cell, cx * cell, (cx + 1) * cell), chunk)
        for cy in range(part.y0 // cell, -(-part.y1 // cell))
        for cx in range(part.x0 // cell, -(-part.x1 // cell))
    ]


def _finish(
    plan: SlidePlan,
    out: Path,
    refined: np.ndarray,
    scores: np.ndarray | None,
    counts: dict[str, list[int]],
    model_info: dict[str, Any],
    options: SegmentOptions,
    client: Any,
    progress: ProgressCallback | None,
) -> dict[str, Any]:
    """Pyramid, NGFF metadata, overlay; returns the report (written by the caller)."""
    slide = plan.slide
    classes = model_info.get("classes") or (
        ["background", "foreground"] if plan.num_classes == 1 else [f"class {i}" for i in range(plan.num_classes)]
    )
    levels = build_pyramid(out, "mask", plan.tile_size, lambda function, calls: _run_all(client, function, calls))
    if progress:
        progress("finish", 1, 3)
    wy, wx = plan.work_downsample
    write_multiscales(out, "mask", ["y", "x"], levels, (wy, wx), slide.mpp, labels=dict(enumerate(classes)))
    tile_step = (plan.tile_size * wy, plan.tile_size * wx)
    write_multiscales(out, "refined", ["y", "x"], 1, tile_step, slide.mpp)
    if not plan.full_resolution:
        low_step = (plan.scale[0] * wy, plan.scale[1] * wx)
        write_multiscales(out, "probability", ["c", "y", "x"], 1, low_step, slide.mpp)
        write_multiscales(out, "uncertainty", ["y", "x"], 1, low_step, slide.mpp)
        write_multiscales(out, "tile_scores", ["y", "x"], 1, tile_step, slide.mpp)
    geojson = None
    if options.geojson:
        from wsiseg.geojson import write_geojson

        geojson = write_geojson(out, plan.tile_size, list(classes), client, pixel_size=(wy, wx)).name
    background = _thumbnail(plan, out)
    mask_thumb = _mask_thumbnail(out, levels, max(background.shape[:2]))
    write_overlay(out, background, mask_thumb, refined if not plan.full_resolution else None)
    if progress:
        progress("finish", 2, 3)
    remove_scratch(out)
    label_totals = np.zeros(max(2, plan.num_classes), np.int64)
    for value in counts.values():
        label_totals[: len(value)] += np.asarray(value, np.int64)
    if progress:
        progress("finish", 3, 3)
    return {
        "status": "complete",
        "wsiseg_version": __version__,
        "input": {
            "path": slide.path,
            "format": slide.format,
            "backend": slide.backend,
            "size": [slide.shape[1], slide.shape[0]],
            "levels": [list(level.shape[::-1]) for level in slide.levels],
            "mpp": list(slide.mpp) if slide.mpp else None,
        },
        "model": model_info,
        "mode": "full-resolution" if plan.full_resolution else "two-stage",
        "working_resolution": {
            "level": plan.work_level,
            "coarsen": plan.work_coarsen,
            "size": [plan.work_shape[1], plan.work_shape[0]],
            "downsample": [wy, wx],
            **model_info.pop("pixel_scale"),
        },
        "settings": {
            "selection": options.selection.describe(),
            "uncertainty": plan.uncertainty,
            "tile_size": plan.tile_size,
            "halo": plan.halo,
            "blend": plan.blend,
            "batch_size": options.batch_size or "auto (1 on the CPU, 4 on a GPU)",
            "tiles_per_task": options.tiles_per_task,
            "device": plan.device,
        },
        "stage1": None if plan.full_resolution else {
            "level": plan.level,
            "coarsen": plan.coarsen,
            "scale": list(plan.scale),
            "shape": list(plan.low_shape),
        },
        "tiles": {
            "total": int(refined.size),
            "refined": int(refined.sum()),
            "refined_fraction": float(refined.mean()),
        },
        "label_pixels": {str(c): int(n) for c, n in zip(classes, label_totals)},
        "scheduler": _describe(client),
        "versions": _versions(),
        "outputs": {
            "mask": "mask", "levels": levels, "refined": "refined", "overlay": "overlay.png",
            **({"geojson": geojson} if geojson else {}),
            **({} if plan.full_resolution else {
                "probability": "probability", "uncertainty": "uncertainty", "tile_scores": "tile_scores"}),
        },
    }


def _run_all(client: Any, function: Callable[..., Any], calls: list[tuple[Any, ...]]) -> None:
    """``function(*args)`` for every entry of ``calls`` as Dask tasks; returns when all are done."""
    futures = [client.submit(function, *args, pure=False) for args in calls]
    client.gather(futures)


def _describe(client: Any) -> dict[str, Any]:
    from wsiseg.cluster import describe_client

    return describe_client(client)


def _thumbnail(plan: SlidePlan, out: Path, max_side: int = 1024) -> np.ndarray:
    """A small RGB view of the slide: from the low-resolution scratch, or the smallest level."""
    import dask.array as da

    if not plan.full_resolution:
        source = da.from_zarr(open_array(out, LOWRES_ARRAY))
    else:
        level = len(plan.slide.levels) - 1
        source = plan.slide.to_dask(level, 1024)
    factor = max(1, math.ceil(max(source.shape[:2]) / max_side))
    if factor > 1:
        h, w = (source.shape[0] // factor) * factor, (source.shape[1] // factor) * factor
        if h and w:
            source = da.coarsen(np.mean, source[:h, :w], {0: factor, 1: factor}, trim_excess=True)
    return np.asarray(source.compute()).astype(np.uint8)


def _mask_thumbnail(out: Path, levels: int, size: int) -> np.ndarray:
    import zarr

    group = zarr.open_group(str(out / "mask"), mode="r")
    for level in range(levels):
        if max(group[str(level)].shape) <= max(2 * size, 2048) or level == levels - 1:
            return np.asarray(group[str(level)][...])
    raise AssertionError("unreachable")


def _versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "dask", "distributed", "zarr", "tifffile", "openslide-python", "openslide-bin", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


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
