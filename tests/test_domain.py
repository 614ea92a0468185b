"""The domain check: a bundle's validation profile against a run's tissue tiles (wsiseg.domain)."""

from __future__ import annotations

import numpy as np
import pytest

from wsiseg.config import BundleSettings
from wsiseg.domain import DomainEvidence, DomainProfile, check_domain
from wsiseg.errors import BundleError
from wsiseg.run.driver import FlowResult


def _evidence(scores, fraction, background="bright") -> DomainEvidence:
    return DomainEvidence(background, np.asarray(scores, np.float64), fraction)


def test_evidence_counts_the_tissue_tiles_only() -> None:
    scores = np.array([[0.9, 0.8, 0.1], [0.7, 0.6, 0.2]])
    tissue = np.array([[1.0, 0.5, 0.0], [0.2, 0.0, 1.0]])
    counts = {"0,0": [90, 10], "0,1": [70, 30], "0,2": [100, 0], "1,0": [100, 0], "1,1": [0, 100], "1,2": [60, 40]}
    flow = FlowResult(refined=scores > 0.5, scores=scores, counts=counts, resumed_tiles=0, tissue=tissue,
                      tissue_summary={"background": "dark"})
    evidence = DomainEvidence.of_flow(flow)
    assert evidence.background == "dark"
    assert sorted(evidence.tile_scores.tolist()) == [0.2, 0.7, 0.8, 0.9]
    assert evidence.foreground_fraction == pytest.approx(80 / 400)  # 10 + 30 + 0 + 40 of four 100-pixel tiles


def test_profile_takes_the_quantiles_of_the_validation_images() -> None:
    images = [_evidence(np.linspace(0, 1, 101)[i::4], fraction) for i, fraction in enumerate((0.1, 0.2, 0.3, 0.05))]
    profile = DomainProfile.of_images(images, "test split")
    assert profile.backgrounds == ("bright",)
    assert profile.score_high == pytest.approx(0.99)  # the pooled scores are 0, 0.01, ..., 1
    assert profile.foreground_low == pytest.approx(np.quantile([0.1, 0.2, 0.3, 0.05], 0.01), abs=1e-5)
    assert profile.images == 4
    rare_dark = DomainProfile.of_images([*images * 3, _evidence([0.5], 0.1, "dark")])
    assert rare_dark.backgrounds == ("bright",)  # 1 of 13 images: under BACKGROUND_SHARE
    assert DomainProfile.of_images([*images, _evidence([0.5], 0.1, "dark")]).backgrounds == ("bright", "dark")
    settings = BundleSettings.from_config({"domain": profile.to_config()})
    assert settings.domain == profile
    assert BundleSettings.from_config(settings.to_config()).domain == profile


def test_a_malformed_profile_is_a_bundle_error() -> None:
    with pytest.raises(BundleError, match="domain must hold"):
        BundleSettings.from_config({"domain": {"backgrounds": ["bright"]}})


PROFILE = DomainProfile(("bright",), score_high=0.8, foreground_low=0.01, images=133)


@pytest.mark.parametrize(
    ("run", "expected"),
    [
        (_evidence([0.3, 0.5, 0.7, 0.75], 0.08), []),  # H&E like its validation images: no warning
        (_evidence([0.5, 0.6, 0.7], 0.0004, "dark"), ["dark background", "labelled 0.04 %"]),  # fluorescence
        (_evidence([0.85, 0.9, 0.7], 0.1), ["less sure on most tissue tiles (median score 0.85)"]),
        (_evidence([0.3, 0.4], 0.002), ["labelled 0.20 % of the tissue"]),
    ],
)
def test_check_warns_once_per_failed_test(run: DomainEvidence, expected: list[str]) -> None:
    summary, warnings = check_domain(PROFILE, run)
    assert len(warnings) == len(expected)
    for warning, phrase in zip(warnings, expected):
        assert phrase in warning and "wsiseg train" in warning
        assert ("--model bowl" in warning) == ("dark background" in warning)  # the fluorescence model, for dark images
    assert summary["tissue_tiles"] == run.tile_scores.size
    assert summary["median_score"] == pytest.approx(float(np.median(run.tile_scores)), abs=1e-4)


def test_no_profile_no_warning() -> None:
    summary, warnings = check_domain(None, _evidence([0.99, 0.99], 0.0, "dark"))
    assert warnings == [] and summary["profile"] is None and summary["background"] == "dark"


def _fluorescence(path, rng: np.random.Generator):
    """A 384 x 384 fluorescence-like PNG: dark background, 30 bright round nuclei of radius 7."""
    from PIL import Image

    image = np.clip(rng.normal(6, 2, (384, 384)), 0, 255)
    yy, xx = np.mgrid[:384, :384]
    for y, x in rng.integers(20, 364, (30, 2)):
        image[(yy - y) ** 2 + (xx - x) ** 2 <= 49] = 170
    Image.fromarray(np.repeat(image.astype(np.uint8)[..., None], 3, axis=2)).save(path)
    return path


@pytest.mark.parametrize(("model", "warned"), [("default", True), ("bowl", False)])
def test_a_fluorescence_image_warns_with_the_he_model_only(tmp_path, model: str, warned: bool) -> None:
    """The shipped H&E model's profile saw bright-field images only: a dark image warns and names the
    fluorescence model; the BOWL model's profile holds dark images, so it does not warn on their background."""
    from wsiseg.config import RunOptions
    from wsiseg.run.slides import segment_slide

    image = _fluorescence(tmp_path / "cells.png", np.random.default_rng(3))
    report = segment_slide(image, tmp_path / "out.zarr", None, None, RunOptions(model=model, mpp=0.4))
    assert report.domain["background"] == "dark"
    assert report.domain["profile"] is not None
    background_warnings = [w for w in report.warnings if w.startswith("the image has a dark background")]
    assert len(background_warnings) == int(warned)
    if warned:
        assert "--model bowl" in background_warnings[0]
