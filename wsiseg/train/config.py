"""What defines a training run: :class:`TrainConfig`, every default stated once.

``wsiseg train``'s options are built from these defaults; :mod:`wsiseg.train.fit`
runs a config. No torch here, so the command line can show the defaults
without loading it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from wsiseg.config import DEFAULT_ARCH, DEFAULT_BACKBONE, INPUT_TRANSFORMS, TwoStageConfig
from wsiseg.errors import InputError
from wsiseg.nuclei import INSTANCE_OUTPUTS
from wsiseg.uncertainty import SAMPLING_STRATEGIES

#: The phases each ``stage`` trains, in order.
PHASES = {"two-stage": ("stage1", "stage2"), "baseline": ("baseline",), "all": ("stage1", "stage2", "baseline")}
#: The losses of :mod:`wsiseg.train.losses`, by name.
LOSS_NAMES = ("focal", "ce", "ohem", "lad", "focal_dice")
#: The flow's defaults that training shares (ratio, halo, threshold).
FLOW = TwoStageConfig()


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (each item a ``wsiseg train`` flag).

    Attributes
    ----------
    dataset, data_root : the data set and its folder.
    multiclass : KITTI / BDD: 19 classes instead of vehicle vs rest.
    arch, backbone, backbone_weights : the network (weights: a local file).
    ratio : R, Model 1's downsampling factor.
    image_size : resize every image to this square (paper: 768); 0 keeps the
        native pixel size and trains on random ``crop_size`` crops.
    patches : about this many tiles per image when resizing (4, 16, 64, 128).
    tile_size : tile side at native size (default ``crop_size // 4``).
    halo : context pixels around each tile, as at inference.
    epochs, batch_size, lr, loss : optimisation (Adam); loss focal, ce, ohem, lad or focal_dice
        (focal plus the foreground's soft Dice).
    aux_weight : weight of an auxiliary head's loss (IFBFNet; the paper: 0.4).
    lad_window, lad_power : the locally adaptive loss's window and Minkowski power.
    sampling : how stage 2 picks a tile: random, weighted or highest.
    finetune : start Model 2 from Model 1 (else from scratch).
    context : give Model 2 Model 1's features.
    stage : ``two-stage``, ``baseline`` or ``all``.
    model1_from : a bundle whose Model 1 (same arch, backbone, ratio and input)
        is used as it is: stage 1 is skipped, so several stage-2 settings can
        share one Model 1 (the paper's Table 4 ablations).
    init_from : a bundle (same arch, backbone, ratio and input) whose models
        start this run's models of the same role: Model 1, Model 2 and the
        baseline are fine-tuned from it, e.g. the shipped model on one's own
        images. It must hold every model the stage trains.
    augment : the paper's augmentation: horizontal flips, ``brightness`` and
        ``contrast`` jitter, ``translate`` (upscale by up to this fraction, then
        crop) and rotations where ``rotate`` (None: where the data set's
        orientation is arbitrary); and, where non-zero, H&E ``stain_jitter``
        (:func:`~wsiseg.stain.hed_jitter`) and ``scale_jitter`` (native-size
        crops taken at a random scale, see :func:`~wsiseg.train.augment.random_crop`).
    brightfield_repeats : bright-field images (light background, see
        :func:`~wsiseg.tissue.has_dark_background`) are drawn this many times
        per epoch, fluorescence and dark-field images once: more weight for
        the stained tissue a data set like BOWL holds few of.
    synthetic_he : this fraction of training crops (with ``augment``) has its
        image replaced by an H&E-like rendering of its mask
        (:func:`~wsiseg.train.synthetic_he.render_he`): nuclei among stroma,
        fibres, cytoplasm and glass. Binary nucleus masks only.
    input_transform : ``rgb`` or ``hematoxylin`` (:class:`~wsiseg.stain.InputTransform`),
        built into the models and so recorded in the bundle.
    split_seed, seed : the 70/30 split and the training randomness.
    mpp : micrometres per pixel the models train at, recorded so that
        ``wsiseg segment`` can bring slides to it. Where the data set's own
        pixel size is known (``data_mpp``), native-size crops are resampled by
        ``data_mpp / mpp``; else the images are taken to be at ``mpp``. None:
        the data set's own pixel size, if known.
    data_mpp : micrometres per pixel of the data set's images (default: its
        own, e.g. NuInsSeg's estimate, see ``ESTIMATED_MPP``).
    instance_output : ``none``, ``border`` or ``distance``: beside the class,
        the models learn what separates touching nuclei
        (:mod:`wsiseg.nuclei`: a border class, or the distance to each
        nucleus's own border in thirds); needs a binary data set with
        instances. The models then have 3 or 4 classes.
    gamma_jitter : ``g``: each crop's intensities raised to a power between
        ``1 / (1 + g)`` and ``1 + g`` (log-uniform): paler and darker stains
        than the data set's (0 turns it off).
    touching_gaps : in the training masks, the borders of touching objects
        are background (:func:`~wsiseg.train.datasets.touching_borders`), so
        that the network leaves a gap the object split keeps; needs a data set
        with instances (NuInsSeg, BOWL, a ``folder`` of ids).
    extra_datasets : more training data, ``"name=root"`` each (their train
        splits, each resampled from its own pixel size to ``mpp``); scored on
        the main data set only.
    threshold : default tile-selection threshold stored in the bundle.
    freeze_bn_after : after this many epochs of a phase, BatchNorm layers use
        and keep their running statistics (the remaining epochs train the
        weights against the normalisation inference will use). Needed when
        batches mix very different images (BOWL: fluorescence and
        brightfield), whose per-batch statistics the running average fits
        badly. None: the usual training-mode BatchNorm throughout.
    device : auto, cpu or cuda.
    val_images : images of the test split scored at the end (0: all).
    workers : processes that crop, render and augment batches ahead of the
        training step (0: in this process). Worth it on a GPU, where making
        batches, not the network, sets the pace.
    """

    dataset: str
    data_root: str
    multiclass: bool = False
    arch: str = DEFAULT_ARCH
    backbone: str = DEFAULT_BACKBONE
    backbone_weights: str | None = None
    ratio: int = FLOW.ratio
    image_size: int = 768
    crop_size: int = 256
    patches: int = 16
    tile_size: int | None = None
    halo: int = FLOW.halo
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-4
    loss: str = "focal"
    aux_weight: float = 0.4
    lad_window: int = 5
    lad_power: float = 3.0
    sampling: str = "weighted"
    finetune: bool = True
    context: bool = True
    stage: str = "two-stage"
    model1_from: str | None = None
    init_from: str | None = None
    augment: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    translate: float = 0.1
    rotate: bool | None = None
    stain_jitter: float = 0.0
    scale_jitter: float = 0.0
    input_transform: str = "rgb"
    brightfield_repeats: int = 1
    synthetic_he: float = 0.0
    split_seed: int = 0
    seed: int = 0
    mpp: float | None = None
    data_mpp: float | None = None
    extra_datasets: tuple[str, ...] = ()
    touching_gaps: bool = False
    instance_output: str = "none"
    gamma_jitter: float = 0.0
    threshold: float = FLOW.selection.value
    freeze_bn_after: int | None = None
    device: str = "auto"
    val_images: int = 0
    workers: int = 0

    def __post_init__(self) -> None:
        self._check_choices()
        self._check_numbers()
        self._check_sources()
        self._check_geometry()

    def _check_choices(self) -> None:
        for value, choices, what in (
            (self.stage, PHASES, "stage"), (self.sampling, SAMPLING_STRATEGIES, "sampling"),
            (self.loss, LOSS_NAMES, "loss"), (self.input_transform, INPUT_TRANSFORMS, "input"),
        ):
            if value not in choices:
                raise InputError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
        if self.instance_output not in ("none", *INSTANCE_OUTPUTS):
            raise InputError(f"unknown instance output {self.instance_output!r}; choose one of none, "
                             f"{', '.join(INSTANCE_OUTPUTS)}")
        if self.instance_output != "none" and (self.multiclass or self.touching_gaps):
            raise InputError("--instance-output replaces the nucleus class; it does not apply with --multiclass "
                             "or --touching-gaps")
        if self.synthetic_he and self.multiclass:
            raise InputError("--synthetic-he renders nuclei from binary masks; it does not apply with --multiclass")

    def _check_numbers(self) -> None:
        if self.ratio < 1 or self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise InputError("ratio and batch size must be >= 1, epochs >= 0 and the learning rate > 0")
        if self.brightfield_repeats < 1:
            raise InputError(f"--brightfield-repeats must be at least 1, got {self.brightfield_repeats}")
        if self.stain_jitter < 0 or self.scale_jitter < 0 or self.gamma_jitter < 0:
            raise InputError("--stain-jitter, --scale-jitter and --gamma-jitter must be >= 0")
        if not 0.0 <= self.synthetic_he <= 1.0:
            raise InputError(f"--synthetic-he is a fraction of the crops, between 0 and 1, got {self.synthetic_he}")
        if self.workers < 0:
            raise InputError(f"--workers must be 0 or more, got {self.workers}")
        if self.patches < 1:
            raise InputError(f"--patches must be at least 1, got {self.patches}")
        for value, flag in ((self.mpp, "--mpp"), (self.data_mpp, "--data-mpp")):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InputError(f"{flag} must be a positive number of micrometres per pixel, not {value}")

    def _check_sources(self) -> None:
        """Where the models start and what else the run reads."""
        if self.model1_from is not None and "stage1" not in PHASES[self.stage]:
            raise InputError(f"--model1-from needs a stage that trains Model 2, not {self.stage!r}")
        if self.model1_from is not None and self.init_from is not None:
            raise InputError("give --model1-from or --init-from, not both")
        if (self.mpp is not None or self.data_mpp is not None or self.extra_datasets) and self.image_size:
            raise InputError("--mpp, --data-mpp and --add-dataset resample native-size crops: use them with --image-size 0")
        for entry in self.extra_datasets:
            if "=" not in entry:
                raise InputError(f"--add-dataset takes NAME=ROOT (e.g. bowl=data/stage1_train), not {entry!r}")

    def _check_geometry(self) -> None:
        side = self.side
        if side % self.ratio:
            raise InputError(f"the training image side {side} must be a multiple of the ratio {self.ratio}")
        if self.tile + 2 * self.halo > side:
            raise InputError(f"tile {self.tile} plus twice the halo {self.halo} exceeds the training image side {side}")

    @property
    def side(self) -> int:
        """Side of the square training images."""
        return self.image_size or self.crop_size

    @property
    def tile(self) -> int:
        """Tile side: ``round(image_size / sqrt(patches))`` when resizing (16 patches of
        768 give 192-pixel tiles; 128 give 68, a 12 x 12 grid), else ``tile_size``."""
        if self.image_size:
            return max(1, round(self.image_size / math.sqrt(self.patches)))
        return self.tile_size or self.crop_size // 4

    def loss_function(self) -> Callable[[Any, Any], Any]:
        """The configured loss (torch tensors in and out), with the locally adaptive loss's options bound."""
        from wsiseg.train.losses import get_loss

        if self.loss == "lad":
            return get_loss("lad", window=self.lad_window, power=self.lad_power)
        return get_loss(self.loss)

    def signature(self) -> dict[str, Any]:
        """The settings that must match for a checkpoint to be resumed.

        Settings added after checkpoints were first written are left out while
        at their defaults, so that those checkpoints still resume.
        """
        ignored = {"device", "val_images", "workers"}
        return {
            f.name: getattr(self, f.name) for f in fields(self)
            if f.name not in ignored and not (f.name in _ADDED_LATER and getattr(self, f.name) == f.default)
        }


#: TrainConfig fields newer than the checkpoint format (see :meth:`TrainConfig.signature`).
_ADDED_LATER = frozenset({"init_from", "brightfield_repeats", "synthetic_he", "data_mpp", "extra_datasets",
                          "touching_gaps",
                          "instance_output", "gamma_jitter"})


def train_defaults() -> dict[str, Any]:
    """Every :class:`TrainConfig` field's default, by name (the required ``dataset`` and ``data_root`` left out)."""
    return {f.name: f.default for f in fields(TrainConfig) if f.name not in ("dataset", "data_root")}
