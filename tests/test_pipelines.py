"""The scripts of pipelines/: the paper's tables and the default model's threshold rule.

(Cohorts of slides are ``wsiseg segment FOLDER...``: tests/test_cohort.py.)
"""

from __future__ import annotations

import pytest

import csv
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.mark.training
def test_paper_tables_write_table3_table4_and_losses_and_reuse_their_runs(tmp_path) -> None:
    import torch

    from test_train import make_bowl
    from wsiseg.bundle import load_bundle

    make_bowl(tmp_path / "bowl", n=4, size=64)
    tables = _load("paper_tables")
    work, results = tmp_path / "work", tmp_path / "results"
    argv = ["--data-root", str(tmp_path / "bowl"), "--work", str(work), "--results", str(results),
            "--archs", "unet,fcn", "--patches", "4,16", "--epochs", "1", "--crop-size", "64", "--batch-size", "2", "--device", "cpu"]
    assert tables.main(argv) == 0

    table3 = list(csv.DictReader(open(results / "paper_table3.csv")))
    methods = ["baseline, whole image", "baseline, tiles 128", "two-stage t=0.5", "two-stage t=0.25"]
    assert [(r["arch"], r["method"]) for r in table3] == [(a, m) for a in ("unet", "fcn") for m in methods]
    unet = {r["method"]: r for r in table3 if r["arch"] == "unet"}
    whole = unet["baseline, whole image"]
    assert (whole["paper_dice"], unet["two-stage t=0.5"]["paper_dice"]) == ("82.9", "83.2")
    assert whole["dice_change"] == "0.0" and whole["speedup"] == "1.0"
    # 64-pixel images: a 128-pixel tile is the whole image, so both baselines give the same masks.
    assert unet["baseline, tiles 128"]["dice"] == whole["dice"]
    for row in table3:
        assert float(row["train_s"]) >= 0 and 0 <= float(row["dice"]) <= 100
    text = (results / "paper_table3.md").read_text()
    assert text.startswith("# Table 3") and "Deviations from the paper" in text and "64-pixel crops" in text

    table4 = list(csv.DictReader(open(results / "paper_table4.csv")))
    studies = [r["study"] for r in table4]
    assert studies.count("patches") == 4 and studies.count("sampling") == 6  # two thresholds each
    assert studies.count("threshold") == 5 and studies.count("finetune-context") == 8
    assert [r["setting"] for r in table4 if r["study"] == "patches"][::2] == ["4 (tile 32)", "16 (tile 16)"]
    assert [tables.patch_tile(256, p, 4) for p in tables.PATCHES] == [128, 64, 32, 24]  # the BOWL run's tiles
    assert [float(r["threshold"]) for r in table4 if r["study"] == "threshold"] == [1.0, 0.75, 0.5, 0.25, 0.0]
    shared = load_bundle(work / "bundles" / "t3-unet.safetensors").model1.state_dict()
    for name in ("t4-tile32", "t4-highest", "t4-ft0-ctx0"):  # stage-2 ablations keep Table 3's Model 1
        ablation = load_bundle(work / "bundles" / f"{name}.safetensors")
        assert all(torch.equal(v, ablation.model1.state_dict()[k]) for k, v in shared.items()), name
        assert set(ablation.config["training"]["seconds"]) == {"stage2"}
    assert load_bundle(work / "bundles" / "t4-tile32.safetensors").config["tile_size"] == 32

    losses = list(csv.DictReader(open(results / "paper_losses.csv")))
    assert [(r["loss"], r["method"]) for r in losses] == [
        (loss, m) for loss in ("focal", "ce", "ohem", "lad")
        for m in ("Model 1 alone (t=1)", "two-stage t=0.5", "two-stage t=0.25")]

    # Run again: every bundle and score is reused, so the tables come out identical.
    stamps = {p.name: p.stat().st_mtime_ns for p in (work / "bundles").iterdir()}
    before = {name: (results / name).read_text() for name in ("paper_table3.csv", "paper_table4.csv", "paper_losses.csv")}
    assert tables.main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (work / "bundles").iterdir()} == stamps
    assert {name: (results / name).read_text() for name in before} == before
    assert len([n for n in stamps if n.endswith(".safetensors")]) == 2 + 1 + 2 + 3 + 3

    # A finished bundle scored beside the runs: the U-Net run itself gives the U-Net's rows.
    given = f"again={work / 'bundles' / 't3-unet.safetensors'}"
    assert tables.main([*argv, "--tables", "3", "--reference", given]) == 0
    table3 = list(csv.DictReader(open(results / "paper_table3.csv")))
    again = [(r["method"], r["dice"], r["refined"]) for r in table3 if r["arch"] == "again"]
    assert again == [(r["method"], r["dice"], r["refined"]) for r in table3 if r["arch"] == "unet"] and len(again) == 4


def test_default_model_variants_and_the_one_threshold_rule() -> None:
    """The pipeline picks thresholds with wsiseg calibrate's rule; the H&E variants train on NuInsSeg at 0.2-0.5 um."""
    import wsiseg.calibrate

    pipeline = _load("train_default_model")
    assert not hasattr(pipeline, "choose_threshold") and pipeline.MAX_LOSS == 0.01
    he = pipeline.training_config(Path("nuinsseg"), "he", Path("bowl.safetensors"))
    assert (he.dataset, he.mpp, he.scale_jitter, he.init_from) == ("nuinsseg", 0.316, 0.58, "bowl.safetensors")
    assert he.mpp / (1 + he.scale_jitter) == pytest.approx(0.2, abs=1e-3) and he.mpp * 1.58 == pytest.approx(0.5, abs=1e-3)
    both = pipeline.training_config(Path("nuinsseg"), "he-bowl", Path("b.safetensors"), bowl_root=Path("bowl"))
    assert both.extra_datasets == ("bowl=bowl",)
    with pytest.raises(ValueError, match="give --bowl-root"):
        pipeline.training_config(Path("nuinsseg"), "he-bowl", Path("b.safetensors"))
    assert pipeline.training_config(Path("n"), "he-gaps", Path("b")).touching_gaps
    assert set(pipeline.PROVENANCE["nuinsseg"]) >= {"license", "citation"} and "CC BY 4.0" in pipeline.PROVENANCE["nuinsseg"]["license"]
    assert wsiseg.calibrate.choose_threshold  # the rule the pipeline calls


@pytest.mark.parametrize("variant", ["finetuned", "synthetic", "synthetic-more", "synthetic-long"])
def test_default_model_fine_tuned_variants_need_the_bundle_to_start_from(tmp_path, capsys, variant) -> None:
    pipeline = _load("train_default_model")
    assert pipeline.VARIANTS[variant]["brightfield_repeats"] == 4
    assert pipeline.VARIANTS[variant].get("synthetic_he", 0.0) == {"finetuned": 0.0, "synthetic": 0.3}.get(variant, 0.5)
    config = pipeline.training_config(tmp_path, variant, tmp_path / "start.safetensors", workers=3)
    assert config.dataset == "bowl"
    assert (config.init_from, config.workers, config.stage) == (str(tmp_path / "start.safetensors"), 3, "all")
    assert config.epochs == {"synthetic-long": 50}.get(variant, 10) and config.lr == 3e-4 and config.image_size == 0
    with pytest.raises(ValueError, match="needs --init-from"):
        pipeline.training_config(tmp_path, variant, None)
    with pytest.raises(SystemExit) as stop:
        pipeline.main(["--data-root", str(tmp_path), "--variant", variant, "--work", str(tmp_path / "w")])
    assert stop.value.code == 2 and "needs --init-from" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.training
def test_default_model_packaging_keeps_the_rules_threshold_unless_one_is_given(tmp_path) -> None:
    """--bundle packages a finished run: scored on its test split; --threshold overrides the rule's choice."""
    from test_train import make_bowl

    from wsiseg.bundle import load_bundle
    from wsiseg.evaluate import MethodScores
    from wsiseg.train.config import TrainConfig
    from wsiseg.train.fit import train

    make_bowl(tmp_path / "bowl", n=6)
    run = train(TrainConfig(dataset="bowl", data_root=str(tmp_path / "bowl"), image_size=32, patches=4, halo=4, ratio=2,
                            epochs=0, batch_size=2, stage="all", val_images=1), tmp_path / "run.safetensors")
    pipeline = _load("train_default_model")
    common = ["--variant", "bowl", "--data-root", str(tmp_path / "bowl"), "--bundle", str(run)]
    assert pipeline.main([*common, "--out", str(tmp_path / "rule.safetensors"), "--results", str(tmp_path / "r1")]) == 0
    from wsiseg.calibrate import choose_threshold

    packaged = load_bundle(tmp_path / "rule.safetensors").config
    rows = [MethodScores(**row) for row in packaged["evaluation"]["rows"]]
    assert packaged["threshold"] == choose_threshold(rows, 0.01)[0] != 0.45
    assert packaged["training_data"]["license"] == "CC0 1.0" and packaged["mpp"] == 0.4

    assert pipeline.main([*common, "--out", str(tmp_path / "given.safetensors"), "--results", str(tmp_path / "r2"),
                          "--threshold", "0.45", "--evaluation", str(tmp_path / "r1" / "bowl_model.json")]) == 0
    given = load_bundle(tmp_path / "given.safetensors").config
    assert given["threshold"] == 0.45 and given["evaluation"]["rows"] == [r.__dict__ for r in rows]
    assert "default threshold: 0.45" in (tmp_path / "r2" / "bowl_model.md").read_text()
