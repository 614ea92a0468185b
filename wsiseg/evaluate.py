"""Dice, IoU, refined fraction and time per image: baseline vs two-stage.

The paper's comparison (Table 3 rows, Table 4(3) threshold sweep), measured
with the same tile tasks and driver ``wsiseg segment`` runs: the
full-resolution baseline through :func:`~wsiseg.run.segment_full_resolution`,
the two-stage pipeline through :func:`~wsiseg.run.segment_image` at each
threshold, with the bundle's own settings (:class:`~wsiseg.config.BundleSettings`). Dice and IoU are the mean over images of the foreground score
(the mean over classes 1..K-1 for multi-class), plus the pooled score over
all pixels of the split. Each two-stage row also gives its agreement with
the baseline: the mean over images of the Dice between the two masks, with
no truth involved (how closely two-stage reproduces full resolution).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.bundle import Bundle
from wsiseg.config import AUTO_TILE_SIZE, BundleSettings, ResolvedFlow, resolve_flow
from wsiseg.domain import DomainProfile
from wsiseg.errors import InputError
from wsiseg.metrics import IGNORE, confusion, dice_iou, instance_scores
from wsiseg.models.base import SegmentationModel
from wsiseg.nuclei import instance_output_of
from wsiseg.train.datasets import Sample, SegmentationData, resize_image, resize_sample
from wsiseg.run.in_memory import segment_full_resolution, segment_image
from wsiseg.uncertainty import TileSelection

PAPER_THRESHOLDS = (1.0, 0.75, 0.5, 0.25, 0.0)


@dataclass
class MethodScores:
    """One row of the comparison."""

    method: str
    threshold: float | None
    dice: float
    iou: float
    dice_pooled: float
    refined_fraction: float
    seconds_per_image: float
    images: int
    #: Mean over images of the Dice between this row's mask and the baseline's
    #: (no truth involved); None for the baseline row and without a baseline.
    agreement: float | None = None
    #: Object scores where the truth has instances (means over images, see
    #: :func:`~wsiseg.metrics.instance_scores`) of the objects ``--objects`` makes; else None.
    aji: float | None = None
    pq: float | None = None
    dq: float | None = None
    sq: float | None = None


@dataclass(frozen=True)
class PixelSizes:
    """What pixel size images are scored at (all None: the data set's, with the bundle's rule).

    Attributes
    ----------
    scan_mpp : float or None
        Resample each image to this pixel size first, as if it had been scanned
        so (0.5: a 20x slide), before the bundle's rule applies
        (:func:`~wsiseg.run.plan.scale_factor`).
    work_mpp : float or None
        Segment at exactly this pixel size instead of the rule's choice
        (upsampling too). Masks are always scored at the truth's own pixels.
    """

    scan_mpp: float | None = None
    work_mpp: float | None = None

    def __post_init__(self) -> None:
        for name in ("scan_mpp", "work_mpp"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InputError(f"--{name.replace('_', '-')} must be a positive number of micrometres, not {value}")


class _Tally:
    """One row's running sums over the images."""

    def __init__(self, num_labels: int) -> None:
        self.num_labels = num_labels
        self.per_image: list[tuple[float, float, float, float]] = []
        self.pooled = np.zeros((num_labels, num_labels), np.int64)
        self.agreements: list[float] = []
        self.objects: list[tuple[float, float, float, float]] = []

    def add(self, mask: np.ndarray, truth: np.ndarray, refined: float, seconds: float,
            baseline_mask: np.ndarray | None, objects: tuple[float, float, float, float] | None) -> None:
        counts = confusion(mask, truth, self.num_labels)
        self.pooled += counts
        self.per_image.append((*dice_iou(counts), refined, seconds))
        if baseline_mask is not None:
            self.agreements.append(dice_iou(confusion(mask, baseline_mask, self.num_labels))[0])
        if objects is not None:
            self.objects.append(objects)

    def scores(self, method: str, threshold: float | None) -> MethodScores:
        values = np.asarray(self.per_image) if self.per_image else np.full((1, 4), np.nan)
        objects = np.asarray(self.objects).mean(axis=0) if self.objects else (None,) * 4
        return MethodScores(
            method=method, threshold=threshold, dice=float(values[:, 0].mean()), iou=float(values[:, 1].mean()),
            dice_pooled=dice_iou(self.pooled)[0], refined_fraction=float(values[:, 2].mean()),
            seconds_per_image=float(values[:, 3].mean()), images=len(self.per_image),
            agreement=float(np.mean(self.agreements)) if self.agreements else None,
            **{k: None if v is None else float(v) for k, v in zip(("aji", "pq", "dq", "sq"), objects)},
        )


def evaluate(
    bundle: Bundle,
    data: SegmentationData,
    samples: list[Sample],
    thresholds: tuple[float, ...] = PAPER_THRESHOLDS,
    baseline: SegmentationModel | None = None,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    overrides: dict[str, Any] | None = None,
    pixel_sizes: PixelSizes = PixelSizes(),
    tissue: bool = True,
) -> list[MethodScores]:
    """Score the baseline (if any) and the two-stage pipeline at each threshold, as ``wsiseg segment`` runs.

    Each image is segmented in the setting ``wsiseg segment`` uses on a slide
    of its pixel size (:func:`scoring_setting`: the one resolution of the
    bundle's settings, the pixel size and the overrides; tiles of about 512
    pixels; the tissue mask), by the same engine in memory; masks are scored
    at the truth's own pixels. ``seconds_per_image`` times the run only (not
    the resampling, nor the object split).

    Parameters
    ----------
    bundle : Bundle
        A two-stage pair; its ``model`` (if present) is the baseline unless
        ``baseline`` is given.
    data, samples : the data set and the images to score.
    thresholds : tile-selection thresholds for the two-stage rows.
    baseline : SegmentationModel, optional
    device : str
    progress : callable, optional
        ``progress(done, total)`` images.
    overrides : dict, optional
        :class:`~wsiseg.config.TwoStageConfig` fields to change from the bundle's (None ignored).
    pixel_sizes : PixelSizes
        Where the data set's pixel size is known, images are brought to the
        bundle's as ``wsiseg segment`` brings slides (or as ``pixel_sizes`` says).
    tissue : bool
        Detect tissue first, as ``wsiseg segment`` does by default.

    Returns
    -------
    list of MethodScores
        Baseline first (when there is one), then two-stage by threshold.
    """
    settings = BundleSettings.from_config(bundle.config)
    baseline = baseline if baseline is not None else bundle.models.get("model")
    methods: list[tuple[str, float | None]] = ([("baseline", None)] if baseline is not None else [])
    if bundle.is_two_stage:
        methods += [("two-stage", t) for t in thresholds]
    tallies = [_Tally(max(2, data.num_classes)) for _ in methods]
    instance_output = instance_output_of(settings.classes)
    scan_mpp = (pixel_sizes.scan_mpp or data.mpp) if data.mpp is not None else None
    setting_of = {  # every image of a data set shares its pixel size, so its setting
        full: scoring_setting(settings, scan_mpp, overrides, pixel_sizes, full_resolution=full) for full in (False, True)
    }
    for done, sample in enumerate(samples, 1):
        image, truth = resize_sample(*data.load(sample), settings.image_size)
        true_objects = data.instances(sample) if not settings.image_size else None
        scanned, _ = _as_scanned(image, data.mpp, pixel_sizes)
        baseline_mask: np.ndarray | None = None
        for tally, (method, threshold) in zip(tallies, methods):
            setting = setting_of[method == "baseline"]
            result, seconds = run_as_segment(scanned, setting, bundle, baseline, method, threshold, device, tissue)
            mask, objects = _scored_masks(result.mask, truth.shape, setting, true_objects is not None,
                                          instance_output)
            scores = None
            if true_objects is not None:
                found = instance_scores(objects, true_objects, ignore=truth == IGNORE)
                scores = (found.aji, found.pq, found.dq, found.sq)
            tally.add(mask, truth, result.tiles.refined_fraction, seconds, baseline_mask, scores)
            if method == "baseline":
                baseline_mask = mask
        if progress:
            progress(done, len(samples))
    return [tally.scores(method, threshold) for tally, (method, threshold) in zip(tallies, methods)]


def scoring_setting(
    settings: BundleSettings,
    image_mpp: float | None,
    overrides: dict[str, Any] | None = None,
    pixel_sizes: PixelSizes = PixelSizes(),
    full_resolution: bool = False,
) -> ResolvedFlow:
    """The flow an image of ``image_mpp`` is scored with: what ``wsiseg segment`` runs on a slide of that
    pixel size (:func:`~wsiseg.config.resolve_flow`), or at ``pixel_sizes.work_mpp`` where given."""
    if image_mpp is None and pixel_sizes.work_mpp:
        raise InputError("this data set records no pixel size, so it cannot be resampled to another")
    return resolve_flow(settings, image_mpp, overrides, full_resolution=full_resolution,
                        work_mpp=pixel_sizes.work_mpp)


def describe_setting(setting: ResolvedFlow) -> str:
    """One line: the setting an evaluation scored (tile, halo, ratio, working pixel size)."""
    flow = setting.config
    tile = f"{flow.tile_size}-pixel tiles" if flow.tile_size else f"tiles of about {AUTO_TILE_SIZE} pixels"
    pixels = f", {setting.work_mpp:.3g} um working pixels" if setting.work_mpp else ""
    return f"as wsiseg segment runs: {tile}, halo {flow.halo}, Model 1 at 1/{flow.ratio}{pixels}"


def _as_scanned(image: np.ndarray, data_mpp: float | None, pixel_sizes: PixelSizes) -> tuple[np.ndarray, float | None]:
    """``image`` as if scanned at ``pixel_sizes.scan_mpp`` (a 20x slide: 0.5), and its pixel size."""
    if data_mpp is None:
        if pixel_sizes.scan_mpp:
            raise InputError("this data set records no pixel size, so it cannot be resampled to another")
        return image, None
    scan = pixel_sizes.scan_mpp or data_mpp
    if scan == data_mpp:
        return image, scan
    return resize_image(image, _size(image.shape, data_mpp / scan)), scan


def run_as_segment(
    image: np.ndarray, setting: ResolvedFlow, bundle: Bundle, baseline: SegmentationModel | None, method: str,
    threshold: float | None, device: str, tissue: bool,
) -> tuple[Any, float]:
    """The engine's result on ``image`` in ``setting`` (at the working pixels), and the run's seconds.

    What ``wsiseg segment`` writes for the same image at the same pixel size
    (``tests/test_evaluate.py``): the same flow, tissue rule and resampling,
    in memory. ``method`` is ``baseline`` (``baseline`` on every tile) or
    ``two-stage`` at ``threshold``.
    """
    downsample = setting.downsample
    if downsample < 1:  # a finer working pixel size than the image's (--work-mpp): upsampled first
        image, downsample = resize_image(image, _size(image.shape, 1 / downsample), antialias=False), 1.0
    start = time.perf_counter()
    if method == "baseline":
        result = segment_full_resolution(image, baseline, setting.config, device, downsample=downsample,
                                         tissue=tissue)
    else:
        config = replace(setting.config, selection=TileSelection.threshold(threshold))
        result = segment_image(image, bundle.model1, bundle.model2, config, device, downsample=downsample,
                               tissue=tissue)
    return result, time.perf_counter() - start


def _scored_masks(
    mask: np.ndarray, shape: tuple[int, int], setting: ResolvedFlow, with_objects: bool, instance_output: str | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The mask and its objects (made as ``wsiseg segment --objects`` makes them, at the working pixels),
    both back at the truth's pixels (nearest). With an instance output the mask is scored as nucleus
    (any class after the background) or not, and its classes split the objects."""
    from wsiseg.instances import whole_image_instances
    from wsiseg.run.objects import object_sizes

    objects = None
    if with_objects:
        # The objects --objects streams tile by tile, made at once (the same split, equal up to numbering:
        # tests/test_objects.py); without the table and outlines it is 20 times faster.
        max_size, min_distance, min_area = object_sizes(OBJECT_TILE, setting.work_mpp, None)
        objects = whole_image_instances(mask, max_size, min_distance, instance_output or 1, min_area=min_area)[0]
        objects = resize_labels(objects, shape)
    scored = (mask > 0).astype(np.uint8) if instance_output else mask
    return resize_labels(scored, shape), objects


#: Tile of the object split in evaluation (as on slides: ids do not depend on it, the largest object does).
OBJECT_TILE = 512


def _size(shape: tuple[int, ...], factor: float) -> tuple[int, int]:
    return max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor))


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` labels resampled to ``shape`` by the nearest pixel centre (no new values)."""
    if labels.shape == tuple(shape):
        return labels
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]).astype(np.int64), labels.shape[1] - 1)
    return labels[np.ix_(rows, cols)]


def format_table(rows: list[MethodScores]) -> list[str]:
    """Rows as aligned text lines ("vs base": Dice of the row's masks against the baseline's; AJI and PQ
    where the truth has objects)."""
    objects = any(r.pq is not None for r in rows)
    lines = [f"{'method':10s} {'thresh':>6s} {'Dice':>7s} {'IoU':>7s} {'pooled':>7s} {'refined':>8s} {'s/image':>8s}"
             f" {'vs base':>7s}" + (f" {'AJI':>6s} {'PQ':>6s} {'DQ':>6s} {'SQ':>6s}" if objects else "")]
    for r in rows:
        threshold = "" if r.threshold is None else f"{r.threshold:g}"
        agreement = "" if r.agreement is None else f"{100 * r.agreement:6.2f}%"
        line = (f"{r.method:10s} {threshold:>6s} {100 * r.dice:6.2f}% {100 * r.iou:6.2f}% {100 * r.dice_pooled:6.2f}% "
                f"{100 * r.refined_fraction:7.1f}% {r.seconds_per_image:8.4f} {agreement:>7s}")
        if objects:
            line += "".join(f" {'':>6s}" if v is None else f" {v:6.4f}" for v in (r.aji, r.pq, r.dq, r.sq))
        lines.append(line)
    return lines


def write_results(rows: list[MethodScores], out_dir: str | Path, title: str, extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``evaluation.csv``, ``evaluation.json`` and ``speed_vs_dice.png`` into ``out_dir``."""
    from wsiseg.plot import scatter_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "evaluation.csv", "json": out / "evaluation.json", "plot": out / "speed_vs_dice.png"}
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0]).keys()))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    paths["json"].write_text(json.dumps({"rows": [asdict(r) for r in rows], **(extra or {})}, indent=2))
    points = [
        (r.seconds_per_image, r.dice, "baseline" if r.threshold is None else f"t={r.threshold:g}") for r in rows
    ]
    scatter_png(points, paths["plot"], "seconds per image (CPU)", "mean Dice", title)
    return paths


def evaluate_bundle(
    bundle_path: str | Path,
    dataset: str,
    data_root: str | Path,
    thresholds: tuple[float, ...] = (),
    baseline_path: str | Path | None = None,
    split: str = "test",
    split_seed: int | None = None,
    multiclass: bool = False,
    limit: int = 0,
    overrides: dict[str, Any] | None = None,
    device: str = "cpu",
    out_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    pixel_sizes: PixelSizes = PixelSizes(),
    tissue: bool = True,
) -> tuple[list[MethodScores], dict[str, Path]]:
    """``wsiseg evaluate``: score a bundle on a data set's split and write the results.

    Parameters
    ----------
    split_seed : int, optional
        Default: the seed the bundle was trained with.
    limit : int
        Score only the first N images (0: all).
    out_dir : path, optional
        Default ``evaluation-<bundle name>``.

    Returns
    -------
    rows, paths
        The table rows and the files written (``csv``, ``json``, ``plot``).
    """
    from wsiseg.bundle import load_bundle

    bundle_path = Path(bundle_path)
    bundle = load_bundle(bundle_path)
    data, samples, seed = scored_split(bundle, dataset, data_root, split, split_seed, multiclass, limit)
    baseline = load_bundle(baseline_path).model if baseline_path else None
    rows = evaluate(bundle, data, samples, thresholds or PAPER_THRESHOLDS, baseline, device, progress, overrides,
                    pixel_sizes, tissue)
    setting = scoring_setting(BundleSettings.from_config(bundle.config), pixel_sizes.scan_mpp or data.mpp, overrides,
                              pixel_sizes)
    paths = write_results(
        rows, out_dir or Path(f"evaluation-{bundle_path.stem}"),
        f"{bundle_path.name} on {dataset} ({split}, {len(samples)} images)",
        {"bundle": str(bundle_path), "dataset": dataset, "split": split, "split_seed": seed,
         "data_mpp": data.mpp, "scan_mpp": pixel_sizes.scan_mpp, "work_mpp": pixel_sizes.work_mpp,
         "setting": describe_setting(setting), "tissue_mask": tissue},
    )
    return rows, paths


def scored_split(
    bundle: Bundle,
    dataset: str,
    data_root: str | Path,
    split: str = "test",
    split_seed: int | None = None,
    multiclass: bool = False,
    limit: int = 0,
) -> tuple[SegmentationData, list[Sample], int]:
    """The data set and the images of ``split`` to score a bundle on (the first ``limit``; 0: all).

    ``split_seed`` None takes the seed the bundle was trained with, so its test
    split holds no training image. Returns the data set, the samples and the seed.
    """
    from wsiseg.train.datasets import open_dataset

    data = open_dataset(dataset, data_root, multiclass)
    seed = split_seed if split_seed is not None else int(bundle.config.get("training", {}).get("split_seed", 0))
    samples = data.split(split, seed)[: limit or None]
    if not samples:
        raise InputError(f"the {split} split of {data_root} is empty")
    return data, samples, seed


def domain_profile(bundle: Bundle, data: SegmentationData, samples: Sequence[Sample], threshold: float,
                   measured_on: str = "") -> DomainProfile:
    """Run ``bundle`` on each of ``samples`` as ``wsiseg segment`` would (tissue mask on, two-stage at
    ``threshold``) and profile the runs (:class:`~wsiseg.domain.DomainProfile`: what the domain check of
    a run compares with)."""
    settings = BundleSettings.from_config(bundle.config)
    evidence = []
    for sample in samples:
        image, _ = data.load(sample)
        scanned, mpp = _as_scanned(image, data.mpp, PixelSizes(None))
        result, _ = run_as_segment(scanned, scoring_setting(settings, mpp), bundle, None, "two-stage", threshold,
                                   "cpu", tissue=True)
        evidence.append(result.domain)
    return DomainProfile.of_images(evidence, measured_on)
