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

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wsiseg.config import BundleSettings, TwoStageConfig
from wsiseg.errors import InputError, WsisegError
from wsiseg.models import SegmentationModel, build_model
from wsiseg.models.base import logits_to_probabilities
from wsiseg.nuclei import INSTANCE_OUTPUTS, encode_targets
from wsiseg.runtime import resolve_device
from wsiseg.tiling import Box, TileGrid, linear_resample, pixel_centres
from wsiseg.tissue import has_dark_background
from wsiseg.train.augment import Augmentation, random_crop
from wsiseg.train.synthetic_he import render_he
from wsiseg.train.config import PHASES, TrainConfig
from wsiseg.train.datasets import IGNORE, SegmentationData, open_dataset, resize_sample, touching_borders
from wsiseg.uncertainty import TileSelection, sample_tiles, tile_scores, uncertainty_map

CHECKPOINT_FORMAT = 1

#: ``progress(phase, done, total, info)``: phase ``"loading"`` (training images decoded; ``info``
#: None) or a training phase (steps; ``info`` has ``epoch`` and ``loss``).
TrainProgress = Callable[[str, int, int, "dict[str, Any] | None"], None]


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
                image, mask = source.load(sample)
                if config.touching_gaps:
                    mask = _with_gaps(mask, source.instances(sample))
                if config.instance_output != "none":
                    mask = _instance_targets(mask, source.instances(sample), config.instance_output, sample)
                self.items.append(resize_sample(image, mask, config.image_size or None))
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
            rotate=rotate, stain=config.stain_jitter, gamma=config.gamma_jitter,
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


def _with_gaps(mask: np.ndarray, ids: np.ndarray | None) -> np.ndarray:
    """``mask`` with the borders of touching objects set to background (unchanged without instances)."""
    if ids is None:
        return mask
    gapped = mask.copy()
    gapped[touching_borders(ids) & (mask != IGNORE)] = 0
    return gapped


def _instance_targets(mask: np.ndarray, ids: np.ndarray | None, kind: str, sample: Any) -> np.ndarray:
    """The instance output's training classes of one sample (:func:`wsiseg.nuclei.encode_targets`)."""
    if ids is None:
        raise InputError(f"--instance-output {kind} needs instance ids, and {sample} has none")
    return encode_targets(mask, ids, kind)


def class_names(config: TrainConfig, data: SegmentationData) -> tuple[str, ...]:
    """The models' classes, background first: the instance output's, else the data set's."""
    if config.instance_output != "none":
        return INSTANCE_OUTPUTS[config.instance_output]
    return tuple(data.class_names)


def model_classes(config: TrainConfig, data: SegmentationData) -> int:
    """The models' ``num_classes`` (1: one sigmoid logit for a binary data set without instance output)."""
    return len(class_names(config, data)) if config.instance_output != "none" else data.num_classes


def bundle_settings(config: TrainConfig, data: SegmentationData) -> BundleSettings:
    """What the bundle of a run of ``config`` on ``data`` records for its users: the flow it was
    trained for (default threshold, tile, halo), its pixel size and the range its crops spanned."""
    mpp = training_mpp(config, data)
    jitter = 1 + (config.scale_jitter if config.augment and not config.image_size else 0.0)
    flow = TwoStageConfig(ratio=config.ratio, tile_size=config.tile, halo=config.halo,
                          selection=TileSelection.threshold(config.threshold), context=config.context)
    return BundleSettings(flow, mpp, (mpp / jitter, mpp * jitter) if mpp and jitter > 1 else None,
                          class_names(config, data), config.image_size or None)


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


#: The model each phase trains.
ROLES = {"stage1": "model1", "stage2": "model2", "baseline": "model"}


@dataclass
class TrainingState:
    """What a run has made so far: checkpointed after every epoch and resumed from it."""

    models: dict[str, SegmentationModel] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    done_phases: list[str] = field(default_factory=list)
    #: The phase in progress and its finished epochs, with its optimiser's state.
    phase: str | None = None
    epoch: int = 0
    optimizer: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path, config: TrainConfig) -> None:
        _save_checkpoint(path, {
            "format": CHECKPOINT_FORMAT, "config": config.signature(), "phase": self.phase, "epoch": self.epoch,
            "done_phases": self.done_phases, "models": {r: m.state_dict() for r, m in self.models.items()},
            "optimizer": self.optimizer, "history": self.history, "seconds": self.seconds,
        })


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
    num_classes = model_classes(config, data)
    given = _given_models(config, data, num_classes)
    images = TrainingImages(data, config, progress)
    ckpt_path = checkpoint_path(out)
    state = _resumed_state(ckpt_path, config, num_classes, given)
    for phase in PHASES[config.stage]:
        if phase not in state.done_phases:
            _train_phase(phase, state, given, images, num_classes, config, device, ckpt_path, progress)
    for model in state.models.values():
        model.to("cpu", memory_format=torch.contiguous_format).eval()
    bundle_config = {
        **bundle_settings(config, data).to_config(),
        "num_classes": num_classes,
        "dataset": config.dataset,
        "training": {
            **asdict(config), "history": state.history, "train_images": len(images.items),
            "seconds": {phase: round(value, 3) for phase, value in state.seconds.items()},
        },
    }
    bundle_config["validation"] = _validate(Bundle(dict(state.models), bundle_config), data, config, evaluate_progress)
    path = save_bundle(out, state.models, bundle_config)
    ckpt_path.unlink(missing_ok=True)
    return path


def _given_models(config: TrainConfig, data: SegmentationData, num_classes: int) -> dict[str, SegmentationModel]:
    """The models a run starts from: ``--model1-from``'s Model 1, or ``--init-from``'s of every role it trains."""
    if config.model1_from is not None:
        return _models_from(config.model1_from, "--model1-from", config, num_classes, ["model1"])
    if config.init_from is not None:
        needed = [ROLES[phase] for phase in PHASES[config.stage]]
        return _models_from(config.init_from, "--init-from", config, num_classes, needed)
    return {}


def _resumed_state(
    ckpt_path: Path, config: TrainConfig, num_classes: int, given: dict[str, SegmentationModel]
) -> TrainingState:
    """The checkpoint's state, else a fresh one (with ``--model1-from``'s Model 1 as stage 1 done)."""
    saved = _load_checkpoint(ckpt_path, config)
    if saved:
        models = {}
        for role, weights in saved["models"].items():
            models[role] = _new_model(config, num_classes, role)
            models[role].load_state_dict(weights)
        return TrainingState(
            models, {k: list(v) for k, v in saved["history"].items()},
            {k: float(v) for k, v in saved.get("seconds", {}).items()}, list(saved["done_phases"]),
            saved.get("phase"), int(saved.get("epoch", 0)), saved.get("optimizer") or {},
        )
    if config.model1_from is not None:
        return TrainingState({"model1": given["model1"]}, done_phases=["stage1"])
    return TrainingState()


def _phase_model(
    phase: str, state: TrainingState, given: dict[str, SegmentationModel], config: TrainConfig, num_classes: int
) -> SegmentationModel:
    """The model ``phase`` trains: resumed, given, Model 1's weights (stage 2 with fine-tuning) or fresh."""
    role = ROLES[phase]
    if role in state.models:
        return state.models[role]
    if role in given:
        return given[role]
    model = _new_model(config, num_classes, role)
    if phase == "stage2" and config.finetune:
        # A fresh model holding Model 1's weights (a deepcopy would also copy tensors a
        # model keeps from its last forward pass, such as IFBFNet's auxiliary logits).
        model.load_state_dict(state.models["model1"].state_dict())
    return model


def _train_phase(
    phase: str,
    state: TrainingState,
    given: dict[str, SegmentationModel],
    images: TrainingImages,
    num_classes: int,
    config: TrainConfig,
    device: torch.device,
    ckpt_path: Path,
    progress: TrainProgress | None,
) -> None:
    """Train one phase's model for its remaining epochs, checkpointing after each."""
    channels_last = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    role = ROLES[phase]
    state.models[role] = _phase_model(phase, state, given, config, num_classes)
    model = state.models[role].to(device, memory_format=channels_last).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    start_epoch = 0
    if state.phase == phase:
        optimiser.load_state_dict(state.optimizer)
        start_epoch = state.epoch
    model1 = state.models["model1"].to(device, memory_format=channels_last) if phase == "stage2" else None
    loss_fn = config.loss_function()
    steps = images.steps_per_epoch()
    state.history.setdefault(phase, [])
    for epoch in range(start_epoch, config.epochs):
        epoch_started = time.perf_counter()
        rng = _epoch_rng(config, phase, epoch)
        model.train()
        if config.freeze_bn_after is not None and epoch >= config.freeze_bn_after:
            freeze_batchnorm(model)
        total, count = 0.0, 0
        for step, (x, y) in enumerate(images.batches(rng), 1):
            loss = _train_step(phase, model, model1, x.to(device), y.to(device), optimiser, loss_fn, config, rng,
                               channels_last)
            total += loss
            count += 1
            if progress:
                progress(phase, epoch * steps + step, config.epochs * steps, {"epoch": epoch + 1, "loss": total / count})
        state.history[phase].append(total / max(count, 1))
        state.seconds[phase] = state.seconds.get(phase, 0.0) + time.perf_counter() - epoch_started
        state.phase, state.epoch, state.optimizer = phase, epoch + 1, optimiser.state_dict()
        state.save(ckpt_path, config)
    model.eval()
    state.done_phases.append(phase)
    state.phase, state.epoch, state.optimizer = None, 0, {}
    state.save(ckpt_path, config)


def _train_step(
    phase: str,
    model: SegmentationModel,
    model1: SegmentationModel | None,
    x: torch.Tensor,
    y: torch.Tensor,
    optimiser: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    config: TrainConfig,
    rng: np.random.Generator,
    channels_last: torch.memory_format,
) -> float:
    """One optimiser step of ``phase`` on a batch ``x (N, 3, S, S)``, ``y (N, S, S)``; its loss."""
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
    return float(loss.detach())


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
        weights = source.models[role].state_dict()
        if config.instance_output != "none" and flag == "--init-from":
            weights = _without_new_classifier(weights, models[role].state_dict())
        try:  # strict but for the classifier an instance output replaces
            models[role].load_state_dict(weights, strict=len(weights) == len(models[role].state_dict()))
        except RuntimeError as exc:
            raise InputError(f"{path}'s {role} does not fit this run's network ({exc})") from exc
    return models


def _without_new_classifier(weights: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` less the classifier tensors whose shape the new output changes (they start fresh).

    An instance output fine-tuned from a plain nucleus model keeps every
    layer but the last one, the 1x1 classifier, which now has 3 or 4 classes.
    """
    kept = {}
    for name, tensor in weights.items():
        if name in target and target[name].shape != tensor.shape:
            if not name.startswith("classifier."):
                raise InputError(f"the initial bundle's {name} has shape {tuple(tensor.shape)}, this run's network "
                                 f"{tuple(target[name].shape)}")
            continue
        kept[name] = tensor
    return kept


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
