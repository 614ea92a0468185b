"""The domain check: does a run's image look like the images the bundle was validated on?

A bundle records a :class:`DomainProfile` measured on its own validation
split, in the setting ``wsiseg segment`` runs (:func:`wsiseg.evaluate.domain_profile`,
called by ``pipelines/record_domain.py`` and ``wsiseg calibrate``): the kinds of background its images had, the 99th
percentile of Model 1's tile scores over their tissue tiles, and the 1st
percentile of the fraction of their tissue that the models call foreground.
A run's :class:`DomainEvidence` (the same quantities over its tissue tiles)
is compared with it by :func:`check_domain`; each failed test is one warning line:

- a background the bundle did not see on at least 10 % of its images (a
  fluorescence image, dark, for a bright-field H&E model);
- most tissue tiles more uncertain than 99 % of the validation tiles
  (the median tile score above the profile's 99th percentile);
- almost no foreground on tissue (less than on 99 % of the validation
  images): a confidently wrong model is not uncertain, it finds nothing.

Scores are the gate's (mean normalised entropy of Model 1 over a tile), so
a bundle's uncertain dense H&E tiles are its normal, and the warnings never
speak of the tiles the gate refined (``benchmarks/RESULTS.md``, "Domain check").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: The profile's high quantile of tile scores and low quantile of per-image foreground fractions.
SCORE_QUANTILE, FOREGROUND_QUANTILE = 0.99, 0.01
#: A background counts as seen when at least this share of the validation images had it (dense H&E crops
#: with no glass can read as dark: 4 of NuInsSeg's 133 val images).
BACKGROUND_SHARE = 0.1
#: What to do when a warning fires (the end of every domain warning).
ADVICE = ("fine-tune it on such images (wsiseg train --dataset folder --data-root DIR --init-from MODEL "
          "--image-size 0)")
#: The model made for dark images, named when a bundle validated on bright-field ones meets one.
FLUORESCENCE_MODEL = "--model bowl (fluorescence and bright-field nuclei)"


@dataclass(frozen=True)
class DomainEvidence:
    """What one run (or one validation image) shows over its tissue tiles.

    Attributes
    ----------
    background : ``"bright"``, ``"dark"`` or None (no tissue detection).
    tile_scores : ``(n,)`` float64 Model 1's score of each tissue tile (empty at full resolution).
    foreground_fraction : fraction of the tissue tiles' pixels labelled foreground (any class but 0).
    """

    background: str | None
    tile_scores: np.ndarray
    foreground_fraction: float

    @classmethod
    def of_run(cls, scores: np.ndarray | None, tissue: np.ndarray | None, counts: Mapping[str, Sequence[int]],
               background: str | None) -> DomainEvidence:
        """From a flow's ``(rows, cols)`` tile ``scores`` and tissue fractions, and its per-tile label
        histograms ``counts`` (``"row,col"`` -> counts per class)."""
        shape = scores.shape if scores is not None else (tissue.shape if tissue is not None else None)
        on_tissue = None if shape is None else (np.ones(shape, bool) if tissue is None else tissue > 0)
        tile_scores = np.zeros(0) if scores is None else np.asarray(scores, np.float64)[on_tissue]
        labelled = total = 0
        for key, histogram in counts.items():
            row, col = (int(v) for v in key.split(","))
            if on_tissue is None or on_tissue[row, col]:
                labelled += int(sum(histogram[1:]))
                total += int(sum(histogram))
        return cls(background, tile_scores, labelled / total if total else 0.0)

    @classmethod
    def of_flow(cls, flow: Any) -> DomainEvidence:
        """From a :class:`~wsiseg.run.driver.FlowResult`."""
        return cls.of_run(flow.scores, flow.tissue, flow.counts, (flow.tissue_summary or {}).get("background"))


@dataclass(frozen=True)
class DomainProfile:
    """A bundle's own domain, from its validation images (stored in the bundle header as ``domain``)."""

    backgrounds: tuple[str, ...]
    score_high: float
    foreground_low: float
    images: int
    measured_on: str = ""

    @classmethod
    def of_images(cls, evidence: Sequence[DomainEvidence], measured_on: str = "") -> DomainProfile:
        """The profile of validation images: the backgrounds of at least :data:`BACKGROUND_SHARE` of them,
        the 99th percentile of their pooled tissue-tile scores, the 1st percentile of their foreground fractions."""
        if not evidence:
            raise ValueError("a domain profile needs at least one image")
        scores = np.concatenate([e.tile_scores for e in evidence])
        fractions = np.array([e.foreground_fraction for e in evidence])
        kinds = [e.background for e in evidence if e.background]
        backgrounds = tuple(sorted(k for k in set(kinds) if kinds.count(k) >= BACKGROUND_SHARE * len(kinds)))
        return cls(backgrounds, round(float(np.quantile(scores, SCORE_QUANTILE)) if scores.size else 1.0, 4),
                   round(float(np.quantile(fractions, FOREGROUND_QUANTILE)), 5), len(evidence), measured_on)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DomainProfile | None:
        """The profile a bundle header records, or None (bundles made before profiles)."""
        stored = config.get("domain")
        if not isinstance(stored, Mapping):
            return None
        return cls(tuple(stored["backgrounds"]), float(stored["score_high"]), float(stored["foreground_low"]),
                   int(stored["images"]), str(stored.get("measured_on", "")))

    def to_config(self) -> dict[str, Any]:
        return {**asdict(self), "backgrounds": list(self.backgrounds)}


def check_domain(profile: DomainProfile | None, run: DomainEvidence) -> tuple[dict[str, Any], list[str]]:
    """Compare a run with the bundle's profile.

    Returns
    -------
    (summary, warnings)
        ``summary`` for ``report.json``: ``tissue_tiles``, ``median_score``,
        ``foreground_fraction``, ``background`` and the ``profile``; one
        warning line per failed test (none without a profile or tissue tiles).
    """
    median = float(np.median(run.tile_scores)) if run.tile_scores.size else None
    summary: dict[str, Any] = {
        "tissue_tiles": int(run.tile_scores.size), "median_score": None if median is None else round(median, 4),
        "foreground_fraction": round(run.foreground_fraction, 5), "background": run.background,
        "profile": None if profile is None else profile.to_config(),
    }
    if profile is None:
        return summary, []
    warnings = []
    if run.background and profile.backgrounds and run.background not in profile.backgrounds:
        kinds = {"dark": "a dark background (fluorescence or dark-field)", "bright": "a bright background (bright-field)"}
        other = f"use {FLUORESCENCE_MODEL}, or " if run.background == "dark" else ""
        warnings.append(f"the image has {kinds.get(run.background, run.background)}; the model was validated only on "
                        f"images with {' or '.join(kinds.get(b, b) for b in profile.backgrounds)}, so its mask may be "
                        f"poor: {other}{ADVICE}")
    if median is not None and median > profile.score_high:
        warnings.append(f"Model 1 is less sure on most tissue tiles (median score {median:.2f}) than on 99 % of its "
                        f"validation tiles ({profile.score_high:.2f}): these images look out of its domain: {ADVICE}")
    if run.tile_scores.size and run.foreground_fraction < profile.foreground_low:
        warnings.append(f"the model labelled {100 * run.foreground_fraction:.2f} % of the tissue as foreground, less "
                        f"than on 99 % of its validation images ({100 * profile.foreground_low:.2f} %): check the "
                        f"overlay; {ADVICE}")
    return summary, warnings
