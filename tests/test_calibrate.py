"""``wsiseg calibrate`` on a fabricated set whose right threshold is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import centred_model, structured_image
from wsiseg.bundle import load_bundle, save_bundle
from wsiseg.calibrate import calibrate, choose_threshold
from wsiseg.cli import main
from wsiseg.config import TwoStageConfig
from wsiseg.errors import InputError
from wsiseg.evaluate import MethodScores
from wsiseg.models import build_model
from wsiseg.run import segment_full_resolution

#: Model 1 says P(foreground) = 0.4 everywhere: every tile scores H(0.4) / log 2 (about 0.971).
CONSTANT_P = 0.4
SCORE = -(CONSTANT_P * math.log(CONSTANT_P) + (1 - CONSTANT_P) * math.log(1 - CONSTANT_P)) / math.log(2)
CONFIG = {"ratio": 2, "tile_size": 32, "halo": 32, "context": False, "threshold": 0.25}


@pytest.fixture
def fabricated(tmp_path):
    """A folder data set whose truth is the baseline's own masks, and a bundle in which Model 2
    is the baseline (context off) and Model 1 is uncertain everywhere, background everywhere.

    So the two-stage Dice is 1 at every threshold up to the tiles' score (all refined) and 0
    above it (none refined): the right choice is the highest grid threshold <= 0.971, 0.95."""
    images = [structured_image(np.random.default_rng(seed), 64, 96) for seed in range(3)]
    baseline = centred_model("unet", "resnet_lite", images[0], 3)
    model1 = build_model("unet", 1, backbone="resnet_lite").eval()
    with torch.no_grad():
        model1.classifier.weight.zero_()
        model1.classifier.bias.fill_(math.log(CONSTANT_P / (1 - CONSTANT_P)))
    model2 = build_model("unet", 1, backbone="resnet_lite").eval()
    model2.load_state_dict(baseline.state_dict())
    for folder in ("images", "masks"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    for i, image in enumerate(images):
        # The baseline's masks as wsiseg segment (and so calibration) runs it: tiles of about 512, tissue mask.
        truth = segment_full_resolution(image, baseline, TwoStageConfig(halo=32), "cpu", tissue=True).mask
        assert 0 < truth.mean() < 1
        Image.fromarray(image).save(tmp_path / "data" / "images" / f"s{i}.png")
        Image.fromarray(truth * 255).save(tmp_path / "data" / "masks" / f"s{i}.png")
    bundle = save_bundle(tmp_path / "pair.safetensors", {"model1": model1, "model2": model2, "model": baseline}, CONFIG)
    return bundle, tmp_path / "data"


@pytest.mark.slow
def test_calibration_picks_the_highest_threshold_as_good_as_the_baseline(fabricated) -> None:
    bundle, data = fabricated
    before = bundle.read_bytes()
    result = calibrate(bundle, "folder", data, split="all")
    by_threshold = {r.threshold: r for r in result.rows if r.method == "two-stage"}
    assert result.rows[0].method == "baseline" and result.rows[0].dice == pytest.approx(1.0)
    assert all(r.dice == pytest.approx(1.0) and r.refined_fraction == 1.0 for t, r in by_threshold.items() if t <= SCORE)
    assert all(r.dice == 0.0 and r.refined_fraction == 0.0 for t, r in by_threshold.items() if t > SCORE)
    assert (result.threshold, result.within) == (0.95, True)
    calibrated = load_bundle(result.path)
    assert calibrated.config["threshold"] == 0.95 and calibrated.config["calibration"]["images"] == 3
    domain = calibrated.config["domain"]  # the images' profile, measured at the chosen threshold
    assert domain["images"] == 3 and domain["measured_on"] == "folder all split, 3 images"
    assert domain["score_high"] == pytest.approx(SCORE, abs=1e-4)  # every tile scores SCORE (the fabricated Model 1)
    assert calibrated.checksum != load_bundle(bundle).checksum
    assert bundle.read_bytes() == before  # the original is never changed
    with pytest.raises(InputError, match="already exists"):
        calibrate(bundle, "folder", data, split="all")


@pytest.mark.slow
def test_calibrate_command_prints_the_table_and_the_choice(fabricated, tmp_path) -> None:
    bundle, data = fabricated
    out = tmp_path / "chosen.safetensors"
    result = CliRunner().invoke(main, ["calibrate", str(bundle), "--dataset", "folder", "--data-root", str(data),
                                       "--split", "all", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == f"threshold 0.95 -> {out}"
    assert sum(line.startswith("two-stage") for line in result.output.splitlines()) == 21
    assert load_bundle(out).config["threshold"] == 0.95


def test_choose_threshold_within_the_loss_or_the_best() -> None:
    def row(method, threshold, dice):
        return MethodScores(method, threshold, dice, 0, dice, 0, 0, 1)

    rows = [row("baseline", None, 0.80), row("two-stage", 1.0, 0.70), row("two-stage", 0.5, 0.797),
            row("two-stage", 0.25, 0.81), row("two-stage", 0.0, 0.80)]
    assert choose_threshold(rows, 0.005) == (0.5, True)
    assert choose_threshold(rows, 0.0) == (0.25, True)
    worse = [row("baseline", None, 0.9), row("two-stage", 1.0, 0.5), row("two-stage", 0.0, 0.6)]
    assert choose_threshold(worse, 0.01) == (0.0, False)


def test_without_a_baseline_full_resolution_is_model2_everywhere_and_objects_count_too() -> None:
    def row(threshold, dice, pq):
        return MethodScores("two-stage", threshold, dice, 0, dice, 0, 0, 1, pq=pq)

    rows = [row(1.0, 0.70, 0.30), row(0.6, 0.80, 0.50), row(0.3, 0.805, 0.545), row(0.0, 0.80, 0.55)]
    # t = 0 is the reference; 0.6 is within a point of its Dice but not of its PQ, 0.3 of both.
    assert choose_threshold(rows, 0.01) == (0.3, True)
    with pytest.raises(InputError, match="threshold 0"):
        choose_threshold([r for r in rows if r.threshold], 0.01)
