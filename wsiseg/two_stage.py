"""The two-stage data flow: stage 1, score, select, stage 2, compose.

1. **Stage 1.** Model 1 segments the image downsampled by ``ratio`` (in
   overlapping blocks, so block borders leave no seams), giving class
   probabilities at low resolution.
2. **Score.** Each full-resolution tile's score is the mean uncertainty of
   Model 1's probabilities over its footprint (:mod:`wsiseg.uncertainty`).
3. **Select.** A :class:`~wsiseg.uncertainty.TileSelection` picks the tiles
   to refine (threshold, top-N or budget).
4. **Stage 2.** Model 2 re-segments each selected tile at full resolution,
   read with a halo so tile borders leave no seams, with Model 1's features
   over the same footprint resampled to Model 2's feature grid as context.
   The context enters Model 2 through one linear 1x1 classifier, so stage 1
   stores it already projected by Model 2's classifier weights
   (:meth:`~wsiseg.models.base.SegmentationModel.project_context`): a map of
   ``num_classes`` channels at Model 1's resolution instead of
   ``feature_channels``, resampled per window. The result equals adding the
   resampled features themselves (up to float rounding) at a fraction of the
   memory and time, and Model 1 never runs again in stage 2.
5. **Compose.** Refined tiles take Model 2's probabilities, the others
   Model 1's upsampled ones, blended linearly across the border between a
   refined and an unrefined tile (:func:`~wsiseg.tiling.blend_weights`).

The building blocks (:class:`ModelRunner`, :func:`predict_tiles`,
:func:`window_context`, :func:`upsample_stage1`, :func:`union_reader`,
:func:`compose_tile`) are
shared with the out-of-core Dask graph of :mod:`wsiseg.segment`;
:func:`segment_image` and :func:`segment_full_resolution` run the flow on one
in-memory image.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from wsiseg.errors import InputError
from wsiseg.models.base import SegmentationModel, forward_gflop, logits_to_probabilities, probabilities_to_labels
from wsiseg.runtime import resolve_device, synchronize
from wsiseg.tiling import Box, TileGrid, blend_weights, linear_resample, pixel_centres, round_up
from wsiseg.uncertainty import TileSelection, tile_scores, uncertainty_map

#: ``progress(stage, done, total)``: called as work completes; stage is
#: ``"stage1"`` or ``"stage2"``, counts are tiles (stage 1: low-resolution blocks).
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TwoStageConfig:
    """Parameters of a two-stage run.

    Attributes
    ----------
    ratio : int
        Downsampling factor of Model 1's input (the paper's R).
    tile_size : int
        Full-resolution tile side; a multiple of Model 2's feature stride.
    halo : int
        Extra context read around each tile for Model 2 (rounded up to a
        multiple of the feature stride).
    selection : TileSelection
        Which tiles to refine.
    uncertainty : {"entropy", "margin"}
        Per-pixel uncertainty measure.
    blend : int
        Width in pixels of the linear ramp between refined and unrefined tiles.
    batch_size : int or None
        Windows per Model 2 forward pass; None: 1 on the CPU (as fast per
        window as larger batches there, with a third less memory), 4 on a GPU.
    stage1_block : int
        Side of Model 1's low-resolution blocks.
    stage1_halo : int
        Halo of Model 1's blocks, in low-resolution pixels.
    context : bool
        Give Model 2 Model 1's features as context (False for a Model 2
        trained without them, the paper's "context off" ablation).
    """

    ratio: int = 4
    tile_size: int = 512
    halo: int = 32
    selection: TileSelection = field(default_factory=lambda: TileSelection.threshold(0.25))
    uncertainty: str = "entropy"
    blend: int = 16
    batch_size: int | None = None
    stage1_block: int = 512
    stage1_halo: int = 32
    context: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, int) or self.ratio < 1:
            raise InputError(f"ratio must be a whole number >= 1, got {self.ratio!r}")
        for name in ("tile_size", "batch_size", "stage1_block"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("halo", "blend", "stage1_halo"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class SegmentationResult:
    """What a run produces.

    Attributes
    ----------
    mask : np.ndarray
        ``(H, W)`` uint8 labels.
    probabilities : np.ndarray
        ``(C, H, W)`` float32 composed probabilities (``C == 1``: P(foreground)).
    stage1_probabilities : np.ndarray or None
        ``(C, h, w)`` float32 Model 1 probabilities at low resolution.
    uncertainty : np.ndarray or None
        ``(h, w)`` float32 per-pixel uncertainty of Model 1.
    tile_scores : np.ndarray or None
        ``(rows, cols)`` float32 mean uncertainty per tile.
    refined : np.ndarray
        ``(rows, cols)`` bool, the tiles Model 2 (or the baseline) ran on.
    tile_size : int
        Side of the tiles of ``refined``.
    counts : dict
        ``tiles_total``, ``tiles_refined``, ``refined_fraction``,
        ``pixels``, ``stage2_input_pixels`` (halo included).
    timings : dict
        Seconds: ``stage1``, ``select``, ``stage2``, ``compose``, ``total``.
    """

    mask: np.ndarray
    probabilities: np.ndarray
    stage1_probabilities: np.ndarray | None
    uncertainty: np.ndarray | None
    tile_scores: np.ndarray | None
    refined: np.ndarray
    tile_size: int
    counts: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


class ModelRunner:
    """Runs a model in inference mode on batches of uint8 RGB windows.

    Parameters
    ----------
    model : SegmentationModel
        Moved to ``device`` and put in eval mode.
    device : str or torch.device
        ``"auto"``: CUDA when available, else CPU.
    channels_last : bool, optional
        Use the channels-last memory layout (faster convolutions on CPU);
        defaults to True on CPU.

    Attributes
    ----------
    batch_size : int
        Default windows per forward pass: 1 on the CPU, 4 on a GPU.
    """

    def __init__(
        self, model: SegmentationModel, device: str | torch.device = "auto", channels_last: bool | None = None
    ) -> None:
        self.device = resolve_device(device)
        self.channels_last = self.device.type == "cpu" if channels_last is None else channels_last
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=memory_format).eval()
        self.batch_size = 1 if self.device.type == "cpu" else 4
        self._gflop_per_image: dict[tuple[int, int], float] = {}
        self._counter = threading.local()

    def gflop_per_image(self, height: int, width: int) -> float:
        """Floating-point work (GFLOP) of one forward pass on an ``height x width`` input,
        counted once per shape (see :func:`~wsiseg.models.base.forward_gflop`)."""
        key = (height, width)
        if key not in self._gflop_per_image:
            self._gflop_per_image[key] = forward_gflop(self.model, height, width)
        return self._gflop_per_image[key]

    @contextmanager
    def counting(self) -> Iterator[dict[str, float]]:
        """Count the GFLOP of this thread's :meth:`predict` calls: ``with runner.counting() as work``."""
        work = {"gflop": 0.0}
        self._counter.work = work
        try:
            yield work
        finally:
            self._counter.work = None

    @property
    def stride(self) -> int:
        return self.model.feature_stride

    def predict(
        self,
        images: np.ndarray,
        class_context: torch.Tensor | None = None,
        project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Probabilities of a batch, and its projected features when asked for.

        Parameters
        ----------
        images : np.ndarray
            ``(N, h, w, 3)`` uint8.
        class_context : torch.Tensor, optional
            ``(N, C, *feature_shape(h, w))`` float32, a projected context added
            to the classifier's output (see ``SegmentationModel.forward``).
        project : callable, optional
            Applied to the features on the device, e.g. Model 2's
            ``project_context`` on Model 1's features.

        Returns
        -------
        probs : torch.Tensor
            ``(N, C, h, w)`` float32 on the CPU.
        projected : torch.Tensor or None
            ``project(features)`` on the CPU (``(N, C', fh, fw)`` float32);
            None without ``project`` (the features stay on the device and are freed).
        """
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if class_context is not None:
            class_context = class_context.to(self.device)
        with torch.inference_mode():
            logits, features = self.model(x, class_context=class_context)
            probs = logits_to_probabilities(logits)
            projected = None if project is None else project(features).float().cpu().contiguous()
        work = getattr(self._counter, "work", None)
        if work is not None:
            work["gflop"] += images.shape[0] * self.gflop_per_image(*images.shape[1:3])
        return probs.float().cpu().contiguous(), projected


ReadWindow = Callable[[Box], np.ndarray]
#: ``read(box) -> (C, bh, bw)`` values of a box of a low-resolution map.
ReadMap = Callable[[Box], torch.Tensor]
#: ``context_for(windows, feature_shape) -> (N, C, fh, fw)`` projected context of a batch.
ContextFor = Callable[[list[Box], tuple[int, int]], torch.Tensor]


def predict_tiles(
    runner: ModelRunner,
    read_window: ReadWindow,
    grid: TileGrid,
    halo: int,
    tiles: Iterable[tuple[int, int]],
    batch_size: int | None = None,
    context_for: ContextFor | None = None,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
    """Run a model on tiles read with a halo; yield each tile's cropped output.

    Windows of equal shape are batched together (interior tiles share one
    shape; edge tiles form a few more groups).

    Parameters
    ----------
    runner : ModelRunner
    read_window : callable
        ``read_window(box) -> (h, w, 3) uint8`` pixels of a box of the image.
    grid : TileGrid
        Tile size must be a multiple of the model's feature stride.
    halo : int
        Pixels read around each tile (rounded up to a multiple of the stride).
    tiles : iterable of (row, col)
    batch_size : int, optional
        Windows per forward pass (default: the runner's).
    context_for : callable, optional
        ``context_for(windows, feature_shape) -> (N, C, fh, fw)`` projected context of a batch.
    project : callable, optional
        Passed to :meth:`ModelRunner.predict`.

    Yields
    ------
    row, col : int
    probs : torch.Tensor
        ``(C, th, tw)`` float32, the tile's probabilities.
    projected : torch.Tensor or None
        ``(C', fth, ftw)`` float32, the tile's projected features (stride
        ``runner.stride``), cropped to the feature pixels ``tile // stride``
        (rounded outwards); None without ``project``.
    """
    stride = runner.stride
    if grid.tile_size % stride:
        raise InputError(
            f"tile size {grid.tile_size} must be a multiple of the model's feature stride {stride}"
        )
    halo = round_up(halo, stride)
    batch_size = batch_size or runner.batch_size
    groups: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for row, col in tiles:
        groups[grid.window(row, col, halo).shape].append((row, col))
    for shape, members in groups.items():
        feature_shape = runner.model.feature_shape(*shape)
        for start in range(0, len(members), batch_size):
            batch = members[start : start + batch_size]
            windows = [grid.window(r, c, halo) for r, c in batch]
            images = np.stack([read_window(w) for w in windows])
            context = context_for(windows, feature_shape) if context_for is not None else None
            probs, projected = runner.predict(images, context, project)
            for i, ((row, col), window) in enumerate(zip(batch, windows)):
                tile = grid.tile(row, col).relative_to(window)
                feature_box = Box(
                    tile.y0 // stride, -(-tile.y1 // stride), tile.x0 // stride, -(-tile.x1 // stride)
                )
                yield (
                    row,
                    col,
                    probs[i][(slice(None), *tile.slices())],
                    None if projected is None else projected[i][(slice(None), *feature_box.slices())],
                )


def downsample_mean(image: np.ndarray, ratio: int) -> np.ndarray:
    """Block-mean downsampling by an integer factor.

    Parameters
    ----------
    image : np.ndarray
        ``(H, W, 3)`` uint8.
    ratio : int

    Returns
    -------
    np.ndarray
        ``(ceil(H / ratio), ceil(W / ratio), 3)`` uint8; output pixel ``(i, j)``
        is the rounded mean of input ``[i*r, (i+1)*r) x [j*r, (j+1)*r)``
        (partial blocks at the far edges average the pixels they have).
        Whole blocks are summed in uint32 without copying the input.
    """
    if ratio == 1:
        return image
    height, width, channels = image.shape
    out_h, out_w = -(-height // ratio), -(-width // ratio)
    full_h, full_w = height // ratio, width // ratio
    out = np.empty((out_h, out_w, channels), np.uint8)
    if full_h and full_w:
        core = image[: full_h * ratio, : full_w * ratio].reshape(full_h, ratio, full_w, ratio, channels)
        out[:full_h, :full_w] = _rounded_mean(core.sum(axis=(1, 3), dtype=np.uint32), ratio * ratio)
    # Partial blocks along the bottom and right edges.
    for i in range(out_h):
        for j in range(out_w) if i >= full_h else range(full_w, out_w):
            block = image[i * ratio : (i + 1) * ratio, j * ratio : (j + 1) * ratio].reshape(-1, channels)
            out[i, j] = _rounded_mean(block.sum(axis=0, dtype=np.uint32), block.shape[0])
    return out


def _rounded_mean(sums: np.ndarray, count: int) -> np.ndarray:
    """``sums / count`` rounded half to even (as ``np.rint``), in integer arithmetic."""
    quotient, remainder = np.divmod(sums, count)
    up = (2 * remainder > count) | ((2 * remainder == count) & (quotient % 2 == 1))
    return (quotient + up).astype(np.uint8)


def sample_plan(
    start: tuple[int, int],
    count: tuple[int, int],
    step: float,
    scale: tuple[float, float],
    map_shape: tuple[int, int],
) -> tuple[Box, np.ndarray, np.ndarray]:
    """Where bilinear samples of a low-resolution map fall, and the crop holding every tap.

    The samples are taken at the centres of ``count`` pixels of side ``step``
    (full-resolution pixels) starting at ``start``; the map's pixels are
    ``scale`` full-resolution pixels wide.

    Returns
    -------
    crop : Box
        The map pixels the samples read.
    rows, cols : np.ndarray
        ``(count[0],)`` and ``(count[1],)`` float64 positions relative to ``crop``.
    """
    rows = np.clip(pixel_centres(start[0], count[0], step, scale[0]), 0, map_shape[0] - 1)
    cols = np.clip(pixel_centres(start[1], count[1], step, scale[1]), 0, map_shape[1] - 1)
    crop = Box(
        int(np.floor(rows.min())), min(int(np.floor(rows.max())) + 2, map_shape[0]),
        int(np.floor(cols.min())), min(int(np.floor(cols.max())) + 2, map_shape[1]),
    )
    return crop, rows - crop.y0, cols - crop.x0


def sample_map(
    read: ReadMap,
    map_shape: tuple[int, int],
    start: tuple[int, int],
    count: tuple[int, int],
    step: float,
    scale: tuple[float, float],
) -> torch.Tensor:
    """Bilinear samples of a low-resolution map (see :func:`sample_plan`).

    Parameters
    ----------
    read : callable
        ``read(box) -> (C, bh, bw)`` values of the map; only the crop the
        samples need is read, and the result equals sampling the whole map.

    Returns
    -------
    torch.Tensor
        ``(C, count[0], count[1])``.
    """
    crop, rows, cols = sample_plan(start, count, step, scale, map_shape)
    return linear_resample(read(crop), rows, cols)


def upsample_stage1(read: ReadMap, low_shape: tuple[int, int], scale: tuple[float, float], tile: Box) -> torch.Tensor:
    """Model 1's low-resolution probabilities bilinearly upsampled over one tile.

    Parameters
    ----------
    read : callable
        ``read(box) -> (C, bh, bw)`` of the ``low_shape`` probability map.
    scale : (sy, sx)
        Full-resolution pixels per low-resolution pixel.
    tile : Box

    Returns
    -------
    torch.Tensor
        ``(C, th, tw)`` float32.
    """
    return sample_map(read, low_shape, (tile.y0, tile.x0), tile.shape, 1.0, scale)


def union_reader(read: ReadMap, boxes: list[Box]) -> ReadMap:
    """``read`` for boxes inside the union of ``boxes``, served from one read of that union.

    The union is read on the first call (not at all when nothing is asked
    for), so a stored map's chunks are decoded once for a batch of tiles
    rather than once per tile. A box outside the union is an error.
    """
    union = Box(min(b.y0 for b in boxes), max(b.y1 for b in boxes), min(b.x0 for b in boxes), max(b.x1 for b in boxes))
    values: list[torch.Tensor] = []

    def read_inside(box: Box) -> torch.Tensor:
        if not (union.y0 <= box.y0 <= box.y1 <= union.y1 and union.x0 <= box.x0 <= box.x1 <= union.x1):
            raise ValueError(f"box {box} lies outside the union read {union}")
        if not values:
            values.append(read(union))
        return values[0][(slice(None), *box.relative_to(union).slices())]

    return read_inside


def stage1_crop(tile: Box, scale: tuple[float, float], low_shape: tuple[int, int]) -> Box:
    """The low-resolution box :func:`upsample_stage1` reads for ``tile``."""
    return sample_plan((tile.y0, tile.x0), tile.shape, 1.0, scale, low_shape)[0]


def _context_samples(
    scale: tuple[float, float], stride1: int, window: Box, feature_shape: tuple[int, int], stride2: int
) -> tuple[tuple[int, int], tuple[int, int], float, tuple[float, float]]:
    """``(start, count, step, map scale)`` of :func:`sample_plan` for a window's context."""
    return (window.y0, window.x0), feature_shape, float(stride2), (scale[0] * stride1, scale[1] * stride1)


def window_context(
    read: ReadMap,
    context_shape: tuple[int, int],
    scale: tuple[float, float],
    stride1: int,
    window: Box,
    feature_shape: tuple[int, int],
    stride2: int,
) -> torch.Tensor:
    """Model 1's projected features over a window, resampled onto Model 2's feature grid.

    Parameters
    ----------
    read : callable
        ``read(box) -> (C, bh, bw)`` of the projected context map, which lies
        on Model 1's feature grid (``context_shape``, stride ``stride1`` over
        the low-resolution view of scale ``scale``).
    window : Box
        Full-resolution window Model 2 sees.
    feature_shape : (fh2, fw2)
        Model 2's feature shape for that window; its pixels are ``stride2`` wide.

    Returns
    -------
    torch.Tensor
        ``(C, fh2, fw2)`` float32: sampled at the centres of Model 2's feature pixels.
    """
    return sample_map(read, context_shape, *_context_samples(scale, stride1, window, feature_shape, stride2))


def context_reader(
    read: ReadMap, context_shape: tuple[int, int], scale: tuple[float, float], stride1: int, stride2: int
) -> ContextFor:
    """A :data:`ContextFor` over a stored projected context map (see :func:`window_context`).

    Each batch reads the map once, over the union of its windows' crops.
    """

    def context_for(windows: list[Box], feature_shape: tuple[int, int]) -> torch.Tensor:
        crops = [
            sample_plan(*_context_samples(scale, stride1, window, feature_shape, stride2), context_shape)[0]
            for window in windows
        ]
        batch_read = union_reader(read, crops)
        return torch.stack([
            window_context(batch_read, context_shape, scale, stride1, window, feature_shape, stride2)
            for window in windows
        ])

    return context_for


def compose_tile(
    stage1_probs: Callable[[], torch.Tensor], stage2_probs: torch.Tensor | None, weights: np.ndarray
) -> np.ndarray:
    """``weights * stage2 + (1 - weights) * stage1`` for one tile.

    Parameters
    ----------
    stage1_probs : callable
        ``stage1_probs() -> (C, th, tw)`` upsampled Model 1 probabilities;
        not called where Model 2's weight is 1 everywhere (a refined tile with
        no unrefined neighbour), whose result is Model 2's alone.
    stage2_probs : torch.Tensor or None
        ``(C, th, tw)`` Model 2 probabilities; None for an unrefined tile.
    weights : np.ndarray
        ``(th, tw)`` weight of Model 2, from :func:`~wsiseg.tiling.blend_weights`.

    Returns
    -------
    np.ndarray
        ``(C, th, tw)`` float32.
    """
    if stage2_probs is None:
        return stage1_probs().numpy().astype(np.float32, copy=False)
    p2 = stage2_probs.numpy()
    if weights.min() >= 1.0:
        return p2.astype(np.float32, copy=False)
    w = weights[None]
    return (w * p2 + (1.0 - w) * stage1_probs().numpy()).astype(np.float32)


def run_stage1(
    runner: ModelRunner,
    low_image: np.ndarray,
    block: int,
    halo: int,
    progress: ProgressCallback | None = None,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Model 1 over a whole low-resolution image, in overlapping blocks, one per forward pass.

    Parameters
    ----------
    runner : ModelRunner
    low_image : np.ndarray
        ``(h, w, 3)`` uint8.
    block, halo : int
        Block side and halo (both rounded up to the model's feature stride).
    project : callable, optional
        Model 2's ``project_context``: also return Model 1's projected features.

    Returns
    -------
    probs : np.ndarray
        ``(C, h, w)`` float32.
    context : np.ndarray or None
        ``(C, fh, fw)`` float32 on Model 1's feature grid, when ``project`` is given.
    """
    grid = TileGrid(*low_image.shape[:2], round_up(block, runner.stride))
    # One block per forward pass: the same computation as one Dask task per
    # block, so the in-memory and out-of-core paths give identical numbers.
    return predict_image(runner, low_image, grid, halo, 1, "stage1", progress, project)


def predict_image(
    runner: ModelRunner,
    image: np.ndarray,
    grid: TileGrid,
    halo: int,
    batch_size: int | None,
    stage: str,
    progress: ProgressCallback | None = None,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities of every tile of an in-memory image, stitched.

    Returns
    -------
    probs : np.ndarray
        ``(C, H, W)`` float32.
    features : np.ndarray or None
        ``(C', fh, fw)`` float32 ``project(features)`` stitched, when ``project`` is given.
    """
    probs = np.zeros((runner.model.num_classes, grid.height, grid.width), np.float32)
    features = None
    stride = runner.stride
    done = 0
    for row, col, p, f in predict_tiles(
        runner, lambda b: image[b.slices()], grid, halo, grid.tiles(), batch_size, project=project
    ):
        tile = grid.tile(row, col)
        probs[(slice(None), *tile.slices())] = p.numpy()
        if project is not None:
            if features is None:
                features = np.zeros((f.shape[0], *runner.model.feature_shape(grid.height, grid.width)), np.float32)
            y0, x0 = tile.y0 // stride, tile.x0 // stride
            features[:, y0 : y0 + f.shape[1], x0 : x0 + f.shape[2]] = f.numpy()
        done += 1
        if progress:
            progress(stage, done, grid.num_tiles)
    return probs, features


def _check_pair(model1: SegmentationModel, model2: SegmentationModel) -> None:
    if model1.num_classes != model2.num_classes:
        raise InputError(
            f"Model 1 has {model1.num_classes} classes but Model 2 has {model2.num_classes}"
        )
    if model1.feature_channels != model2.feature_channels:
        raise InputError(
            f"Model 1 has {model1.feature_channels} feature channels but Model 2 has "
            f"{model2.feature_channels}; the context path needs them equal"
        )


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(
            f"expected an (H, W, 3) uint8 RGB image, got shape {image.shape} and dtype {image.dtype}"
        )


def segment_image(
    image: np.ndarray,
    model1: SegmentationModel,
    model2: SegmentationModel,
    config: TwoStageConfig = TwoStageConfig(),
    device: str | torch.device = "auto",
    progress: ProgressCallback | None = None,
) -> SegmentationResult:
    """Two-stage segmentation of one in-memory image.

    Parameters
    ----------
    image : np.ndarray
        ``(H, W, 3)`` uint8 RGB.
    model1, model2 : SegmentationModel
        Same class count and feature channels.
    config : TwoStageConfig
    device : str or torch.device
        ``"auto"``: CUDA when available, else CPU.
    progress : callable, optional
        ``progress(stage, done, total)``.

    Returns
    -------
    SegmentationResult
    """
    _check_image(image)
    _check_pair(model1, model2)
    height, width = image.shape[:2]
    runner1 = ModelRunner(model1, device)
    runner2 = ModelRunner(model2, device)
    if config.tile_size % runner2.stride:
        raise InputError(
            f"tile size {config.tile_size} must be a multiple of Model 2's feature stride {runner2.stride}"
        )
    timings: dict[str, float] = {}
    start = time.perf_counter()

    # Stage 1: Model 1 on the downsampled image, and its features projected for Model 2.
    low = downsample_mean(image, config.ratio)
    scale = (float(config.ratio), float(config.ratio))
    project = runner2.model.project_context if config.context else None
    probs1, context1 = run_stage1(runner1, low, config.stage1_block, config.stage1_halo, progress, project)
    synchronize(runner1.device)
    timings["stage1"] = time.perf_counter() - start

    # Score and select.
    mark = time.perf_counter()
    grid = TileGrid(height, width, config.tile_size)
    uncertainty = uncertainty_map(probs1, config.uncertainty)
    scores = tile_scores(uncertainty, grid.edges(0), grid.edges(1), scale)
    refined = config.selection.select(scores)
    timings["select"] = time.perf_counter() - mark

    # Stage 2 on the selected tiles, composing each as it arrives.
    probs1_t = torch.from_numpy(probs1)
    out = np.zeros((probs1.shape[0], height, width), np.float32)
    compose_seconds = 0.0

    def compose_into(row: int, col: int, stage2: torch.Tensor | None) -> None:
        nonlocal compose_seconds
        t = time.perf_counter()
        tile = grid.tile(row, col)
        weights = blend_weights(refined, row, col, tile, config.blend)
        stage1 = lambda: upsample_stage1(lambda b: probs1_t[(slice(None), *b.slices())], low.shape[:2], scale, tile)
        out[(slice(None), *tile.slices())] = compose_tile(stage1, stage2, weights)
        compose_seconds += time.perf_counter() - t

    context_for = None
    if context1 is not None:
        context1_t = torch.from_numpy(context1)
        context_for = context_reader(
            lambda b: context1_t[(slice(None), *b.slices())], context1.shape[1:], scale, runner1.stride, runner2.stride
        )
    selected = [tuple(rc) for rc in np.argwhere(refined)]
    mark = time.perf_counter()
    done = 0
    for row, col, p2, _ in predict_tiles(
        runner2, lambda b: image[b.slices()], grid, config.halo, selected, config.batch_size, context_for
    ):
        compose_into(row, col, p2)
        done += 1
        if progress:
            progress("stage2", done, len(selected))
    synchronize(runner2.device)
    for row, col in grid.tiles():
        if not refined[row, col]:
            compose_into(row, col, None)
    timings["stage2"] = time.perf_counter() - mark - compose_seconds
    timings["compose"] = compose_seconds
    timings["total"] = time.perf_counter() - start
    halo = round_up(config.halo, runner2.stride)
    return SegmentationResult(
        mask=probabilities_to_labels(out),
        probabilities=out,
        stage1_probabilities=probs1,
        uncertainty=uncertainty,
        tile_scores=scores,
        refined=refined,
        tile_size=config.tile_size,
        counts=_counts(grid, refined, halo),
        timings=timings,
    )


def segment_full_resolution(
    image: np.ndarray,
    model: SegmentationModel,
    tile_size: int = 512,
    halo: int = 32,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    progress: ProgressCallback | None = None,
) -> SegmentationResult:
    """The baseline: one model on every full-resolution tile, same tiling code.

    Parameters and result as :func:`segment_image`; the result has no stage 1
    outputs and every tile marked refined.
    """
    _check_image(image)
    runner = ModelRunner(model, device)
    height, width = image.shape[:2]
    grid = TileGrid(height, width, tile_size)
    start = time.perf_counter()
    out, _ = predict_image(runner, image, grid, halo, batch_size, "stage2", progress)
    synchronize(runner.device)
    elapsed = time.perf_counter() - start
    refined = np.ones(grid.shape, bool)
    return SegmentationResult(
        mask=probabilities_to_labels(out),
        probabilities=out,
        stage1_probabilities=None,
        uncertainty=None,
        tile_scores=None,
        refined=refined,
        tile_size=tile_size,
        counts=_counts(grid, refined, round_up(halo, runner.stride)),
        timings={"stage1": 0.0, "select": 0.0, "stage2": elapsed, "compose": 0.0, "total": elapsed},
    )


def _counts(grid: TileGrid, refined: np.ndarray, halo: int) -> dict[str, float]:
    input_pixels = 0
    for row, col in np.argwhere(refined):
        h, w = grid.window(int(row), int(col), halo).shape
        input_pixels += h * w
    return {
        "tiles_total": grid.num_tiles,
        "tiles_refined": int(refined.sum()),
        "refined_fraction": float(refined.sum()) / grid.num_tiles,
        "pixels": grid.height * grid.width,
        "stage2_input_pixels": input_pixels,
    }
