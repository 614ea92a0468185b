"""Running models on tiles: the torch side of the two-stage flow.

- :class:`ModelRunner` runs a model in inference mode on batches of uint8
  windows and counts the work done.
- :func:`predict_tiles` runs it on tiles read with a halo, batching windows
  of equal shape, and crops each tile's output.
- Model 1's stored maps are sampled for stage 2: its probabilities
  upsampled over a tile (:func:`upsample_stage1`) and its features,
  projected by Model 2's classifier, resampled onto Model 2's feature grid
  (:func:`window_context`, :func:`context_reader`). The context enters
  Model 2 through one linear 1x1 classifier, so stage 1 stores it already
  projected (:meth:`~wsiseg.models.base.SegmentationModel.project_context`):
  ``num_classes`` channels instead of ``feature_channels``, equal to adding
  the resampled features themselves up to float rounding.
- :func:`compose_tile` blends Model 2 into Model 1 across refined borders.

The tile tasks of :mod:`wsiseg.tile_tasks` call these; nothing here knows
about files, stores or schedulers.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from wsiseg.errors import InputError
from wsiseg.models.base import FlopCount, SegmentationModel, fold_batch_norms, forward_gflop, logits_to_probabilities
from wsiseg.runtime import resolve_device
from wsiseg.tiling import Box, TileGrid, linear_resample, round_up, sample_plan

#: Folded inference copies by model, for runners made again and again on the same weights (one per image
#: in evaluation): ``model -> {(device, memory format): (state, copy)}``.
_INFERENCE_COPIES: weakref.WeakKeyDictionary[nn.Module, dict[Any, tuple[tuple[tuple[int, int], ...], nn.Module]]] = (
    weakref.WeakKeyDictionary()
)


def _inference_copy(model: nn.Module, device: torch.device, memory_format: torch.memory_format) -> nn.Module:
    """``fold_batch_norms(model)`` on ``device``, reused while ``model``'s tensors are the same objects
    at the same versions (an optimiser step or ``load_state_dict`` changes a version, so a model in
    training gets a fresh copy after each step); folding costs about 20 ms, a Model 1 pass on a
    validation image 50 ms."""
    state = tuple((id(t), t._version) for t in itertools.chain(model.parameters(), model.buffers()))
    copies = _INFERENCE_COPIES.setdefault(model, {})
    cached = copies.get((device, memory_format))
    if cached is not None and cached[0] == state:
        return cached[1]
    folded = fold_batch_norms(model)
    if folded is model:  # not copied: move it as it is, keep nothing
        return model.to(device, memory_format=memory_format)
    folded = folded.to(device, memory_format=memory_format)
    copies[(device, memory_format)] = (state, folded)
    return folded


class ModelRunner:
    """Runs a model in inference mode on batches of uint8 RGB windows.

    Parameters
    ----------
    model : SegmentationModel
        Put in eval mode; the runner holds a copy of it with its batch norms
        folded into the convolutions (:func:`~wsiseg.models.base.fold_batch_norms`),
        moved to ``device``, made once per model state (:func:`_inference_copy`).
    device : str or torch.device
        ``"auto"``: CUDA when available, else CPU.
    channels_last : bool, optional
        Use the channels-last memory layout (faster convolutions on CPU);
        defaults to True on CPU.
    count_work : bool
        Count model FLOPs inside :meth:`counting` (once per input shape, on
        the meta device); off for short-lived runners, where the count would
        cost more than it tells.

    Attributes
    ----------
    batch_size : int
        Default windows per forward pass: 1 on the CPU, 4 on a GPU.
    """

    def __init__(
        self,
        model: SegmentationModel,
        device: str | torch.device = "auto",
        channels_last: bool | None = None,
        count_work: bool = True,
    ) -> None:
        self.device = resolve_device(device)
        self.channels_last = self.device.type == "cpu" if channels_last is None else channels_last
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        model.eval()
        self.model = _inference_copy(model, self.device, memory_format)
        self.batch_size = 1 if self.device.type == "cpu" else 4
        self.count_work = count_work
        self._gflop_per_image: dict[tuple[int, int], float] = {}
        self._counter = threading.local()

    def gflop_per_image(self, height: int, width: int) -> float:
        """Floating-point work (GFLOP) of one forward pass on an ``height x width`` input,
        counted once per shape (see :func:`~wsiseg.models.base.forward_gflop`): on the
        first batch of that shape :meth:`predict` runs, else by a pass of its own."""
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
        work = getattr(self._counter, "work", None) if self.count_work else None
        shape = tuple(images.shape[1:3])
        counting = FlopCount(self.model) if work is not None and shape not in self._gflop_per_image else nullcontext()
        with torch.inference_mode():
            with counting:
                logits, features = self.model(x, class_context=class_context)
            probs = logits_to_probabilities(logits)
            projected = None if project is None else project(features).float().cpu().contiguous()
        if isinstance(counting, FlopCount):
            self._gflop_per_image[shape] = counting.gflop / images.shape[0]
        if work is not None:
            work["gflop"] += images.shape[0] * self.gflop_per_image(*shape)
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


#: A batch's boxes are read as one union only while the union is at most this many times their summed area:
#: tiles batched by window shape can lie far apart (the top and the bottom row of a slide share one), and
#: their union would then span the slide (benchmarks/RESULTS.md, "The instance-aware H&E default").
UNION_SLACK = 2.0


def union_reader(read: ReadMap, boxes: list[Box]) -> ReadMap:
    """``read`` for boxes inside the union of ``boxes``, served from one read of that union.

    The union is read on the first call (not at all when nothing is asked
    for), so a stored map's chunks are decoded once for a batch of tiles
    rather than once per tile. Where the union is more than
    :data:`UNION_SLACK` times the boxes' summed area (boxes far apart), each
    call reads its own box instead, so memory follows the boxes, not the
    distance between them. A box outside the union is an error.
    """
    union = Box(min(b.y0 for b in boxes), max(b.y1 for b in boxes), min(b.x0 for b in boxes), max(b.x1 for b in boxes))
    compact = _area(union) <= UNION_SLACK * sum(_area(b) for b in boxes)
    values: list[torch.Tensor] = []

    def read_inside(box: Box) -> torch.Tensor:
        if not (union.y0 <= box.y0 <= box.y1 <= union.y1 and union.x0 <= box.x0 <= box.x1 <= union.x1):
            raise ValueError(f"box {box} lies outside the union read {union}")
        if not compact:
            return read(box)
        if not values:
            values.append(read(union))
        return values[0][(slice(None), *box.relative_to(union).slices())]

    return read_inside


def _area(box: Box) -> int:
    height, width = box.shape
    return height * width


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
