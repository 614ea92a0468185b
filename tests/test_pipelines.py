"""The cohort batch job: slides in parallel, finished ones skipped, a CSV manifest."""

from __future__ import annotations

import pytest

import csv
import importlib.util
from pathlib import Path

import numpy as np

from conftest import structured_image, write_pyramid
from wsiseg.config import RunOptions, TwoStageConfig
from wsiseg.uncertainty import TileSelection

ROOT = Path(__file__).resolve().parents[1]


def _load_pipeline():
    spec = importlib.util.spec_from_file_location("segment_cohort", ROOT / "pipelines" / "segment_cohort.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cohort_segments_skips_done_and_reports_failures(tmp_path, test_bundle, local_client) -> None:
    cohort = _load_pipeline()
    slides_dir = tmp_path / "slides"
    slides_dir.mkdir()
    for i in range(2):
        write_pyramid(slides_dir / f"s{i}.tif", structured_image(np.random.default_rng(i), 300, 400), tile=64, factors=(1, 4))
    (slides_dir / "broken.tif").write_bytes(b"II*\x00garbage")
    (slides_dir / "notes.txt").write_text("ignored: not a slide suffix")
    slides = cohort.find_slides([slides_dir])
    assert [p.name for p in slides] == ["broken.tif", "s0.tif", "s1.tif"]

    config = TwoStageConfig(selection=TileSelection.budget(0.5), tile_size=128)
    options = RunOptions(model=str(test_bundle))
    out = tmp_path / "out"
    rows = cohort.run_cohort(slides, out, config, options, local_client, parallel=2)
    assert [r["status"] for r in rows] == ["failed", "done", "done"]
    assert "broken.tif" in rows[0]["error"] and "Traceback" not in rows[0]["error"]
    assert rows[1]["tiles_total"] == 3 * 4 and rows[1]["tiles_refined"] == 6
    with open(out / "manifest.csv") as handle:
        manifest = list(csv.DictReader(handle))
    assert [m["status"] for m in manifest] == ["failed", "done", "done"]
    assert manifest[2]["output"].endswith("s1.zarr")

    again = cohort.run_cohort(slides, out, config, options, local_client, parallel=2)
    assert [r["status"] for r in again] == ["failed", "skipped", "skipped"]
    assert again[1]["tiles_refined"] == 6


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.training
def test_paper_tables_grid_runs_and_writes_both_tables(tmp_path) -> None:
    from test_train import make_folder

    make_folder(tmp_path / "d", n=4, size=32)
    tables = _load("paper_tables")
    out = tmp_path / "tables"
    code = tables.main(["--dataset", f"folder={tmp_path / 'd'}", "--out", str(out), "--archs", "unet",
                        "--backbone", "resnet_lite", "--ablation-arch", "unet", "--epochs", "0",
                        "--image-size", "32", "--batch-size", "2", "--ratio", "2", "--device", "cpu"])
    assert code == 0
    table3 = list(csv.DictReader(open(out / "table3.csv")))
    assert [(r["dataset"], r["arch"]) for r in table3] == [("folder", "unet")]
    table4 = list(csv.DictReader(open(out / "table4.csv")))
    studies = [r["study"] for r in table4]
    assert studies.count("patches") == 4 and studies.count("sampling") == 3
    assert studies.count("threshold") == 5 and studies.count("finetune-context") == 4
    assert {r["setting"] for r in table4 if r["study"] == "threshold"} == {"t=1", "t=0.75", "t=0.5", "t=0.25", "t=0"}
    assert (out / "table4.md").read_text().startswith("# Table 4")
    bundles = sorted(p.name for p in (out / "bundles").iterdir())
    assert len(bundles) == 1 + 4 + 3 + 1 + 4  # one per configuration, reused when run again


def test_default_threshold_rule_picks_the_fewest_refinements_within_half_a_point() -> None:
    from wsiseg.evaluate import MethodScores

    rule = _load("train_default_model").choose_threshold

    def row(method, threshold, dice):
        return MethodScores(method, threshold, dice, 0, 0, 0, 0, 1)

    rows = [row("baseline", None, 0.860), row("two-stage", 1.0, 0.858), row("two-stage", 0.6, 0.859),
            row("two-stage", 0.5, 0.861), row("two-stage", 0.4, 0.866), row("two-stage", 0.0, 0.871)]
    assert rule(rows) == 0.5  # the first threshold (from the top) that matches the baseline
    assert rule(rows, floor=0.865) == 0.4
    assert rule([row("baseline", None, 0.95), row("two-stage", 1.0, 0.70), row("two-stage", 0.0, 0.80)]) == 0.0
