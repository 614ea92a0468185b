"""The two-stage flow on one image in memory, run inline.

:func:`segment_image` and :func:`segment_full_resolution` plan the image
like a one-level slide, keep the maps in numpy arrays and run the same tile
tasks and driver as a whole-slide run (:mod:`wsiseg.run.driver`), with an
executor that calls each task at once in this thread. Evaluation uses them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsiseg.config import TwoStageConfig
from wsiseg.domain import DomainEvidence
from wsiseg.errors import InputError
from wsiseg.run.driver import ProgressCallback, run_flow
from wsiseg.run.executors import InlineExecutor
from wsiseg.run.plan import ModelFacts, Plan, make_plan, view_for
from wsiseg.run.report import TileCounts, Timings
from wsiseg.slide import Level
from wsiseg.tiling import Box
from wsiseg.ngff import COMPOSED, IMAGE, MASK, PROBABILITY, UNCERTAINTY


@dataclass
class SegmentationResult:
    """What an in-memory run produces.

    Attributes
    ----------
    mask : np.ndarray
        ``(H, W)`` uint8 labels.
    probabilities : np.ndarray or None
        ``(C, H, W)`` float32 composed probabilities (``C == 1``: P(foreground)),
        when asked for.
    stage1_probabilities : np.ndarray or None
        ``(C, h, w)`` float32 Model 1 probabilities at low resolution.
    uncertainty : np.ndarray or None
        ``(h, w)`` float32 per-pixel uncertainty of Model 1.
    tile_scores : np.ndarray or None
        ``(rows, cols)`` float mean uncertainty per tile.
    refined : np.ndarray
        ``(rows, cols)`` bool, the tiles Model 2 (or the baseline) ran on.
    tile_size : int
        Side of the tiles of ``refined``.
    tiles : TileCounts
        ``total``, ``refined``, ``refined_fraction``: the names of a slide's report.
    timings : Timings
        Seconds: ``stage1``, ``select``, ``stage2`` (compose included), ``compose``, ``total``.
    stage2_input_pixels : int
        Pixels Model 2 (or the baseline) read, halos included.
    domain : DomainEvidence
        The run's tissue-tile scores, foreground fraction and background (:mod:`wsiseg.domain`).
    """

    mask: np.ndarray
    probabilities: np.ndarray | None
    stage1_probabilities: np.ndarray | None
    uncertainty: np.ndarray | None
    tile_scores: np.ndarray | None
    refined: np.ndarray
    tile_size: int
    tiles: TileCounts
    timings: Timings
    stage2_input_pixels: int = 0
    domain: DomainEvidence | None = None


class ImageSource:
    """An ``(H, W, 3)`` uint8 image as a pyramid, with its pixel size when known.

    Without ``coarser`` it is one level (coarser views are block means, or
    area-resampled where the factor is not whole); ``coarser`` adds reduced
    levels as a slide stores them (``(h, w, 3)`` uint8 each, its downsample
    level 0's size over its own), so a run reads them as it reads a slide's.
    """

    def __init__(self, image: np.ndarray, mpp: float | None = None, coarser: tuple[np.ndarray, ...] = ()) -> None:
        for level in (image, *coarser):
            if level.ndim != 3 or level.shape[2] != 3 or level.dtype != np.uint8:
                raise InputError(
                    f"expected an (H, W, 3) uint8 RGB image, got shape {level.shape} and dtype {level.dtype}"
                )
        self.images = (image, *coarser)
        height, width = image.shape[:2]
        self.levels = tuple(Level(level.shape[:2], (height / level.shape[0], width / level.shape[1]), None)
                            for level in self.images)
        self.mpp = (mpp, mpp) if mpp else None

    def read_region(self, level: int, box: Box) -> np.ndarray:
        return self.images[level][box.slices()]


class MemoryStore:
    """Named numpy arrays, allocated from a plan's array specs (the slide's pixels left out)."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def allocate(self, plan: Plan, probabilities: bool = False) -> None:
        for spec in plan.arrays():
            if spec.name != IMAGE:
                self.arrays[spec.name] = np.zeros(spec.shape, spec.dtype)
        if probabilities:
            self.arrays[COMPOSED] = np.zeros((plan.num_classes, *plan.work_shape), np.float32)

    def array(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def has(self, name: str) -> bool:
        return name in self.arrays


@dataclass(frozen=True)
class LoadedModels:
    """Runners of models already in memory, by role."""

    runners: dict[str, Any]

    def runner(self, role: str) -> Any:
        return self.runners[role]


def segment_image(
    image: np.ndarray | ImageSource,
    model1: Any,
    model2: Any,
    config: TwoStageConfig = TwoStageConfig(),
    device: str = "auto",
    batch_size: int | None = None,
    progress: ProgressCallback | None = None,
    probabilities: bool = False,
    downsample: float = 1.0,
    tissue: bool = False,
) -> SegmentationResult:
    """Two-stage segmentation of one in-memory image.

    Parameters
    ----------
    image : np.ndarray or ImageSource
        ``(H, W, 3)`` uint8 RGB, or an :class:`ImageSource` (an image with reduced levels).
    model1, model2 : SegmentationModel
        Same class count and feature channels.
    config : TwoStageConfig
        ``tile_size`` None: 512.
    device : str
        ``"auto"``: CUDA when available, else CPU.
    batch_size : int, optional
        Windows per Model 2 forward pass (default 1 on the CPU, 4 on a GPU).
    progress : callable, optional
        ``progress(stage, done, total)``.
    probabilities : bool
        Also keep the composed probabilities (``C x H x W`` float32).
    downsample : float
        Work at the image downsampled by this factor (>= 1; whole: block
        means, else area-resampled), as a slide is brought to the model's
        pixel size (:attr:`~wsiseg.config.ResolvedFlow.downsample`). The
        result is at the working resolution.
    tissue : bool
        Detect tissue first and keep the mask and refinement to it, as
        ``wsiseg segment`` does (:mod:`wsiseg.tissue`).
    """
    if model1.num_classes != model2.num_classes:
        raise InputError(f"Model 1 has {model1.num_classes} classes but Model 2 has {model2.num_classes}")
    if model1.feature_channels != model2.feature_channels:
        raise InputError(
            f"Model 1 has {model1.feature_channels} feature channels but Model 2 has "
            f"{model2.feature_channels}; the context path needs them equal"
        )
    return _run({"model1": model1, "model2": model2}, image, config, False, device, batch_size, progress, probabilities,
                downsample, tissue)


def segment_full_resolution(
    image: np.ndarray,
    model: Any,
    config: TwoStageConfig = TwoStageConfig(),
    device: str = "auto",
    batch_size: int | None = None,
    progress: ProgressCallback | None = None,
    probabilities: bool = False,
    downsample: float = 1.0,
    tissue: bool = False,
) -> SegmentationResult:
    """The baseline: one model on every full-resolution tile, with the same tasks.

    Only ``tile_size`` and ``halo`` of ``config`` apply (``downsample`` and
    ``tissue`` as in :func:`segment_image`). The result has no stage-1
    outputs and every tile on tissue marked refined.
    """
    return _run({"model": model}, image, config, True, device, batch_size, progress, probabilities, downsample, tissue)


def _run(
    models: dict[str, Any],
    image: np.ndarray | ImageSource,
    config: TwoStageConfig,
    full_resolution: bool,
    device: str,
    batch_size: int | None,
    progress: ProgressCallback | None,
    probabilities: bool,
    downsample: float = 1.0,
    tissue: bool = False,
) -> SegmentationResult:
    from wsiseg.inference import ModelRunner
    from wsiseg.runtime import synchronize

    start = time.perf_counter()
    source = image if isinstance(image, ImageSource) else ImageSource(image)
    if downsample < 1:
        raise InputError(f"an image is worked at its own pixels or coarser, not downsampled by {downsample}")
    runners = {role: ModelRunner(model, device, count_work=False) for role, model in models.items()}
    facts = ModelFacts(
        {role: r.stride for role, r in runners.items()}, next(iter(models.values())).num_classes,
        {role: r.model.grid_stride for role, r in runners.items()},
    )
    store = MemoryStore()
    working = view_for(source, downsample)
    plan = make_plan(source, store, LoadedModels(runners), facts, config, full_resolution, batch_size, working,
                     tissue=tissue)
    store.allocate(plan, probabilities)
    flow = run_flow(plan, config.selection, InlineExecutor(), progress=progress)
    for runner in runners.values():
        synchronize(runner.device)
    timings = Timings(**flow.timings, compose=flow.task_seconds.get("stage2", {}).get("compose", 0.0),
                      total=time.perf_counter() - start)
    stage1 = not full_resolution
    return SegmentationResult(
        mask=store.array(MASK),
        probabilities=store.array(COMPOSED) if probabilities else None,
        stage1_probabilities=store.array(PROBABILITY) if stage1 else None,
        uncertainty=store.array(UNCERTAINTY) if stage1 else None,
        tile_scores=flow.scores,
        refined=flow.refined,
        tile_size=plan.tile_size,
        tiles=TileCounts.of(flow.refined),
        timings=timings,
        stage2_input_pixels=_stage2_input_pixels(plan, flow.refined),
        domain=DomainEvidence.of_flow(flow),
    )


def _stage2_input_pixels(plan: Plan, refined: np.ndarray) -> int:
    return sum(int(np.prod(plan.grid.window(int(r), int(c), plan.halo).shape)) for r, c in np.argwhere(refined))
