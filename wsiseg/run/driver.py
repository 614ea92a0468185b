"""The two-stage flow, orchestrated once: stage 1, score, select, stage 2.

:func:`run_flow` submits the tile tasks of :mod:`wsiseg.tile_tasks` to an
executor (inline or Dask, :mod:`wsiseg.run.executors`) in row-major order,
accumulates stage 1's uncertainty integrals into tile scores, selects the
tiles to refine, then schedules reads, refinements and compositions so that
each file tile is decoded at most once. Every finished piece is appended to
a run record, so an interrupted run resumes without redoing finished work.

This module never imports torch: the process that plans a slide stays small.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from wsiseg.run.plan import Plan, stage1_blocks_needed
from wsiseg.tiling import Box, neighbourhood
from wsiseg.tissue import tile_tissue
from wsiseg.ngff import REFINED, TILE_SCORES, TISSUE
from wsiseg.tile_tasks import (
    compose_tiles, detect_tissue_task, read_pieces, refine_tiles, stage1_background, stage1_block,
)
from wsiseg.uncertainty import TileSelection, scores_from_integrals

#: ``progress(stage, done, total)``: stage ``"stage1"`` (blocks), ``"stage2"`` (tiles) or ``"finish"``.
ProgressCallback = Callable[[str, int, int], None]


class Record(Protocol):
    """Where finished work is noted (see :class:`wsiseg.output.RunRecord`)."""

    def append(self, entry: dict[str, Any]) -> None: ...


class NoRecord:
    """For runs that cannot be resumed (images in memory)."""

    def append(self, entry: dict[str, Any]) -> None:
        pass


@dataclass
class FlowResult:
    """What the flow decided and measured.

    Attributes
    ----------
    refined : np.ndarray
        ``(rows, cols)`` bool, the tiles Model 2 (or the baseline) ran on.
    scores : np.ndarray or None
        ``(rows, cols)`` float64 mean uncertainty per tile (None at full resolution).
    counts : dict
        ``"row,col"`` -> label histogram of that tile.
    resumed_tiles : int
        Tiles finished by an earlier, interrupted run.
    timings : dict
        Wall seconds of ``stage1``, ``select``, ``stage2``.
    task_seconds : dict
        Seconds inside tasks, summed over threads, per stage and part.
    gflop : dict
        Model work per stage (not counting resumed work).
    tissue : np.ndarray or None
        ``(rows, cols)`` float64 fraction of each tile on tissue (None without a tissue mask).
    tissue_summary : dict or None
        How tissue was detected (:meth:`~wsiseg.tissue.TissueResult.summary`).
    stage1_blocks_run : int or None
        Stage-1 blocks Model 1 ran on (this run and an interrupted one); None at full resolution.
    """

    refined: np.ndarray
    scores: np.ndarray | None
    counts: dict[str, list[int]]
    resumed_tiles: int
    timings: dict[str, float] = field(default_factory=dict)
    task_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    gflop: dict[str, float] = field(default_factory=dict)
    tissue: np.ndarray | None = None
    tissue_summary: dict[str, Any] | None = None
    stage1_blocks_run: int | None = None


def run_flow(
    plan: Plan,
    selection: TileSelection,
    executor: Any,
    record: Record | None = None,
    done: list[dict[str, Any]] | None = None,
    tiles_per_task: int = 4,
    progress: ProgressCallback | None = None,
) -> FlowResult:
    """Run stage 1, selection and stage 2 of ``plan``.

    Parameters
    ----------
    plan : Plan
    selection : TileSelection
    executor : InlineExecutor or DaskExecutor
    record : Record, optional
        Receives one entry per finished task.
    done : list of dict, optional
        Entries recorded by an interrupted run with the same plan: their work is skipped.
    tiles_per_task : int
        Selected tiles per refine task.
    progress : callable, optional
    """
    record = record or NoRecord()
    done = done or []
    task_seconds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    gflop: dict[str, list[float]] = defaultdict(list)  # per task, summed with fsum: independent of arrival order
    timings: dict[str, float] = {}

    def note(stage: str, result: dict[str, Any]) -> None:
        for key, value in result.get("timings", {}).items():
            task_seconds[stage][key] += value
        for key, value in result.get("gflop", {}).items():
            gflop[key].append(value)

    try:
        mark = time.perf_counter()
        tissue_summary, tissue = _tissue(plan, executor, record, done)
        on_tissue = np.ones(plan.grid.shape, bool) if tissue is None else tissue > 0
        blocks_run = None
        if not plan.full_resolution:
            needed = stage1_blocks_needed(plan, on_tissue) if tissue is not None and plan.stage1_on_tissue else None
            scores, blocks_run = _stage1(plan, executor, record, done, note, progress, needed)
        else:
            scores = None
        timings["stage1"] = time.perf_counter() - mark

        mark = time.perf_counter()
        if scores is None:
            refined = on_tissue
        else:  # tiles off tissue are never refined, nor do they use up a top-n or budget selection
            refined = selection.select(np.where(on_tissue, scores, 0.0)) & on_tissue
        if scores is not None:
            plan.store.array(TILE_SCORES)[...] = scores
        plan.store.array(REFINED)[...] = refined.astype(np.uint8)
        timings["select"] = time.perf_counter() - mark

        mark = time.perf_counter()
        counts: dict[str, list[int]] = {}
        for entry in done:
            counts.update(entry.get("counts", {}))
        finished = {tuple(t) for entry in done for t in entry.get("tiles", [])}
        resumed = len(finished)
        glass = _glass_tiles(plan, refined, on_tissue, finished, counts)
        written = len(finished) + len(glass)
        jobs = stage2_jobs(plan, refined, finished | glass, tiles_per_task, executor)
        for _, result in executor.run(jobs):
            record.append({"tiles": result["tiles"], "counts": result["counts"]})
            counts.update(result["counts"])
            note("stage2", result)
            written += len(result["tiles"])
            if progress:
                progress("stage2", written, plan.grid.num_tiles)
        timings["stage2"] = time.perf_counter() - mark
    except BaseException:
        executor.cancel()
        raise
    return FlowResult(
        refined=refined, scores=scores, counts=counts, resumed_tiles=resumed, timings=timings,
        task_seconds={stage: dict(parts) for stage, parts in task_seconds.items()},
        gflop={key: math.fsum(values) for key, values in gflop.items()},
        tissue=tissue, tissue_summary=tissue_summary, stage1_blocks_run=blocks_run,
    )


def _tissue(
    plan: Plan, executor: Any, record: Record, done: list[dict[str, Any]]
) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """Detect tissue (one task, unless an interrupted run did) and each tile's tissue fraction."""
    if plan.tissue_level is None:
        return None, None
    summary = next((entry["tissue"] for entry in done if "tissue" in entry), None)
    if summary is None:
        ((_, summary),) = executor.run([(detect_tissue_task, (plan,), "tissue")])
        record.append({"tissue": summary})
    mask = np.asarray(plan.store.array(TISSUE)[...])
    return summary, tile_tissue(mask, plan.grid, plan.tissue_step)


def _stage1(
    plan: Plan,
    executor: Any,
    record: Record,
    done: list[dict[str, Any]],
    note: Callable[[str, dict[str, Any]], None],
    progress: ProgressCallback | None,
    needed: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Stage-1 tasks for every needed block not done yet; the tile scores from their integrals.

    ``needed`` (``(block rows, block cols)`` bool, None: all) marks the blocks
    Model 1 runs on; the others get background maps from
    :func:`~wsiseg.tile_tasks.stage1_background` where background is not the
    arrays' fill value, and add nothing to the scores. Returns the scores and
    the number of blocks Model 1 ran on.
    """
    blocks = list(plan.stage1_grid.tiles())
    run = [b for b in blocks if needed is None or needed[b]]
    finished = {tuple(e["stage1"]): e for e in done if "stage1" in e}
    todo = [b for b in run if b not in finished]
    results = list(finished.values())
    jobs = [(stage1_block, (plan, r, c), (r, c)) for r, c in todo]
    if needed is not None and _background_needed(plan):
        jobs += [(stage1_background, (plan, r, c), None) for r, c in blocks if not needed[r, c]]
    count = len(blocks) - len(jobs)  # blocks done earlier, or glass needing no task
    for block, result in executor.run(iter(jobs)):
        if block is not None:
            entry = {"stage1": list(block), **{k: result[k] for k in ("r0", "c0", "sums", "areas")}}
            record.append(entry)
            results.append(entry)
        note("stage1", result)
        count += 1
        if progress:
            progress("stage1", count, len(blocks))
    sums, areas = np.zeros(plan.grid.shape), np.zeros(plan.grid.shape)
    for entry in results:
        s, a = np.asarray(entry["sums"]), np.asarray(entry["areas"])
        if s.size:
            r0, c0 = entry["r0"], entry["c0"]
            sums[r0 : r0 + s.shape[0], c0 : c0 + s.shape[1]] += s
            areas[r0 : r0 + a.shape[0], c0 : c0 + a.shape[1]] += a
    return scores_from_integrals(sums, areas), len(run)


def _background_needed(plan: Plan) -> bool:
    """Whether glass blocks need a task: background is not the fill value (softmax models), or the
    output's pixels are the view stage 1 reads."""
    return plan.num_classes > 1 or plan.image_from_stage1


def _glass_tiles(
    plan: Plan, refined: np.ndarray, on_tissue: np.ndarray, finished: set[tuple[int, int]], counts: dict[str, list[int]]
) -> set[tuple[int, int]]:
    """The unrefined tiles with no tissue pixel: all background, the mask's fill value, so no task
    composes them; their label histograms go into ``counts``."""
    if plan.tissue_level is None:
        return set()
    glass = set()
    for row, col in np.argwhere(~on_tissue & ~refined):
        key = (int(row), int(col))
        if key in finished:
            continue
        histogram = [0] * max(2, plan.num_classes)
        histogram[0] = int(np.prod(plan.grid.tile(*key).shape))
        counts[f"{key[0]},{key[1]}"] = histogram
        glass.add(key)
    return glass


def stage2_jobs(
    plan: Plan, refined: np.ndarray, done: set[tuple[int, int]], tiles_per_task: int, executor: Any
) -> Iterator[tuple[Callable[..., Any], tuple[Any, ...], Any]]:
    """Refine and compose jobs in row-major order, with their read jobs prefetched.

    Each chunk of the tile grid that a selected window overlaps is read by
    one job, covering the union of what the windows need from it, so every
    file tile is decoded at most once (when tiles align with file tiles); a
    read is dropped once its last user is submitted.
    """
    batches = _batches(plan, refined, done, tiles_per_task)
    needs, batch_chunks = _read_needs(plan, batches)
    users: dict[tuple[int, int], int] = defaultdict(int)
    for chunks in batch_chunks:
        for chunk in chunks:
            users[chunk] += 1
    reads: dict[tuple[int, int], Any] = {}
    for (kind, tiles), chunks in zip(batches, batch_chunks):
        if kind == "compose":
            yield compose_tiles, (plan, tiles), tiles
            continue
        for chunk in chunks:
            if chunk not in reads:
                reads[chunk] = executor.prefetch(read_pieces, plan, sorted(needs[chunk]))
        neighbourhoods = [neighbourhood(refined, r, c) for r, c in tiles]
        yield refine_tiles, (plan, tiles, neighbourhoods, [reads[chunk] for chunk in chunks]), tiles
        for chunk in chunks:
            users[chunk] -= 1
            if users[chunk] == 0:
                del reads[chunk]  # a Dask scheduler keeps it until its users finish


#: Most columns between neighbouring tiles of one refine batch (see :func:`_batches`).
BATCH_GAP = 2


def _batches(
    plan: Plan, refined: np.ndarray, done: set[tuple[int, int]], tiles_per_task: int
) -> list[tuple[str, list[tuple[int, int]]]]:
    """``("refine" | "compose", tiles)`` in row-major order of their first tile.

    Selected tiles are batched by window shape (one forward pass per batch)
    and place: a batch's tiles lie in one row of tiles, at most
    :data:`BATCH_GAP` columns apart, so what a batch reads stays together
    (the first and the last tile of a row share a window shape too).
    Unrefined ones go in runs of ``max(4 * tiles_per_task, 16)``.
    """
    grid = plan.grid
    batches: list[tuple[str, list[tuple[int, int]]]] = []
    pending: dict[Any, list[tuple[int, int]]] = defaultdict(list)
    compose_size = max(4 * tiles_per_task, 16)
    for row, col in grid.tiles():
        if (row, col) in done:
            continue
        key: Any = grid.window(row, col, plan.halo).shape if refined[row, col] else "compose"
        last = pending[key][-1] if pending.get(key) else None
        if key != "compose" and last is not None and (last[0] != row or col - last[1] > BATCH_GAP):
            batches.append(("refine", pending.pop(key)))
        pending[key].append((row, col))
        if len(pending[key]) == (compose_size if key == "compose" else tiles_per_task):
            batches.append(("compose" if key == "compose" else "refine", pending.pop(key)))
    batches += [("compose" if key == "compose" else "refine", tiles) for key, tiles in pending.items()]
    return sorted(batches, key=lambda batch: batch[1][0])


def _read_needs(
    plan: Plan, batches: list[tuple[str, list[tuple[int, int]]]]
) -> tuple[dict[tuple[int, int], set[Box]], list[list[tuple[int, int]]]]:
    """What each grid chunk must provide (the file-tile cells selected windows overlap in it),
    and the chunks each batch reads."""
    grid = plan.grid
    rows, cols = grid.shape
    cell = _read_cell(plan)
    reach = -(-plan.halo // plan.tile_size)  # rings of neighbouring tiles a window overlaps
    needs: dict[tuple[int, int], set[Box]] = defaultdict(set)
    batch_chunks: list[list[tuple[int, int]]] = []
    for kind, tiles in batches:
        chunks: set[tuple[int, int]] = set()
        for row, col in tiles if kind == "refine" else ():
            window = grid.window(row, col, plan.halo)
            for r in range(max(0, row - reach), min(rows, row + reach + 1)):
                for c in range(max(0, col - reach), min(cols, col + reach + 1)):
                    part = _intersect(grid.tile(r, c), window)
                    if part is not None:
                        needs[(r, c)].update(_cells(part, grid.tile(r, c), cell))
                        chunks.add((r, c))
        batch_chunks.append(sorted(chunks))
    return needs, batch_chunks


def _intersect(a: Box, b: Box) -> Box | None:
    box = Box(max(a.y0, b.y0), min(a.y1, b.y1), max(a.x0, b.x0), min(a.x1, b.x1))
    return box if box.y0 < box.y1 and box.x0 < box.x1 else None


def _read_cell(plan: Plan) -> int | None:
    """The file's tile side when our tiles are made of whole file tiles, else None."""
    tile = plan.source.levels[plan.work_level].tile_shape
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
