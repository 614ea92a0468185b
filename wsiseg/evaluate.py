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
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wsiseg.bundle import Bundle
from wsiseg.config import BundleSettings
from wsiseg.metrics import confusion, dice_iou
from wsiseg.models.base import SegmentationModel
from wsiseg.train.datasets import Sample, SegmentationData, resize_sample
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


def evaluate(
    bundle: Bundle,
    data: SegmentationData,
    samples: list[Sample],
    thresholds: tuple[float, ...] = PAPER_THRESHOLDS,
    baseline: SegmentationModel | None = None,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[MethodScores]:
    """Score the baseline (if any) and the two-stage pipeline at each threshold.

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

    Returns
    -------
    list of MethodScores
        Baseline first (when there is one), then two-stage by threshold.
    """
    settings = BundleSettings.from_config(bundle.config)
    base = settings.flow.with_overrides(**(overrides or {}))
    baseline = baseline if baseline is not None else bundle.models.get("model")
    num_labels = max(2, data.num_classes)
    methods: list[tuple[str, float | None]] = ([("baseline", None)] if baseline is not None else [])
    if bundle.is_two_stage:
        methods += [("two-stage", t) for t in thresholds]
    per_image: dict[int, list[tuple[float, float, float, float]]] = {i: [] for i in range(len(methods))}
    pooled = {i: np.zeros((num_labels, num_labels), np.int64) for i in range(len(methods))}
    agreements: dict[int, list[float]] = {i: [] for i in range(len(methods))}
    for done, sample in enumerate(samples, 1):
        image, truth = resize_sample(*data.load(sample), settings.image_size)
        baseline_mask: np.ndarray | None = None
        for index, (method, threshold) in enumerate(methods):
            start = time.perf_counter()
            if method == "baseline":
                result = segment_full_resolution(image, baseline, base, device)
            else:
                cfg = replace(base, selection=TileSelection.threshold(threshold))
                result = segment_image(image, bundle.model1, bundle.model2, cfg, device)
            seconds = time.perf_counter() - start
            counts = confusion(result.mask, truth, num_labels)
            pooled[index] += counts
            d, j = dice_iou(counts)
            per_image[index].append((d, j, result.counts["refined_fraction"], seconds))
            if method == "baseline":
                baseline_mask = result.mask
            elif baseline_mask is not None:
                agreements[index].append(dice_iou(confusion(result.mask, baseline_mask, num_labels))[0])
        if progress:
            progress(done, len(samples))
    rows = []
    for index, (method, threshold) in enumerate(methods):
        values = np.asarray(per_image[index]) if per_image[index] else np.zeros((0, 4))
        rows.append(MethodScores(
            method=method,
            threshold=threshold,
            dice=float(values[:, 0].mean()) if len(values) else float("nan"),
            iou=float(values[:, 1].mean()) if len(values) else float("nan"),
            dice_pooled=dice_iou(pooled[index])[0],
            refined_fraction=float(values[:, 2].mean()) if len(values) else float("nan"),
            seconds_per_image=float(values[:, 3].mean()) if len(values) else float("nan"),
            images=len(values),
            agreement=float(np.mean(agreements[index])) if agreements[index] else None,
        ))
    return rows


def format_table(rows: list[MethodScores]) -> list[str]:
    """Rows as aligned text lines ("vs base": Dice of the row's masks against the baseline's)."""
    lines = [f"{'method':10s} {'thresh':>6s} {'Dice':>7s} {'IoU':>7s} {'pooled':>7s} {'refined':>8s} {'s/image':>8s}"
             f" {'vs base':>7s}"]
    for r in rows:
        threshold = "" if r.threshold is None else f"{r.threshold:g}"
        agreement = "" if r.agreement is None else f"{100 * r.agreement:6.2f}%"
        lines.append(
            f"{r.method:10s} {threshold:>6s} {100 * r.dice:6.2f}% {100 * r.iou:6.2f}% {100 * r.dice_pooled:6.2f}% "
            f"{100 * r.refined_fraction:7.1f}% {r.seconds_per_image:8.4f} {agreement:>7s}"
        )
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
    rows = evaluate(bundle, data, samples, thresholds or PAPER_THRESHOLDS, baseline, device, progress, overrides)
    paths = write_results(
        rows, out_dir or Path(f"evaluation-{bundle_path.stem}"),
        f"{bundle_path.name} on {dataset} ({split}, {len(samples)} images)",
        {"bundle": str(bundle_path), "dataset": dataset, "split": split, "split_seed": seed},
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
    from wsiseg.errors import InputError
    from wsiseg.train.datasets import open_dataset

    data = open_dataset(dataset, data_root, multiclass)
    seed = split_seed if split_seed is not None else int(bundle.config.get("training", {}).get("split_seed", 0))
    samples = data.split(split, seed)[: limit or None]
    if not samples:
        raise InputError(f"the {split} split of {data_root} is empty")
    return data, samples, seed
