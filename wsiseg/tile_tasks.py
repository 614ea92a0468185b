"""The tile tasks of the two-stage flow, written once (the driver, :mod:`wsiseg.run.driver`, runs them).

1. **Stage 1** (:func:`stage1_block`). Model 1 segments one block of the
   image downsampled by the ratio (read with a halo, so block borders leave
   no seams) and the block's maps are stored: Model 1's class probabilities,
   their per-pixel uncertainty, and Model 1's features projected by Model 2's
   classifier (the context, see :mod:`wsiseg.inference`). The task returns
   the integrals of uncertainty over the full-resolution tile footprints the
   block covers.
2. **Score and select** (the driver, :mod:`wsiseg.run.driver`): a tile's
   score is its summed integrals over its area (the mean uncertainty of
   Model 1 over the tile); a :class:`~wsiseg.uncertainty.TileSelection`
   marks the tiles to refine.
3. **Stage 2** (:func:`read_pieces`, :func:`refine_tiles`). Read tasks
   decode, once each, the parts of the image the selected windows need;
   refine tasks assemble each selected tile's window (tile plus halo), sample
   Model 1's stored context for it, run Model 2, compose with Model 1's
   upsampled probabilities and write the tile's labels.
4. **Compose** (:func:`compose_tiles`). Unrefined tiles take Model 1's
   upsampled probabilities; a tile whose stage-1 crop has one label
   everywhere is written as a constant without upsampling.

Every task reads pixels from ``plan.source`` (a slide, or an image in
memory), reads and writes maps in ``plan.store`` (the OME-Zarr output, or
arrays in memory), and gets its models from ``plan.models``. The same
functions run inline (:func:`wsiseg.run.segment_image`, evaluation) and as
Dask tasks on a cluster (:func:`wsiseg.run.segment_slide`). Torch is
imported inside the tasks, so the driver that plans and submits them never
loads it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from wsiseg.ngff import COMPOSED, CONTEXT, IMAGE, MASK, PROBABILITY, TISSUE, UNCERTAINTY
from wsiseg.resample import read_scaled
from wsiseg.tiling import Box, blend_weights, round_up, stage1_crop
from wsiseg.uncertainty import probabilities_to_labels, tile_integrals, uniform_label, uncertainty_map

if TYPE_CHECKING:
    from wsiseg.run.plan import Plan

#: The maps a run stores are named by their paths in an OME-Zarr output (:mod:`wsiseg.ngff`).
__all__ = ["compose_tiles", "copy_image_band", "detect_tissue_task", "read_pieces", "refine_tiles", "stage1_background",
           "stage1_block"]

#: Decoded pixels of part of the image: ``(box, (h, w, 3) uint8)``.
Piece = tuple[Box, np.ndarray]


def copy_image_band(plan: Plan, y0: int, y1: int) -> None:
    """Write rows ``[y0, y1)`` of the output's pixels (IMAGE, ``(3, h, w)`` uint8) from the slide.

    For the images stage 1 does not write (:attr:`~wsiseg.run.plan.Plan.image_from_stage1`):
    a full-resolution copy, or the low-resolution view of a full-resolution run. One
    chunk at a time, so a band holds at most one chunk's pixels.
    """
    target = plan.store.array(IMAGE)
    step = target.chunks[-1]
    for x0 in range(0, target.shape[-1], step):
        box = Box(y0, y1, x0, min(x0 + step, target.shape[-1]))
        pixels = read_scaled(plan.source, plan.image_level, plan.image_coarsen, box)
        target[:, y0:y1, box.x0 : box.x1] = pixels.transpose(2, 0, 1)


def detect_tissue_task(plan: Plan) -> dict[str, Any]:
    """Detect tissue on the plan's thumbnail and store the mask (TISSUE, ``(th, tw)`` uint8 0/1).

    Runs once, before stage 1. Returns :meth:`~wsiseg.tissue.TissueResult.summary`.
    """
    from wsiseg.tissue import detect_tissue

    height, width = plan.tissue_shape
    thumbnail = read_scaled(plan.source, plan.tissue_level, plan.tissue_coarsen, Box(0, height, 0, width))
    result = detect_tissue(thumbnail)
    plan.store.array(TISSUE)[...] = result.mask.astype(np.uint8)
    return result.summary()


def stage1_block(plan: Plan, row: int, col: int) -> dict[str, Any]:
    """Model 1 on one low-resolution block (plus halo); store its maps.

    Returns
    -------
    dict
        ``r0, c0, sums, areas``: integrals of uncertainty over the tile
        footprints the block covers (see :func:`~wsiseg.uncertainty.tile_integrals`);
        ``timings`` (read, model, write seconds) and ``gflop``.
    """
    from wsiseg.inference import predict_tiles

    runner = plan.models.runner("model1")
    project = plan.models.runner(plan.stage2_role).model.project_context if plan.context else None
    grid = plan.stage1_grid
    block = grid.tile(row, col)
    reads: list[np.ndarray] = []
    read_seconds = [0.0]
    t0 = time.perf_counter()

    def read_window(window: Box) -> np.ndarray:
        t = time.perf_counter()
        reads.append(read_scaled(plan.source, plan.stage1_level, plan.stage1_coarsen, window))
        read_seconds[0] += time.perf_counter() - t
        return reads[-1]

    with runner.counting() as work:
        ((_, _, probs, projected),) = predict_tiles(
            runner, read_window, grid, plan.stage1_halo, [(row, col)], 1, project=project
        )
    t1 = time.perf_counter()
    probs = probs.numpy()
    uncertainty = uncertainty_map(probs, plan.uncertainty)
    store = plan.store
    store.array(PROBABILITY)[:, block.y0 : block.y1, block.x0 : block.x1] = probs
    store.array(UNCERTAINTY)[block.y0 : block.y1, block.x0 : block.x1] = uncertainty
    if plan.image_from_stage1 and store.has(IMAGE):  # the output's pixels: what Model 1 read, no extra decoding
        inner = block.relative_to(grid.window(row, col, round_up(plan.stage1_halo, runner.stride)))
        store.array(IMAGE)[:, block.y0 : block.y1, block.x0 : block.x1] = reads[0][inner.slices()].transpose(2, 0, 1)
    if projected is not None:
        fy0, fx0 = block.y0 // runner.stride, block.x0 // runner.stride
        store.array(CONTEXT)[:, fy0 : fy0 + projected.shape[1], fx0 : fx0 + projected.shape[2]] = projected.numpy()
    tiles = plan.grid
    r0, c0, sums, areas = tile_integrals(
        uncertainty, tiles.edges(0), tiles.edges(1), plan.stage1_scale, origin=(block.y0, block.x0)
    )
    timings = {"read": read_seconds[0], "model": t1 - t0 - read_seconds[0], "write": time.perf_counter() - t1}
    return {"r0": r0, "c0": c0, "sums": sums.tolist(), "areas": areas.tolist(), "timings": timings,
            "gflop": {"stage1": work["gflop"]}}


def stage1_background(plan: Plan, row: int, col: int) -> dict[str, Any]:
    """A glass block's maps without Model 1 (see :func:`~wsiseg.run.plan.stage1_blocks_needed`).

    Class 0's probability is 1 (a softmax model's; a binary model's P(foreground)
    is the fill value 0), the uncertainty and context are the fill value 0,
    and the output's pixels are written when they are the view stage 1 reads.
    Returns ``timings`` (read and write seconds).
    """
    block = plan.stage1_grid.tile(row, col)
    store = plan.store
    t0 = time.perf_counter()
    pixels = None
    if plan.image_from_stage1 and store.has(IMAGE):
        pixels = read_scaled(plan.source, plan.stage1_level, plan.stage1_coarsen, block)
    t1 = time.perf_counter()
    if plan.num_classes > 1:
        store.array(PROBABILITY)[0, block.y0 : block.y1, block.x0 : block.x1] = 1.0
    if pixels is not None:
        store.array(IMAGE)[:, block.y0 : block.y1, block.x0 : block.x1] = pixels.transpose(2, 0, 1)
    return {"timings": {"read": t1 - t0, "write": time.perf_counter() - t1}}


def read_pieces(plan: Plan, boxes: list[Box]) -> tuple[list[Piece], float]:
    """Decode full-resolution regions of one chunk of the tile grid, and the seconds it took.

    The boxes are the file-tile cells that selected windows need from the
    chunk, so each file tile is decoded once, and only when needed.
    """
    t0 = time.perf_counter()
    pieces = [(box, read_scaled(plan.source, plan.work_level, plan.work_coarsen, box)) for box in boxes]
    return pieces, time.perf_counter() - t0


def refine_tiles(
    plan: Plan,
    tiles: list[tuple[int, int]],
    neighbourhoods: list[np.ndarray],
    reads: list[tuple[list[Piece], float]],
) -> dict[str, Any]:
    """Model 2 (or the baseline) on a batch of selected tiles; compose; write their labels.

    Parameters
    ----------
    tiles : list of (row, col)
        Tiles whose windows share one shape (one batched forward pass).
    neighbourhoods : list of np.ndarray
        ``(3, 3)`` bool: which tiles around each one are refined (for blending).
    reads : list
        :func:`read_pieces` results covering every window.

    Returns
    -------
    dict
        ``tiles``, ``counts`` (label histogram per tile), ``timings``, ``gflop``.
    """
    from wsiseg.inference import compose_tile, context_reader, predict_tiles, upsample_stage1

    timings = {"read": sum(seconds for _, seconds in reads)}
    runner2 = plan.models.runner(plan.stage2_role)
    grid = plan.grid
    context_for = None
    context_seconds = [0.0]
    if plan.context:
        sample = context_reader(_map_reader(plan, CONTEXT), plan.context_shape, plan.stage1_scale, plan.stage1_stride, runner2.stride)

        def context_for(windows: list[Box], shape: tuple[int, int]) -> Any:
            t = time.perf_counter()
            context = sample(windows, shape)
            context_seconds[0] += time.perf_counter() - t
            return context

    flags = dict(zip(tiles, neighbourhoods))
    counts: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    with runner2.counting() as work:
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
            probs = compose_tile(
                lambda tile=tile: upsample_stage1(read_probs, plan.stage1_shape, plan.stage1_scale, tile), p2, weights
            )
        counts[f"{row},{col}"] = _write_labels(plan, tile, probs, tissue=_tissue_in(plan, tile))
    timings.update(model=t1 - t0 - context_seconds[0], context=context_seconds[0], compose=time.perf_counter() - t1)
    return {"tiles": [list(t) for t in tiles], "counts": counts, "timings": timings, "gflop": {"stage2": work["gflop"]}}


def compose_tiles(plan: Plan, tiles: list[tuple[int, int]]) -> dict[str, Any]:
    """Unrefined tiles: Model 1's upsampled probabilities to labels, written.

    The tiles' probability crops are read as one box, so each stored chunk is
    decoded once per task. A tile whose crop gives one label everywhere (see
    :func:`~wsiseg.uncertainty.uniform_label`; glass and empty background,
    most of a slide) is not upsampled, and when that label is background it
    is not written either: the mask's fill value is 0.
    """
    from wsiseg.inference import upsample_stage1

    t0 = time.perf_counter()
    boxes = [plan.grid.tile(row, col) for row, col in tiles]
    tissues = [_tissue_in(plan, tile) for tile in boxes]
    counts = {}
    for (row, col), tile, tissue in zip(tiles, boxes, tissues):
        if tissue is not None and not tissue.any():  # glass: background, the mask's fill value
            counts[f"{row},{col}"] = [0] * max(2, plan.num_classes)
            counts[f"{row},{col}"][0] = tile.shape[0] * tile.shape[1]
    # The rest take Model 1's probabilities (a full-resolution run composes glass tiles only).
    rest = [(rc, tile, tissue) for rc, tile, tissue in zip(tiles, boxes, tissues) if f"{rc[0]},{rc[1]}" not in counts]
    read = _stage1_reader(plan, [tile for _, tile, _ in rest]) if rest else None
    keep_probabilities = plan.store.has(COMPOSED)
    for (row, col), tile, tissue in rest:
        crop = np.asarray(read(stage1_crop(tile, plan.stage1_scale, plan.stage1_shape)))
        label = None if keep_probabilities else uniform_label(crop)
        if label is None:
            probs = upsample_stage1(read, plan.stage1_shape, plan.stage1_scale, tile).numpy()
            counts[f"{row},{col}"] = _write_labels(plan, tile, probs, tissue=tissue)
            continue
        if tissue is not None and label != 0:
            counts[f"{row},{col}"] = _write_labels(plan, tile, None, np.full(tile.shape, label, np.uint8), tissue)
            continue
        if label != 0:  # background is the mask's fill value: nothing to write
            plan.store.array(MASK)[tile.y0 : tile.y1, tile.x0 : tile.x1] = label
        counts[f"{row},{col}"] = [0] * max(2, plan.num_classes)
        counts[f"{row},{col}"][label] = tile.shape[0] * tile.shape[1]
    return {"tiles": [list(t) for t in tiles], "counts": counts, "timings": {"compose": time.perf_counter() - t0}}


def _assemble(window: Box, reads: list[tuple[list[Piece], float]]) -> np.ndarray:
    """A window's pixels from the pieces that cover it."""
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


def _write_labels(
    plan: Plan, tile: Box, probs: np.ndarray | None, labels: np.ndarray | None = None, tissue: np.ndarray | None = None
) -> list[int]:
    """Write a tile's labels (from ``probs``, ``(C, h, w)``, unless given as ``(h, w)`` uint8), and its
    probabilities when the store keeps them; where ``tissue`` (``(h, w)`` bool, see :func:`_tissue_in`)
    is False the label is 0. Returns its label histogram."""
    if probs is not None and plan.store.has(COMPOSED):
        plan.store.array(COMPOSED)[:, tile.y0 : tile.y1, tile.x0 : tile.x1] = probs
    if labels is None:
        labels = probabilities_to_labels(probs)
    if tissue is not None:
        labels = np.where(tissue, labels, 0).astype(labels.dtype)
    plan.store.array(MASK)[tile.y0 : tile.y1, tile.x0 : tile.x1] = labels
    return np.bincount(labels.ravel(), minlength=max(2, plan.num_classes)).tolist()


def _tissue_in(plan: Plan, tile: Box) -> np.ndarray | None:
    """``(h, w)`` bool tissue mask over a tile (nearest-sampled), or None without a tissue mask."""
    if plan.tissue_level is None:
        return None
    from wsiseg.tissue import sample_tissue

    return sample_tissue(plan.store.array(TISSUE), tile.y0, tile.y1, tile.x0, tile.x1, plan.tissue_step)


def _map_reader(plan: Plan, name: str) -> Callable[[Box], Any]:
    """``read(box) -> (C, bh, bw)`` float32 tensor of a stored low-resolution map."""
    import torch

    array = plan.store.array(name)
    return lambda box: torch.from_numpy(np.ascontiguousarray(array[:, box.y0 : box.y1, box.x0 : box.x1]))


def _stage1_reader(plan: Plan, tiles: list[Box]) -> Callable[[Box], Any]:
    """Model 1's stored probabilities over ``tiles``, read once over the union of their crops."""
    from wsiseg.inference import union_reader

    crops = [stage1_crop(tile, plan.stage1_scale, plan.stage1_shape) for tile in tiles]
    return union_reader(_map_reader(plan, PROBABILITY), crops)
