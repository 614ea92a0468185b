"""The scripts of pipelines/: the paper's tables and the default model's threshold rule.

(Cohorts of slides are ``wsiseg segment FOLDER...``: tests/test_cohort.py.)
"""

from __future__ import annotations

import pytest

import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
