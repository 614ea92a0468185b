"""A run's plan: pure geometry and settings, decided before any task runs.

:func:`make_plan` turns an image description, the flow's settings and the
models' facts (feature strides, class count) into a :class:`Plan`: the
working resolution, the tile grid, Model 1's level and scale, the shapes of
the stored maps. It reads no pixels and needs no torch and no cluster, so
every decision is testable on its own. A plan is small and picklable when
its source, store and model source are (a slide, an OME-Zarr output and a
bundle path): it travels to Dask workers with every task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from wsiseg.config import AUTO_TILE_SIZE, TwoStageConfig, scale_factor
from wsiseg.errors import InputError
from wsiseg.output import ArraySpec
from wsiseg.slide import Level
from wsiseg.tiling import Box, TileGrid, round_up, scaled_size
from wsiseg.ngff import CONTEXT, IMAGE, MASK, PROBABILITY, REFINED, TILE_SCORES, TISSUE, UNCERTAINTY
from wsiseg.tissue import TISSUE_MAX_SIDE


class Source(Protocol):
    """Pixels of an image pyramid (a :class:`~wsiseg.slide.Slide` or an image in memory)."""

    levels: tuple[Level, ...]
    mpp: tuple[float, float] | None

    def read_region(self, level: int, box: Box) -> np.ndarray: ...


class Store(Protocol):
    """Named arrays a run reads and writes (an OME-Zarr output or arrays in memory)."""

    def array(self, name: str) -> Any: ...

    def has(self, name: str) -> bool: ...


class ModelSource(Protocol):
    """Runners by bundle role (``model1``, ``model2``, ``model``)."""

    def runner(self, role: str) -> Any: ...


@dataclass(frozen=True)
class ModelFacts:
    """What planning needs to know of the models, without loading them.

    Attributes
    ----------
    strides : dict
        Role -> feature stride.
    num_classes : int
        Output channels (1: binary).
    grids : dict
        Role -> grid stride (see :attr:`~wsiseg.models.base.SegmentationModel.grid_stride`);
        default: the feature strides.
    """

    strides: dict[str, int]
    num_classes: int
    grids: dict[str, int] | None = None


@dataclass(frozen=True)
class Plan:
    """Everything a tile task needs.

    Attributes
    ----------
    source, store, models : Source, Store, ModelSource
        The run's handles: where pixels, maps and models come from (everything
        else is geometry and settings, :meth:`geometry`).
    stage2_role : str
        ``model2``, or ``model`` for the full-resolution baseline.
    full_resolution : bool
        No stage 1: the baseline model on every tile.
    work_level, work_coarsen : int, int or float
        The working resolution: this level, block-averaged by this factor
        (area-resampled where it is not whole, see :func:`view_for`).
    tile_size, halo, blend : int
        Full-resolution tile side, Model 2's halo, blend ramp (working pixels).
    stage1_level, stage1_coarsen : int, int or float
        Model 1's input: this level, block-averaged (or area-resampled) by this factor.
    stage1_shape : (h, w)
        Size of Model 1's input and maps (the low resolution).
    stage1_scale : (sy, sx)
        Working pixels per low-resolution pixel.
    stage1_block, stage1_halo, stage1_stride : int
        Stage-1 block side and halo (low-resolution pixels); Model 1's feature stride.
    context_shape : (fh, fw)
        Size of the stored projected context (Model 1's feature grid).
    uncertainty : str
    context : bool
        Model 2 gets Model 1's context.
    num_classes : int
    batch_size : int or None
        Windows per Model 2 forward pass (None: the runner's default).
    image_level, image_coarsen : int
        The slide's pixels an output holds (:data:`~wsiseg.ngff.IMAGE`): this level,
        block-averaged by this factor (see :func:`make_plan`'s ``pixels``).
    tissue_level, tissue_coarsen : int or None, int
        The thumbnail tissue is detected on (:mod:`wsiseg.tissue`): this level,
        block-averaged by this factor; None: no tissue mask (every tile counts).
    stage1_on_tissue : bool
        Model 1 only on the blocks tissue tiles need (:func:`stage1_blocks_needed`).
    """

    source: Source
    store: Store
    models: ModelSource
    stage2_role: str
    full_resolution: bool
    work_level: int
    work_coarsen: float
    tile_size: int
    halo: int
    blend: int
    stage1_level: int
    stage1_coarsen: float
    stage1_shape: tuple[int, int]
    stage1_scale: tuple[float, float]
    stage1_block: int
    stage1_halo: int
    stage1_stride: int
    context_shape: tuple[int, int]
    uncertainty: str
    context: bool
    num_classes: int
    batch_size: int | None
    image_level: int = 0
    image_coarsen: float = 1
    tissue_level: int | None = None
    tissue_coarsen: int = 1
    stage1_on_tissue: bool = True

    @property
    def work_shape(self) -> tuple[int, int]:
        """Size of the working resolution."""
        h, w = self.source.levels[self.work_level].shape
        return scaled_size(h, self.work_coarsen), scaled_size(w, self.work_coarsen)

    @property
    def work_downsample(self) -> tuple[float, float]:
        """Level-0 pixels per working pixel."""
        (h0, w0), (h, w) = self.source.levels[0].shape, self.work_shape
        return h0 / h, w0 / w

    @property
    def image_shape(self) -> tuple[int, int]:
        """Size of the output's pixels (:data:`~wsiseg.ngff.IMAGE` is ``(3, *image_shape)``)."""
        h, w = self.source.levels[self.image_level].shape
        return scaled_size(h, self.image_coarsen), scaled_size(w, self.image_coarsen)

    @property
    def image_step(self) -> tuple[float, float]:
        """Level-0 pixels per pixel of the output's pixels."""
        (h0, w0), (h, w) = self.source.levels[0].shape, self.source.levels[self.image_level].shape
        return h0 / h * self.image_coarsen, w0 / w * self.image_coarsen

    @property
    def tissue_shape(self) -> tuple[int, int]:
        """Size of the tissue mask (:data:`~wsiseg.ngff.TISSUE`)."""
        h, w = self.source.levels[self.tissue_level or 0].shape
        return -(-h // self.tissue_coarsen), -(-w // self.tissue_coarsen)

    @property
    def tissue_step(self) -> tuple[float, float]:
        """Working pixels per tissue-mask pixel."""
        (h, w), (lh, lw) = self.source.levels[0].shape, self.source.levels[self.tissue_level or 0].shape
        wy, wx = self.work_downsample
        return h / lh * self.tissue_coarsen / wy, w / lw * self.tissue_coarsen / wx

    @property
    def image_from_stage1(self) -> bool:
        """The output's pixels are Model 1's input, written by stage 1 as it reads them."""
        return not self.full_resolution and (
            (self.image_level, self.image_coarsen) == (self.stage1_level, self.stage1_coarsen)
        )

    @property
    def grid(self) -> TileGrid:
        """The full-resolution tile grid (the mask's chunk grid)."""
        return TileGrid(*self.work_shape, self.tile_size)

    @property
    def stage1_grid(self) -> TileGrid:
        """Model 1's blocks over the low-resolution view."""
        return TileGrid(*self.stage1_shape, self.stage1_block)

    def geometry(self) -> dict[str, Any]:
        """The settings that fix the output (for resuming): every field but the handles."""
        return {
            name: getattr(self, name) for name in self.__dataclass_fields__
            if name not in ("source", "store", "models")
        }

    def arrays(self) -> list[ArraySpec]:
        """The arrays this run writes: name, shape, chunks (tiles and blocks), dtype."""
        t = self.tile_size
        side = self.stage1_block if self.image_from_stage1 else t  # one writer per chunk
        specs = [ArraySpec(MASK, self.work_shape, (t, t), "uint8"),
                 ArraySpec(REFINED, self.grid.shape, self.grid.shape, "uint8"),
                 ArraySpec(IMAGE, (3, *self.image_shape), (3, side, side), "uint8")]
        if self.tissue_level is not None:
            specs.append(ArraySpec(TISSUE, self.tissue_shape, (256, 256), "uint8"))
        if self.full_resolution:
            return specs
        b, (h, w), c = self.stage1_block, self.stage1_shape, self.num_classes
        specs += [
            ArraySpec(PROBABILITY, (c, h, w), (c, b, b), "float32"),
            ArraySpec(UNCERTAINTY, (h, w), (b, b), "float32"),
            ArraySpec(TILE_SCORES, self.grid.shape, self.grid.shape, "float32"),
        ]
        if self.context:
            fb = self.stage1_block // self.stage1_stride
            specs.append(ArraySpec(CONTEXT, (c, *self.context_shape), (c, fb, fb), "float32"))
        return specs


def make_plan(
    source: Source,
    store: Store,
    models: ModelSource,
    facts: ModelFacts,
    config: TwoStageConfig,
    full_resolution: bool = False,
    batch_size: int | None = None,
    working: tuple[int, int] = (0, 1),
    pixels: str = "low",
    tissue: bool = False,
) -> Plan:
    """Decide the run's geometry.

    Parameters
    ----------
    source : Source
        The image; only its level sizes and tile shapes are used.
    facts : ModelFacts
    config : TwoStageConfig
    full_resolution : bool
        Plan the baseline (role ``model``) on every tile.
    working : (level, coarsen)
        The working resolution (see :func:`working_scale`).
    pixels : {"low", "full"}
        The slide's pixels an output holds: ``low``, the view Model 1 reads
        (at 1/ratio; stage 1 writes it as it reads it, no extra decoding), or
        ``full``, a copy at the working resolution.
    tissue : bool
        Detect tissue on a thumbnail (:func:`tissue_view`) and keep the mask
        and refinement to it.

    Raises
    ------
    InputError
        A tile size that is not a multiple of Model 2's stride.
    """
    stage2_role = "model" if full_resolution else "model2"
    stride2 = facts.strides[stage2_role]
    # Halos (and chosen tiles) are multiples of the grid stride, so windows sample the image
    # on the whole image's grid (measured in benchmarks/RESULTS.md, "Seam error").
    grid2 = (facts.grids or facts.strides)[stage2_role]
    work_level, work_coarsen = working
    file_tile = source.levels[work_level].tile_shape if work_coarsen == 1 else None
    tile = config.tile_size or auto_tile_size(file_tile, grid2)
    if tile % stride2:
        raise InputError(f"tile size {tile} must be a multiple of the model's feature stride {stride2}")
    halo = round_up(config.halo, grid2)
    if pixels not in ("low", "full"):
        raise InputError(f"pixels must be 'low' or 'full', not {pixels!r}")
    work_h, work_w = (scaled_size(n, work_coarsen) for n in source.levels[work_level].shape)
    work_ds = float(np.mean(source.levels[work_level].downsample)) * work_coarsen
    low_view = view_for(source, config.ratio * work_ds)
    image_view = low_view if pixels == "low" else (work_level, work_coarsen)
    if full_resolution:
        level, coarsen, low_shape, scale, block, stride1 = 0, 1, (1, 1), (1.0, 1.0), 1, 1
    else:
        level, coarsen = low_view
        lh, lw = source.levels[level].shape
        low_shape = (scaled_size(lh, coarsen), scaled_size(lw, coarsen))
        scale = (work_h / lh * coarsen, work_w / lw * coarsen)
        stride1 = facts.strides["model1"]
        block = round_up(config.stage1_block, stride1)
    return Plan(
        source=source, store=store, models=models, stage2_role=stage2_role, full_resolution=full_resolution,
        work_level=work_level, work_coarsen=work_coarsen, tile_size=tile, halo=halo, blend=config.blend,
        stage1_level=level, stage1_coarsen=coarsen, stage1_shape=low_shape, stage1_scale=scale, stage1_block=block,
        stage1_halo=config.stage1_halo, stage1_stride=stride1,
        context_shape=(-(-low_shape[0] // stride1), -(-low_shape[1] // stride1)),
        uncertainty=config.uncertainty, context=config.context and not full_resolution,
        num_classes=facts.num_classes, batch_size=batch_size,
        image_level=image_view[0], image_coarsen=image_view[1],
        **(dict(zip(("tissue_level", "tissue_coarsen"), tissue_view(source, config.ratio * work_ds))) if tissue else {}),
        stage1_on_tissue=config.stage1_on_tissue,
    )


def tissue_view(source: Any, finest: float, max_side: int = TISSUE_MAX_SIDE) -> tuple[int, int]:
    """Level and whole coarsening factor of the thumbnail tissue is detected on.

    Its downsample (level-0 pixels per pixel) is ``finest`` (Model 1's) or,
    for large slides, what brings the longest side to ``max_side``; it is read
    from the coarsest level at or below that downsample, so a slide with a
    pyramid decodes little.
    """
    target = max(finest, max(source.levels[0].shape) / max_side)
    level = max(
        (i for i, lv in enumerate(source.levels) if float(np.mean(lv.downsample)) <= target * 1.01), default=0
    )
    return level, max(1, int(target / float(np.mean(source.levels[level].downsample)) + 0.01))


def auto_tile_size(file_tile: tuple[int, int] | None, stride: int, target: int = AUTO_TILE_SIZE) -> int:
    """A tile side near ``target``: a multiple of the model stride and, when such
    a multiple exists under ``2 * target``, of the file's own tile side too (so
    that no file tile straddles two of ours and none is decoded twice)."""
    if file_tile and file_tile[0] == file_tile[1]:
        unit = math.lcm(stride, int(file_tile[0]))
        if unit <= 2 * target:
            return max(1, round(target / unit)) * unit
    return round_up(target, stride)


def view_for(source: Any, downsample: float) -> tuple[int, float]:
    """Level and coarsening factor that give ``downsample`` (level-0 pixels per pixel).

    The coarsest level whose downsample divides it (within 1 %) gives a whole
    factor: block means of the level's own pixels. Otherwise the coarsest
    level finer than it is area-resampled by the remaining, non-integer
    factor. A 0.5 um slide read at 1/3 therefore takes block means of 3 over
    level 0, not level 1 resampled by 1.5: that decodes 4 times the pixels,
    but reading level 1 cost Model 1 1.7 points of Dice on the val split
    stored as a slide (``benchmarks/RESULTS.md``, "Where stage 1 reads on
    20x slides").
    """
    def level_downsample(index: int) -> float:
        return float(np.mean(source.levels[index].downsample))

    for level in range(len(source.levels) - 1, -1, -1):
        whole = round(downsample / level_downsample(level))
        if whole >= 1 and abs(downsample / level_downsample(level) - whole) <= 0.01 * whole:
            return level, whole
    level = max((i for i in range(len(source.levels)) if level_downsample(i) <= downsample * 1.01), default=0)
    return level, downsample / level_downsample(level)


def working_scale(
    source: Any, model_mpp: float | None, rescale: bool, mpp_range: tuple[float, float] | None = None
) -> tuple[tuple[int, float], dict[str, Any]]:
    """Level and coarsening factor at which the image matches the model's pixel sizes (:func:`scale_factor`).

    Any factor above 1 is honoured, whole or not (see :func:`view_for`);
    slides coarser than the model are not upsampled.

    Returns
    -------
    (level, coarsen), note
        ``note`` says what was decided and why (for the report).
    """
    mpp = source.mpp
    note: dict[str, Any] = {"model_mpp": model_mpp, "slide_mpp": list(mpp) if mpp else None}
    if mpp_range:
        note["model_mpp_range"] = list(mpp_range)
    if not rescale or not model_mpp or not mpp:
        note["decision"] = "native pixels" if rescale else "native pixels (rescaling off)"
        return (0, 1), note
    slide_mpp = float(np.mean(mpp))
    factor, decision = scale_factor(slide_mpp, float(model_mpp), mpp_range)
    if decision != "downsampled":
        note["decision"] = "native pixels" + (
            " (the slide's pixels are coarser than the model's; not upsampled)" if decision == "coarser" else ""
        )
        note["scale_mismatch"] = round(float(model_mpp) / slide_mpp, 3)
        return (0, 1), note
    level, coarsen = view_for(source, factor)
    done = float(np.mean(source.levels[level].downsample)) * coarsen
    target = slide_mpp * factor
    note.update(decision=f"downsampled by {done:.4g} to the model's pixel size ({target:.3g} um)",
                scale_mismatch=round(factor / done, 3))
    return (level, coarsen), note


def stage1_blocks_needed(plan: Plan, on_tissue: np.ndarray) -> np.ndarray:
    """``(block rows, block cols)`` bool: the stage-1 blocks that the tissue tiles read.

    For each tile on tissue: its window (tile and halo) grown by one
    low-resolution pixel, which holds the probabilities it is composed from
    (:func:`~wsiseg.tiling.stage1_crop`), the uncertainty it is scored on and
    the context Model 2 samples for it. Blocks outside every such footprint
    are glass: their maps are background and Model 1 never runs on them.
    """
    blocks = plan.stage1_grid
    needed = np.zeros(blocks.shape, bool)
    sy, sx = plan.stage1_scale
    (low_h, low_w), side = plan.stage1_shape, plan.stage1_block
    for row, col in np.argwhere(on_tissue):
        window = plan.grid.window(int(row), int(col), plan.halo)
        y0, y1 = max(0, math.floor(window.y0 / sy) - 1), min(low_h, math.ceil(window.y1 / sy) + 1)
        x0, x1 = max(0, math.floor(window.x0 / sx) - 1), min(low_w, math.ceil(window.x1 / sx) + 1)
        needed[y0 // side : (y1 - 1) // side + 1, x0 // side : (x1 - 1) // side + 1] = True
    return needed
