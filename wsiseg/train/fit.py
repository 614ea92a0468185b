"""Training with the two-stage paper's protocol (Cruz et al., Sensors 2023, §3-4).

Phases, run in order and checkpointed after every epoch:

``stage1``
    Model 1 on the image downsampled by the ratio R (block means); its
    logits are upsampled back and scored against the full-resolution mask.
``stage2``
    Model 2 starts as a copy of Model 1 (``finetune``; else fresh) and trains
    on one full-resolution window per image: a tile chosen from Model 1's
    uncertainty by ``sampling`` (random, weighted or highest), grown by the
    inference halo, with Model 1's features over that footprint as context
    (unless ``context`` is off).
``baseline``
    One model on the whole full-resolution image (the paper's comparison).

Images are resized to ``image_size`` squared (the paper: 768) or, with
``image_size=0``, cropped at their native pixel size, the setting for models
that must work on slides, which are never resized. Augmentation, loss,
optimiser (Adam) and epochs follow the paper's defaults.

Every random draw of an epoch comes from a generator seeded by (seed,
phase, epoch), so a run resumed from its checkpoint continues exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wsiseg.config import TwoStageConfig
from wsiseg.errors import InputError, WsisegError
from wsiseg.models import SegmentationModel, build_model
from wsiseg.models.registry import DEFAULT_ARCH, DEFAULT_BACKBONE
from wsiseg.models.base import logits_to_probabilities
from wsiseg.runtime import resolve_device
from wsiseg.stain import INPUT_TRANSFORMS
from wsiseg.tiling import Box, TileGrid, linear_resample, pixel_centres
from wsiseg.tissue import has_dark_background
from wsiseg.train.augment import Augmentation, random_crop
from wsiseg.train.synthetic_he import render_he
from wsiseg.train.datasets import SegmentationData, open_dataset, resize_sample
from wsiseg.train.losses import get_loss
from wsiseg.uncertainty import SAMPLING_STRATEGIES, sample_tiles, tile_scores, uncertainty_map

PHASES = {"two-stage": ("stage1", "stage2"), "baseline": ("baseline",), "all": ("stage1", "stage2", "baseline")}
CHECKPOINT_FORMAT = 1

#: ``progress(phase, done, total, info)``: phase ``"loading"`` (training images decoded; ``info``
#: None) or a training phase (steps; ``info`` has ``epoch`` and ``loss``).
TrainProgress = Callable[[str, int, int, "dict[str, Any] | None"], None]


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
    epochs, batch_size, lr, loss : optimisation (Adam); loss focal, ce, ohem or lad.
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
    ratio: int = TwoStageConfig.ratio
    image_size: int = 768
    crop_size: int = 256
    patches: int = 16
    tile_size: int | None = None
    halo: int = TwoStageConfig.halo
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
    threshold: float = TwoStageConfig().selection.value
    freeze_bn_after: int | None = None
    device: str = "auto"
    val_images: int = 0
    workers: int = 0

    def __post_init__(self) -> None:
        if self.stage not in PHASES:
            raise InputError(f"unknown stage {self.stage!r}; choose one of {', '.join(PHASES)}")
        if self.sampling not in SAMPLING_STRATEGIES:
            raise InputError(f"unknown sampling {self.sampling!r}; choose one of {', '.join(SAMPLING_STRATEGIES)}")
        self.loss_function()
        if self.ratio < 1 or self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise InputError("ratio and batch size must be >= 1, epochs >= 0 and the learning rate > 0")
        side = self.image_size or self.crop_size
        if side % self.ratio:
            raise InputError(f"the training image side {side} must be a multiple of the ratio {self.ratio}")
        if self.input_transform not in INPUT_TRANSFORMS:
            raise InputError(f"unknown input {self.input_transform!r}; choose one of {', '.join(INPUT_TRANSFORMS)}")
        if self.brightfield_repeats < 1:
            raise InputError(f"--brightfield-repeats must be at least 1, got {self.brightfield_repeats}")
        if self.stain_jitter < 0 or self.scale_jitter < 0:
            raise InputError("--stain-jitter and --scale-jitter must be >= 0")
        if not 0.0 <= self.synthetic_he <= 1.0:
            raise InputError(f"--synthetic-he is a fraction of the crops, between 0 and 1, got {self.synthetic_he}")
        if self.synthetic_he and self.multiclass:
            raise InputError("--synthetic-he renders nuclei from binary masks; it does not apply with --multiclass")
        if self.model1_from is not None and "stage1" not in PHASES[self.stage]:
            raise InputError(f"--model1-from needs a stage that trains Model 2, not {self.stage!r}")
        if self.model1_from is not None and self.init_from is not None:
            raise InputError("give --model1-from or --init-from, not both")
        if self.workers < 0:
            raise InputError(f"--workers must be 0 or more, got {self.workers}")
        if self.patches < 1:
            raise InputError(f"--patches must be at least 1, got {self.patches}")
        for value, flag in ((self.mpp, "--mpp"), (self.data_mpp, "--data-mpp")):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InputError(f"{flag} must be a positive number of micrometres per pixel, not {value}")
        if (self.mpp is not None or self.data_mpp is not None or self.extra_datasets) and self.image_size:
            raise InputError("--mpp, --data-mpp and --add-dataset resample native-size crops: use them with --image-size 0")
        for entry in self.extra_datasets:
            if "=" not in entry:
                raise InputError(f"--add-dataset takes NAME=ROOT (e.g. bowl=data/stage1_train), not {entry!r}")
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

    def loss_function(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The configured loss, with the locally adaptive loss's options bound."""
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
_ADDED_LATER = frozenset({"init_from", "brightfield_repeats", "synthetic_he", "data_mpp", "extra_datasets"})


# --------------------------------------------------------------------------- data


class TrainingImages:
    """The training split decoded once (resized when the protocol resizes)."""

    def __init__(
        self, data: SegmentationData, config: TrainConfig, progress: TrainProgress | None = None
    ) -> None:
        sources = [(data, data.split("train", config.split_seed))]
        for entry in config.extra_datasets:
            name, root = entry.split("=", 1)
            extra = open_dataset(name, root, config.multiclass)
            if extra.num_classes != data.num_classes:
                raise InputError(f"--add-dataset {name} has {extra.num_classes} classes, {data.name} {data.num_classes}")
            sources.append((extra, extra.split("train", config.split_seed)))
        total = sum(len(samples) for _, samples in sources)
        model_mpp = training_mpp(config, data)
        self.items, self.scales = [], []
        for source, samples in sources:
            own_mpp = config.data_mpp if source is data and config.data_mpp is not None else source.mpp
            scale = own_mpp / model_mpp if own_mpp and model_mpp else 1.0
            for sample in samples:
                self.items.append(resize_sample(*source.load(sample), config.image_size or None))
                self.scales.append(scale)
                if progress:
                    progress("loading", len(self.items), total, None)
        if len(self.items) < 1:
            raise InputError("the training split is empty")
        self.config = config
        #: How many times each image is drawn per epoch.
        self.repeats = np.array([
            1 if config.brightfield_repeats == 1 or has_dark_background(image) else config.brightfield_repeats
            for image, _ in self.items
        ])
        rotate = data.rotation_invariant if config.rotate is None else config.rotate
        self.augmentation = Augmentation(
            brightness=config.brightness, contrast=config.contrast, translate=config.translate,
            rotate=rotate, stain=config.stain_jitter,
        ) if config.augment else None

    def batches(self, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of ``(x (N, 3, S, S) float in [0, 1], y (N, S, S) int64)`` batches.

        With ``config.workers`` 0 the batches are made here, drawing from ``rng``
        in turn. With N >= 1 worker processes make them ahead of the training
        step, each batch from its own seed drawn from ``rng``: the same batches
        for every N >= 1 (a different stream from 0's, equally reproducible).
        """
        groups = self._batch_indices(rng)
        if not self.config.workers:
            for chosen in groups:
                yield self.make_batch(chosen, rng)
            return
        seeds = rng.integers(0, 2**63 - 1, size=len(groups))
        loader = torch.utils.data.DataLoader(
            _PlannedBatches(self, list(zip(groups, seeds.tolist()))), batch_size=None, shuffle=False,
            num_workers=self.config.workers, multiprocessing_context="fork", prefetch_factor=4,
        )
        yield from loader

    def _batch_indices(self, rng: np.random.Generator) -> list[np.ndarray]:
        """The images of each batch of one epoch (each image drawn ``repeats`` times)."""
        order = rng.permutation(np.repeat(np.arange(len(self.items)), self.repeats))
        size = self.config.batch_size
        groups = [order[start : start + size] for start in range(0, len(order), size)]
        if len(order) % size == 1 and len(order) >= 2:
            groups.pop()  # a last batch of one: BatchNorm wants at least two samples
        return groups

    def make_batch(self, chosen: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The crops of the images ``chosen``, rendered and augmented with ``rng``."""
        xs, ys = [], []
        for index in chosen:
            image, mask = self.items[index]
            if not self.config.image_size:
                scale_jitter = self.config.scale_jitter if self.config.augment else 0.0
                image, mask = random_crop(image, mask, self.config.crop_size, rng, scale_jitter, self.scales[index])
            if self.augmentation is not None and self.config.synthetic_he and rng.random() < self.config.synthetic_he:
                image = render_he(mask, rng)
            x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1) / 255.0
            y = torch.from_numpy(mask.astype(np.int64))
            if self.augmentation is not None:
                x, y = self.augmentation(x, y, rng)
            xs.append(x)
            ys.append(y)
        return torch.stack(xs), torch.stack(ys)

    def steps_per_epoch(self) -> int:
        n, size = int(self.repeats.sum()), self.config.batch_size
        full, rest = divmod(n, size)
        return full + (1 if rest >= 2 or (rest and n < 2) else 0)


def training_mpp(config: TrainConfig, data: SegmentationData) -> float | None:
    """The pixel size the models train at: ``config.mpp``, else the data set's (``data_mpp`` or its own)."""
    if config.mpp is not None:
        return config.mpp
    return config.data_mpp if config.data_mpp is not None else data.mpp


class _PlannedBatches(torch.utils.data.Dataset):
    """Batch ``k`` of an epoch's plan, made in a worker process (inherited by fork, not pickled)."""

    def __init__(self, images: TrainingImages, plan: list[tuple[np.ndarray, int]]) -> None:
        self.images, self.plan = images, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, seed = self.plan[k]
        return self.images.make_batch(chosen, np.random.default_rng(seed))


# --------------------------------------------------------------------------- stage 2 sampling


@dataclass
class Stage2Batch:
    """What Model 2 trains on: windows, their masks and contexts, and where they came from."""

    images: torch.Tensor  # (N, 3, W, W)
    masks: torch.Tensor  # (N, W, W)
    context: torch.Tensor | None  # (N, F, fh, fw)
    tiles: list[tuple[int, int]]
    windows: list[Box]
    scores: list[np.ndarray]


def sample_windows(
    model1: SegmentationModel,
    model2: SegmentationModel,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    rng: np.random.Generator,
) -> Stage2Batch:
    """Pick one tile per image from Model 1's uncertainty; crop its window and context.

    The window is the tile grown by ``halo`` on each side, shifted to stay
    inside the image (so all windows have one size). The context is Model 1's
    features sampled at the centres of Model 2's feature pixels over that
    window, exactly the geometry of inference.
    """
    ratio, side, tile, halo = config.ratio, x.shape[-1], config.tile, config.halo
    width = tile + 2 * halo
    with torch.no_grad():
        was_training = model1.training
        model1.eval()
        logits1, features1 = model1(F.avg_pool2d(x, ratio))
        model1.train(was_training)
        probs1 = logits_to_probabilities(logits1).float().cpu().numpy()
    grid = TileGrid(side, side, tile)
    feature_shape = model2.feature_shape(width, width)
    full_fh, full_fw = features1.shape[-2:]
    images, masks, contexts, tiles, windows, all_scores = [], [], [], [], [], []
    for i in range(x.shape[0]):
        scores = tile_scores(uncertainty_map(probs1[i]), grid.edges(0), grid.edges(1), (ratio, ratio))
        flat = int(sample_tiles(scores, 1, config.sampling, rng)[0])
        row, col = divmod(flat, grid.shape[1])
        box = grid.tile(row, col)
        y0 = min(max(box.y0 - halo, 0), side - width)
        x0 = min(max(box.x0 - halo, 0), side - width)
        window = Box(y0, y0 + width, x0, x0 + width)
        images.append(x[i, :, window.y0 : window.y1, window.x0 : window.x1])
        masks.append(y[i, window.y0 : window.y1, window.x0 : window.x1])
        if config.context:
            step = ratio * model1.feature_stride
            rows = np.clip(pixel_centres(window.y0, feature_shape[0], model2.feature_stride, step), 0, full_fh - 1)
            cols = np.clip(pixel_centres(window.x0, feature_shape[1], model2.feature_stride, step), 0, full_fw - 1)
            contexts.append(linear_resample(features1[i].detach(), rows, cols))
        tiles.append((row, col))
        windows.append(window)
        all_scores.append(scores)
    return Stage2Batch(
        torch.stack(images), torch.stack(masks), torch.stack(contexts) if contexts else None, tiles, windows, all_scores
    )


# --------------------------------------------------------------------------- checkpoints


def checkpoint_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def _load_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint is the user's to remove
        raise WsisegError(f"checkpoint {path} cannot be read ({type(exc).__name__}); delete it to start over") from exc
    if state.get("format") != CHECKPOINT_FORMAT or state.get("config") != config.signature():
        raise WsisegError(
            f"checkpoint {path} was made with other settings; train with the same settings to resume, "
            "or delete it to start over"
        )
    return state


# --------------------------------------------------------------------------- training


def freeze_batchnorm(model: torch.nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: normalise with, and stop updating, running statistics."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def _epoch_rng(config: TrainConfig, phase: str, epoch: int) -> np.random.Generator:
    phase_index = ("stage1", "stage2", "baseline").index(phase)
    torch.manual_seed(config.seed * 1_000_003 + phase_index * 10_007 + epoch)
    return np.random.default_rng([config.seed, phase_index, epoch])


def _new_model(config: TrainConfig, num_classes: int, role: str) -> SegmentationModel:
    """A freshly initialised model; its initial weights depend only on the seed and role."""
    torch.manual_seed(config.seed * 1_000_003 + ("model1", "model2", "model").index(role))
    return build_model(
        config.arch, num_classes, backbone=config.backbone, backbone_weights=config.backbone_weights,
        input_transform=config.input_transform,
    )


def train(
    config: TrainConfig,
    out: str | Path,
    progress: TrainProgress | None = None,
    evaluate_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Train the phases of ``config.stage`` and write a bundle to ``out``.

    A checkpoint ``<out>.ckpt`` is written after every epoch and removed once
    the bundle is written; if one with the same settings exists, training
    resumes from it.

    Returns
    -------
    Path
        The bundle, holding ``model1`` / ``model2`` and / or ``model`` and a
        config with the protocol, split seed, per-epoch losses and the
        validation scores on the test split.
    """
    from wsiseg.bundle import Bundle, save_bundle

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    data = open_dataset(config.dataset, config.data_root, config.multiclass)
    roles = {"stage1": "model1", "stage2": "model2", "baseline": "model"}
    if config.model1_from is not None:
        given = _models_from(config.model1_from, "--model1-from", config, data.num_classes, ["model1"])
    elif config.init_from is not None:
        needed = [roles[phase] for phase in PHASES[config.stage]]
        given = _models_from(config.init_from, "--init-from", config, data.num_classes, needed)
    else:
        given = {}
    images = TrainingImages(data, config, progress)
    loss_fn = config.loss_function()
    ckpt_path = checkpoint_path(out)
    state = _load_checkpoint(ckpt_path, config)
    models: dict[str, SegmentationModel] = {}
    history: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    done_phases: list[str] = []
    if state:
        history = {k: list(v) for k, v in state["history"].items()}
        seconds = {k: float(v) for k, v in state.get("seconds", {}).items()}
        done_phases = list(state["done_phases"])
        for role, weights in state["models"].items():
            models[role] = _new_model(config, data.num_classes, role)
            models[role].load_state_dict(weights)
    elif config.model1_from is not None:
        models["model1"] = given["model1"]
        done_phases = ["stage1"]
    steps = images.steps_per_epoch()
    channels_last = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    for phase in PHASES[config.stage]:
        if phase in done_phases:
            continue
        role = roles[phase]
        start_epoch = 0
        if role not in models:
            if role in given:
                models[role] = given[role]
            elif phase == "stage2" and config.finetune:
                # A fresh model holding Model 1's weights (a deepcopy would also copy tensors a
                # model keeps from its last forward pass, such as IFBFNet's auxiliary logits).
                models[role] = _new_model(config, data.num_classes, role)
                models[role].load_state_dict(models["model1"].state_dict())
            else:
                models[role] = _new_model(config, data.num_classes, role)
        model = models[role].to(device, memory_format=channels_last).train()
        optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
        if state and state.get("phase") == phase:
            optimiser.load_state_dict(state["optimizer"])
            start_epoch = int(state["epoch"])
        model1 = models["model1"].to(device, memory_format=channels_last) if phase == "stage2" else None
        history.setdefault(phase, [])
        for epoch in range(start_epoch, config.epochs):
            epoch_started = time.perf_counter()
            rng = _epoch_rng(config, phase, epoch)
            model.train()
            if config.freeze_bn_after is not None and epoch >= config.freeze_bn_after:
                freeze_batchnorm(model)
            total, count = 0.0, 0
            for step, (x, y) in enumerate(images.batches(rng), 1):
                x, y = x.to(device), y.to(device)
                if phase == "stage1":
                    logits, _ = model(F.avg_pool2d(x, config.ratio).contiguous(memory_format=channels_last))
                    target = y
                elif phase == "stage2":
                    batch = sample_windows(model1, model, x, y, config, rng)
                    logits, _ = model(batch.images.contiguous(memory_format=channels_last), batch.context)
                    target = batch.masks
                else:
                    logits, _ = model(x.contiguous(memory_format=channels_last))
                    target = y
                outputs = [logits, getattr(model, "aux_logits", None)]
                if phase == "stage1":  # Model 1 is scored at full resolution
                    outputs = [
                        None if o is None else F.interpolate(o, scale_factor=config.ratio, mode="bilinear", align_corners=False)
                        for o in outputs
                    ]
                loss = loss_fn(outputs[0], target)
                if outputs[1] is not None and config.aux_weight:
                    loss = loss + config.aux_weight * loss_fn(outputs[1], target)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += float(loss.detach())
                count += 1
                if progress:
                    progress(phase, epoch * steps + step, config.epochs * steps, {"epoch": epoch + 1, "loss": total / count})
            history[phase].append(total / max(count, 1))
            seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - epoch_started
            _save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT,
                "config": config.signature(),
                "phase": phase,
                "epoch": epoch + 1,
                "done_phases": done_phases,
                "models": {r: m.state_dict() for r, m in models.items()},
                "optimizer": optimiser.state_dict(),
                "history": history,
                "seconds": seconds,
            })
        model.eval()
        done_phases.append(phase)
        _save_checkpoint(ckpt_path, {
            "format": CHECKPOINT_FORMAT, "config": config.signature(), "phase": None, "epoch": 0,
            "done_phases": done_phases, "models": {r: m.state_dict() for r, m in models.items()},
            "optimizer": {}, "history": history, "seconds": seconds,
        })
    for model in models.values():
        model.to("cpu", memory_format=torch.contiguous_format).eval()
    bundle_config = {
        "ratio": config.ratio,
        "tile_size": config.tile,
        "halo": config.halo,
        "uncertainty": "entropy",
        "threshold": config.threshold,
        "context": config.context,
        "classes": list(data.class_names),
        "num_classes": data.num_classes,
        "image_size": config.image_size or None,
        "mpp": training_mpp(config, data),
        "dataset": config.dataset,
        "training": {
            **asdict(config), "history": history, "train_images": len(images.items),
            "seconds": {phase: round(value, 3) for phase, value in seconds.items()},
        },
    }
    validation = _validate(Bundle(dict(models), bundle_config), data, config, evaluate_progress)
    bundle_config["validation"] = validation
    path = save_bundle(out, models, bundle_config)
    ckpt_path.unlink(missing_ok=True)
    return path


def _models_from(path: str, flag: str, config: TrainConfig, num_classes: int, roles: list[str]) -> dict[str, SegmentationModel]:
    """``path``'s models of ``roles``, each checked to be the network ``config`` describes.

    ``flag`` names the option in the errors (``--model1-from``, ``--init-from``).
    """
    from wsiseg.bundle import load_bundle

    source = load_bundle(path)
    training = source.config.get("training", {})
    missing = [role for role in roles if role not in source.models]
    if missing:
        names = {"model1": "Model 1", "model2": "Model 2", "model": "full-resolution baseline"}
        raise InputError(
            f"{path} holds no {' and no '.join(names[r] for r in missing)}; give {flag} a bundle trained with a "
            f"stage that has it, or train --stage {'two-stage' if 'model' in missing else 'baseline'}"
        )
    for name in ("arch", "backbone", "ratio", "input_transform"):
        theirs = training.get(name, source.config.get(name))
        if theirs is not None and theirs != getattr(config, name):
            raise InputError(
                f"{path}'s models have {name} {theirs!r}, this run {getattr(config, name)!r}; "
                f"train with the same setting or without {flag}"
            )
    models = {}
    for role in roles:
        models[role] = _new_model(config, num_classes, role)
        try:
            models[role].load_state_dict(source.models[role].state_dict())
        except RuntimeError as exc:
            raise InputError(f"{path}'s {role} does not fit this run's network ({exc})") from exc
    return models


def _validate(bundle: Any, data: SegmentationData, config: TrainConfig, progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    """Scores on the test split: baseline, Model 1 alone (t = 1), the default threshold, all refined (t = 0)."""
    from wsiseg.evaluate import evaluate

    samples = data.split("test", config.split_seed)
    if config.val_images:
        samples = samples[: config.val_images]
    if not samples:
        return {}
    started = time.perf_counter()
    thresholds = tuple(dict.fromkeys((1.0, config.threshold, 0.0)))
    rows = evaluate(bundle, data, samples, thresholds, device=config.device, progress=progress)
    return {
        "split": "test",
        "images": len(samples),
        "seconds": round(time.perf_counter() - started, 1),
        "rows": [asdict(r) for r in rows],
    }
