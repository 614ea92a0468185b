"""Threshold calibration: the bundle's default threshold chosen on the user's own images.

:func:`calibrate` scores a bundle's two-stage pipeline at a grid of
thresholds on a labelled data set, and full resolution (its baseline, or
Model 2 on every tile), in the setting ``wsiseg segment`` runs
(:func:`wsiseg.evaluate.evaluate`, the same code ``wsiseg evaluate`` runs),
picks the highest threshold whose mean Dice (and panoptic quality, where the
truth has objects) is within ``max_loss`` of full resolution's (the fewest
refined tiles, so the fastest run that is as good),
and writes a copy of the bundle with that threshold as its default and the
images' domain profile (:mod:`wsiseg.domain`: what the domain check compares
runs with) (a new checksum): ``wsiseg segment --model COPY`` then uses it without
``--threshold``. The original bundle is never changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsiseg.errors import InputError

#: Thresholds tried by default: 1, 0.95, ..., 0.05, 0.
CALIBRATION_THRESHOLDS = tuple(round(1 - 0.05 * i, 2) for i in range(21))


@dataclass
class Calibration:
    """What :func:`calibrate` chose and from what.

    Attributes
    ----------
    rows : list of MethodScores
        The baseline first, then two-stage by threshold.
    threshold : float
        The chosen default threshold.
    within : bool
        False when no threshold came within ``max_loss`` (the best-scoring one was chosen).
    path : Path
        The calibrated bundle.
    """

    rows: list[Any]
    threshold: float
    within: bool
    path: Path


def choose_threshold(rows: list[Any], max_loss: float) -> tuple[float, bool]:
    """The highest two-stage threshold that scores within ``max_loss`` of full resolution.

    Full resolution is the baseline row where there is one, else two-stage
    at threshold 0 (Model 2 on every tile: what ``--full-resolution`` runs
    for a bundle without a separate baseline). Within means the mean Dice
    and, where the rows score objects, the panoptic quality (what users of
    ``--objects`` consume) are each at least the reference's minus ``max_loss``.

    Returns
    -------
    threshold, within
        ``within`` is False when none qualifies; the threshold is then the best-scoring one.
    """
    two_stage = [r for r in rows if r.method == "two-stage"]
    reference = next((r for r in rows if r.method == "baseline"), None)
    if reference is None:
        reference = next((r for r in two_stage if r.threshold == 0), None)
    if reference is None:
        raise InputError("choosing a threshold needs a full-resolution baseline or a row at threshold 0")

    def within(row: Any) -> bool:
        objects_ok = row.pq is None or reference.pq is None or row.pq >= reference.pq - max_loss
        return row.dice >= reference.dice - max_loss and objects_ok

    good = [r for r in two_stage if within(r)]
    if good:
        return max(r.threshold for r in good), True
    return max(two_stage, key=lambda r: (r.dice, r.threshold)).threshold, False


def calibrate(
    bundle_path: str | Path,
    dataset: str,
    data_root: str | Path,
    out: str | Path | None = None,
    max_loss: float = 0.005,
    thresholds: tuple[float, ...] = CALIBRATION_THRESHOLDS,
    split: str = "test",
    split_seed: int | None = None,
    multiclass: bool = False,
    limit: int = 0,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Calibration:
    """Choose and store a bundle's default threshold from its scores on labelled images.

    Parameters
    ----------
    bundle_path : path
        A bundle with a Model 1 / Model 2 pair and a full-resolution ``model``.
    dataset, data_root : the labelled images (any layout ``wsiseg train`` reads, ``folder`` included).
    out : path, optional
        The calibrated bundle; default ``<bundle>-calibrated.safetensors`` beside it. Never the input.
    max_loss : float
        Dice (a fraction: 0.005 is half a point) the two-stage run may lose against the baseline.
    split, split_seed, multiclass, limit, device : as for ``wsiseg evaluate``.

    Raises
    ------
    InputError
        A bundle without a baseline or a pair, an output that exists or is the bundle, a bad ``max_loss``.
    """
    from wsiseg.bundle import load_bundle, save_bundle
    from wsiseg.evaluate import domain_profile, evaluate, scored_split

    bundle_path = Path(bundle_path)
    out = Path(out) if out is not None else bundle_path.with_name(f"{bundle_path.stem}-calibrated.safetensors")
    if not 0 <= max_loss < 1:
        raise InputError(f"--max-loss must be a fraction of Dice in [0, 1), got {max_loss}")
    if out.exists():
        raise InputError(f"{out} already exists; choose another --out (the calibrated bundle is a new file)")
    bundle = load_bundle(bundle_path)
    if not bundle.is_two_stage:
        raise InputError("calibration needs a bundle with a Model 1 / Model 2 pair")
    if "model" not in bundle.models:  # full resolution is Model 2 everywhere
        thresholds = tuple(dict.fromkeys((*thresholds, 0.0)))
    data, samples, _ = scored_split(bundle, dataset, data_root, split, split_seed, multiclass, limit)
    rows = evaluate(bundle, data, samples, tuple(thresholds), None, device, progress)
    threshold, within = choose_threshold(rows, max_loss)
    record = {"dataset": dataset, "split": split, "images": len(samples), "max_loss": max_loss,
              "within": within, "rows": [vars(r) for r in rows]}
    profile = domain_profile(bundle, data, samples, threshold, f"{dataset} {split} split, {len(samples)} images")
    path = save_bundle(out, bundle.models, {**bundle.config, "threshold": threshold, "calibration": record,
                                            "domain": profile.to_config()})
    return Calibration(rows, threshold, within, path)
