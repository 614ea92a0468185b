"""Settings of the two-stage flow, typed, with every default stated once.

Three objects, one job each:

- :class:`TwoStageConfig`: how the flow runs (ratio, tiles, halo, selection,
  uncertainty, blending, stage-1 blocks, context). The same object drives an
  in-memory image, an evaluation and a whole slide.
- :class:`BundleSettings`: what a bundle records about its models (the flow
  they were trained for, their pixel size, class names), read from the
  bundle's JSON config with type checks; absent keys take
  :class:`TwoStageConfig`'s defaults.
- :class:`RunOptions`: what one slide run adds (device, reader, output
  handling, extra outputs, scheduling): nothing about the flow itself.

No torch here: the driver reads settings without loading any model.
"""

from __future__ import annotations

import math

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from wsiseg.domain import DomainProfile
from wsiseg.errors import BundleError, InputError
from wsiseg.uncertainty import UNCERTAINTY_MEASURES, TileSelection

#: The network ``wsiseg train`` builds unless told otherwise (and the shipped model's), and its backbone:
#: small enough to train on a CPU.
DEFAULT_ARCH = "unet"
DEFAULT_BACKBONE = "resnet_lite"
#: What a network may see: the RGB image, or the hematoxylin density of colour deconvolution.
INPUT_TRANSFORMS = ("rgb", "hematoxylin")
#: Where models run: ``auto`` is CUDA when a GPU is visible, else the CPU.
DEVICES = ("auto", "cpu", "cuda")
#: The slide pixels an output holds as its image (:attr:`RunOptions.pixels`).
OUTPUT_PIXELS = ("low", "full")
#: Formats of the objects table (:attr:`RunOptions.table_format`).
TABLE_FORMATS = ("parquet", "csv")

#: Tile side used when none is given. On a tiled slide the tile is the multiple
#: of the file's own tile nearest to this (see :func:`wsiseg.run.plan.auto_tile_size`).
AUTO_TILE_SIZE = 512


@dataclass(frozen=True)
class TwoStageConfig:
    """Parameters of the two-stage flow.

    Attributes
    ----------
    ratio : int
        Downsampling factor of Model 1's input (the paper's R).
    tile_size : int or None
        Full-resolution tile side, a multiple of Model 2's feature stride.
        None: :data:`AUTO_TILE_SIZE`, aligned to a slide's own tiles.
    halo : int
        Pixels read around each tile for Model 2 (rounded up to a multiple of
        the feature stride).
    selection : TileSelection
        Which tiles Model 2 refines.
    uncertainty : {"entropy", "margin"}
        Per-pixel uncertainty measure.
    blend : int
        Width in pixels of the linear ramp between refined and unrefined tiles.
    stage1_block, stage1_halo : int
        Side and halo of Model 1's low-resolution blocks (low-resolution pixels).
    context : bool
        Give Model 2 Model 1's features (False for a Model 2 trained without
        them, the paper's "context off" ablation).
    stage1_on_tissue : bool
        With a tissue mask, Model 1 runs only on the blocks that the tissue
        tiles read (their windows and the probabilities they are composed
        from); the other blocks' maps are background without a forward pass,
        as full resolution treats glass. The mask over tissue is the same
        either way (``tests/test_tissue.py``).
    """

    ratio: int = 4
    tile_size: int | None = None
    halo: int = 32
    selection: TileSelection = field(default_factory=lambda: TileSelection.threshold(0.25))
    uncertainty: str = "entropy"
    blend: int = 16
    stage1_block: int = 512
    stage1_halo: int = 32
    context: bool = True
    stage1_on_tissue: bool = True

    def __post_init__(self) -> None:
        for name in ("ratio", "tile_size", "stage1_block"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InputError(f"{name} must be a whole number >= 1, got {value!r}")
        for name in ("halo", "blend", "stage1_halo"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InputError(f"{name} must be a whole number >= 0, got {value!r}")
        if self.uncertainty not in UNCERTAINTY_MEASURES:
            raise InputError(f"unknown uncertainty {self.uncertainty!r}; use {' or '.join(UNCERTAINTY_MEASURES)}")
        if not isinstance(self.selection, TileSelection):
            raise InputError(f"selection must be a TileSelection, got {self.selection!r}")

    def with_overrides(self, **given: Any) -> TwoStageConfig:
        """A copy with the given fields replaced; None values are ignored (not given)."""
        return replace(self, **{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True)
class BundleSettings:
    """A bundle's recorded settings, typed: written by :meth:`to_config`, read by :meth:`from_config`.

    Attributes
    ----------
    flow : TwoStageConfig
        The flow the models were trained and scored with (its selection a
        threshold: the default one); ``tile_size`` is the tile of the
        training images (None when not recorded).
    mpp : float or None
        Micrometres per pixel the models were trained at.
    mpp_range : (float, float) or None
        The pixel sizes the training crops spanned (scale jitter): a slide
        coarser than ``mpp`` but inside it is read as it is, one coarser still
        with a warning (see :func:`scale_factor`). None: ``mpp`` only.
    classes : tuple of str or None
        Class names, background first.
    image_size : int or None
        Training images were resized to this square (evaluation does the same).
    domain : DomainProfile or None
        What the bundle's validation images looked like to it (:mod:`wsiseg.domain`);
        None for bundles made before profiles (no domain warning then).
    """

    flow: TwoStageConfig = field(default_factory=TwoStageConfig)
    mpp: float | None = None
    mpp_range: tuple[float, float] | None = None
    classes: tuple[str, ...] | None = None
    image_size: int | None = None
    domain: DomainProfile | None = None

    def __post_init__(self) -> None:
        if self.flow.selection.kind != "threshold":
            raise InputError(f"a bundle's default selection is a threshold, not {self.flow.selection.describe()}")
        if self.mpp is not None and not (math.isfinite(self.mpp) and self.mpp > 0):
            raise InputError(f"mpp must be positive, got {self.mpp!r}")
        if self.mpp_range is not None:
            low, high = self.mpp_range
            if self.mpp is None or not 0 < low <= self.mpp <= high:
                raise InputError(f"mpp_range must hold mpp between two positive bounds, got {self.mpp_range!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "bundle") -> BundleSettings:
        """Read the keys wsiseg uses from a bundle's JSON config; other keys are records.

        Raises
        ------
        BundleError
            When a key has the wrong type or an impossible value.
        """
        defaults = TwoStageConfig()
        try:
            flow = TwoStageConfig(
                ratio=_typed(config, "ratio", int, defaults.ratio),
                tile_size=_typed(config, "tile_size", int, defaults.tile_size),
                halo=_typed(config, "halo", int, defaults.halo),
                selection=TileSelection.threshold(_typed(config, "threshold", float, defaults.selection.value)),
                uncertainty=_typed(config, "uncertainty", str, defaults.uncertainty),
                context=_typed(config, "context", bool, defaults.context),
            )
            classes = config.get("classes")
            if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
                raise InputError(f"classes must be a list of names, got {classes!r}")
            mpp_range = config.get("mpp_range")
            if mpp_range is not None and not (
                isinstance(mpp_range, list) and len(mpp_range) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in mpp_range)
            ):
                raise InputError(f"mpp_range must be a list of two numbers, got {mpp_range!r}")
            try:
                domain = DomainProfile.from_config(config)
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(f"domain must hold backgrounds, score_high, foreground_low and images ({exc!r})") from exc
            return cls(flow, _typed(config, "mpp", float, None),
                       (float(mpp_range[0]), float(mpp_range[1])) if mpp_range else None,
                       tuple(classes) if classes else None, _typed(config, "image_size", int, None) or None, domain)
        except InputError as exc:
            raise BundleError(f"{source}: its config is invalid ({exc})") from exc

    def to_config(self) -> dict[str, Any]:
        """The keys :meth:`from_config` reads, as a bundle's JSON config stores them."""
        flow = self.flow
        return {
            "ratio": flow.ratio, "tile_size": flow.tile_size, "halo": flow.halo, "uncertainty": flow.uncertainty,
            "threshold": flow.selection.value, "context": flow.context,
            "classes": list(self.classes) if self.classes else None, "image_size": self.image_size,
            "mpp": self.mpp, "mpp_range": list(self.mpp_range) if self.mpp_range else None,
            "domain": self.domain.to_config() if self.domain else None,
        }

    def for_slides(self) -> TwoStageConfig:
        """The flow on slides: the bundle's, with the tile chosen per slide
        (the training images' tile is sized for those small images; the run's
        report says which tile it used)."""
        return replace(self.flow, tile_size=None)


def _typed(config: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    value = config.get(key)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InputError(f"{key} must be {kind.__name__}, got {value!r}")
    return value


@dataclass(frozen=True)
class RunOptions:
    """What a run adds to the flow: model, device, reading, output handling.

    Attributes
    ----------
    model : str or None
        Bundle path; None (or ``"wsiseg:default"``) for the shipped model.
    full_resolution : bool
        Run the bundle's single model on every tile instead (the baseline).
    device : {"auto", "cpu", "cuda"}
        Where models run.
    batch_size : int or None
        Windows per Model 2 forward pass; None: 1 on the CPU (as fast per
        window there, with less memory), 4 on a GPU.
    backend : str
        Slide reader (see :func:`wsiseg.slide.open_slide`).
    rescale : bool
        Work at the bundle's pixel size when both pixel sizes are known.
    overwrite, resume : bool
        Replace an existing wsiseg output, or continue an interrupted one.
    geojson : bool
        Also write GeoJSON QuPath imports: the objects as detections (with
        ``objects``), else the mask's regions as annotations (``mask.geojson``).
    pixels : {"low", "full"}
        The slide's pixels ``OUT.zarr`` holds as its image: the view Model 1
        read (free), or a full-resolution copy (see :func:`wsiseg.run.plan.make_plan`).
    mpp : float or None
        Micrometres per level-0 pixel, for inputs whose file does not say
        (it replaces the file's value when both are given).
    objects : bool
        Also write nucleus instances (``labels/objects``) and their table.
    max_object_size : int or None
        Regions wider or taller than this (mask pixels) are not objects;
        default: 40 um (128 pixels without a pixel size), at most the tile size.
    min_object_area : int or None
        Objects of fewer mask pixels are specks, not nuclei; default 8 um^2
        (none dropped without a pixel size).
    table_format : {"parquet", "csv"}
        The objects table's format.
    tissue : bool
        Detect tissue on a thumbnail first (:mod:`wsiseg.tissue`): outside it
        the mask is 0 and no tile is refined.
    tiles_per_task : int
        Selected tiles per Model 2 task (a task runs them in batches).
    max_in_flight : int or None
        Tasks submitted ahead of completion (default 4 per worker thread).
    fixed_ratio : bool
        Model 1 runs at the flow's ratio on every slide (``--ratio`` was
        given) instead of one adapted to the slide's pixel size
        (:func:`model1_ratio`).
    """

    model: str | None = None
    full_resolution: bool = False
    device: str = "auto"
    batch_size: int | None = None
    backend: str = "auto"
    rescale: bool = True
    overwrite: bool = False
    resume: bool = False
    geojson: bool = False
    pixels: str = "low"
    mpp: float | None = None
    objects: bool = False
    max_object_size: int | None = None
    min_object_area: int | None = None
    table_format: str = "parquet"
    tissue: bool = True
    tiles_per_task: int = 4
    max_in_flight: int | None = None
    fixed_ratio: bool = False

    def __post_init__(self) -> None:
        if self.overwrite and self.resume:
            raise InputError("give either --overwrite or --resume, not both")
        if self.pixels not in OUTPUT_PIXELS:
            raise InputError(f"--pixels must be {' or '.join(OUTPUT_PIXELS)}, not {self.pixels!r}")
        if self.table_format not in TABLE_FORMATS:
            raise InputError(f"--table-format must be {' or '.join(TABLE_FORMATS)}, not {self.table_format!r}")
        if self.mpp is not None and not (self.mpp > 0 and math.isfinite(self.mpp)):
            raise InputError(f"--mpp must be a positive number of micrometres per pixel, not {self.mpp}")
        if self.min_object_area is not None and self.min_object_area < 0:
            raise InputError(f"--min-object-area must be 0 or more, got {self.min_object_area}")
        for name in ("batch_size", "tiles_per_task", "max_in_flight", "max_object_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name.replace('_', '-')} must be at least 1, got {value}")


#: Pixel-size ratios within this fraction of 1 are not resampled.
SCALE_TOLERANCE = 0.05


def scale_factor(
    image_mpp: float, model_mpp: float, mpp_range: tuple[float, float] | None = None
) -> tuple[float, str]:
    """How much to downsample an image of ``image_mpp`` for a model, and why.

    An image finer than the model's pixel size (beyond :data:`SCALE_TOLERANCE`)
    is downsampled to it: a model trained across a range of pixel sizes still
    does best at its centre (benchmarks/RESULTS.md, "A default model trained on real H&E nuclei", "Pixel size"). A coarser one
    is never upsampled; up to the coarse end of ``mpp_range`` (the range its
    training crops spanned) it is what the model was trained on.

    Returns
    -------
    factor, decision
        ``factor`` >= 1 (1: as it is); ``decision`` one of ``"native"``,
        ``"downsampled"``, ``"coarser"`` (coarser than the model was trained on).
    """
    high = mpp_range[1] if mpp_range else model_mpp
    if image_mpp * (1 + SCALE_TOLERANCE) < model_mpp:
        return model_mpp / image_mpp, "downsampled"
    if image_mpp > high * (1 + SCALE_TOLERANCE):
        return 1.0, "coarser"
    return 1.0, "native"


def model1_ratio(ratio: int, model_mpp: float | None, work_mpp: float | None) -> int:
    """Model 1's downsampling for an image worked at ``work_mpp``: Model 1 kept near its trained pixel size.

    The bundle's ``ratio`` holds where the image is worked at the model's
    pixel size. Where it is worked coarser (a 20x slide inside the model's
    trained range is read as it is, not upsampled), the ratio shrinks so
    that Model 1 still sees pixels of about ``ratio x model_mpp``: rounded,
    at least 1. For the shipped model (0.316 um, ratio 4) a 0.5 um slide
    gets 3, which scored 4.4 points of Dice above 4 on 20x images
    (benchmarks/RESULTS.md, "A default model trained on real H&E nuclei",
    "Model 1 on 20x slides").
    """
    if not model_mpp or not work_mpp or work_mpp <= model_mpp * (1 + SCALE_TOLERANCE):
        return ratio
    return max(1, round(ratio * model_mpp / work_mpp))


@dataclass(frozen=True)
class ResolvedFlow:
    """The flow one image runs with, and the pixels it is worked at.

    Attributes
    ----------
    config : TwoStageConfig
        The flow (``tile_size`` None: chosen per image, see :data:`AUTO_TILE_SIZE`).
    downsample : float
        Image pixels per working pixel: >= 1 from the pixel-size rule
        (:func:`scale_factor`); below 1 only where a caller asked for a finer
        working pixel size (evaluation's ``--work-mpp``).
    work_mpp : float or None
        Micrometres per working pixel (None: the image's pixel size is unknown).
    note : dict
        What was decided about Model 1's ratio, and why (part of a report's
        ``working_resolution``); empty when the ratio is the flow's.
    """

    config: TwoStageConfig
    downsample: float = 1.0
    work_mpp: float | None = None
    note: dict[str, Any] = field(default_factory=dict)


def resolve_flow(
    settings: BundleSettings,
    image_mpp: float | None,
    overrides: Mapping[str, Any] | None = None,
    *,
    rescale: bool = True,
    full_resolution: bool = False,
    fixed_ratio: bool = False,
    work_mpp: float | None = None,
) -> ResolvedFlow:
    """The one resolution of a run's settings: the bundle's, the image's pixel size, the user's overrides.

    ``wsiseg segment`` (every slide), ``wsiseg evaluate`` and ``wsiseg
    calibrate`` (every image) and the benchmarks call it, so that what is
    scored is what runs on slides: the tile chosen per image (about 512
    pixels) instead of the training images' tile, the pixel-size rule
    (:func:`scale_factor`) and Model 1's ratio rule (:func:`model1_ratio`).

    Parameters
    ----------
    settings : BundleSettings
    image_mpp : float or None
        Micrometres per pixel of the image (None: unknown, worked as it is).
    overrides : mapping, optional
        :class:`TwoStageConfig` fields the user set (None values ignored). A
        ``ratio`` given is run as it is.
    rescale : bool
        Bring the image to the bundle's pixel size (``--no-rescale``: as it is).
    full_resolution : bool
        The baseline: no Model 1, so no ratio to adapt.
    fixed_ratio : bool
        Keep the flow's ratio on every image (a caller's own flow).
    work_mpp : float, optional
        Work at exactly this pixel size instead of the rule's choice
        (upsampling too; evaluation's research setting).
    """
    overrides = dict(overrides or {})
    config = settings.for_slides().with_overrides(**overrides)
    downsample = 1.0
    if image_mpp and work_mpp:
        downsample = work_mpp / image_mpp
    elif image_mpp and settings.mpp and rescale:
        downsample = scale_factor(image_mpp, settings.mpp, settings.mpp_range)[0]
    worked = image_mpp * downsample if image_mpp else None
    note: dict[str, Any] = {}
    if not (fixed_ratio or full_resolution or overrides.get("ratio") is not None):
        ratio = model1_ratio(config.ratio, settings.mpp, worked)
        if ratio != config.ratio:
            note = {"model1_ratio": ratio,
                    "model1_ratio_why": (f"the bundle's ratio {config.ratio} is for {settings.mpp:g} um pixels; at "
                                         f"{worked:.3g} um Model 1 runs at 1/{ratio}, near its trained "
                                         f"{config.ratio * settings.mpp:.3g} um (--ratio sets it)")}
            config = replace(config, ratio=ratio)
    return ResolvedFlow(config, downsample, worked, note)


__all__ = ["AUTO_TILE_SIZE", "BundleSettings", "ResolvedFlow", "RunOptions", "TwoStageConfig", "model1_ratio",
           "resolve_flow", "scale_factor"]
