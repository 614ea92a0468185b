"""Smoke tests: every benchmark script answers ``--help``, and each command runs on a tiny input (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
#: Every script in benchmarks/ (common.py is their helpers, not a script).
SCRIPTS = sorted(p.relative_to(BENCHMARKS) for p in BENCHMARKS.rglob("*.py") if p.name != "common.py")
#: The tests that run a benchmark command or its study code: slow, as conftest marks subprocess tests.
runs_a_benchmark = pytest.mark.subprocess


def load_script(name: str) -> ModuleType:
    """Import ``benchmarks/NAME.py`` as a module, with its ``common`` helpers importable as its command finds them."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Not marked slow: ``--help`` imports no torch and no wsiseg, about 0.1-0.3 s a script.
@pytest.mark.parametrize("script", SCRIPTS, ids=str)
def test_every_benchmark_script_answers_help(script: Path) -> None:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script.name} "), result.stdout[:200]


def test_common_helpers_write_a_result_with_the_command_that_made_it(tmp_path, capsys) -> None:
    import argparse

    common = load_script("common")
    command = common.command_line(BENCHMARKS / "pixel_size.py", ["--scan", "0.5"])
    assert command == "python benchmarks/pixel_size.py --scan 0.5"
    lines = [*common.header(command, "the machine", "a note"), "| a |", "|---|", "| 1 |"]
    common.write_result(tmp_path / "out", "study", {"command": command, "rows": [1]}, lines)
    assert json.loads((tmp_path / "out" / "study.json").read_text()) == {"command": command, "rows": [1]}
    markdown = (tmp_path / "out" / "study.md").read_text()
    assert markdown.startswith(f"`{command}`  \nthe machine  \na note\n\n| a |") and markdown.endswith("| 1 |\n")
    assert capsys.readouterr().out == markdown
    assert common.named_bundle("new=b.safetensors") == ("new", "b.safetensors")
    with pytest.raises(argparse.ArgumentTypeError):
        common.named_bundle("b.safetensors")
    assert common.pipeline_name("baseline", None) == "baseline"
    assert common.pipeline_name("two-stage", 0.6) == "two-stage t=0.6"
    machine = common.machine()
    assert f"{common.cores()} cores" in machine and "torch " in machine


@runs_a_benchmark
def test_loss_benchmark_runs_on_a_tiny_batch(tmp_path) -> None:
    out = tmp_path / "losses.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "losses.py"), "--batch", "1", "--classes", "3", "--size", "32",
         "--repeats", "1", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["loss"] for r in rows] == ["ce", "focal", "ohem", "lad"]
    assert all(r["forward_s"] > 0 and r["backward_s"] > 0 for r in rows)
    assert "| lad |" in result.stdout


def _tiny_slide(tmp_path):
    import numpy as np

    from conftest import structured_image, write_pyramid

    return write_pyramid(tmp_path / "tiny.tif", structured_image(np.random.default_rng(0), 640, 704), tile=128, factors=(1, 2, 4))


def _bench(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_segment.py"), *args, "--out", str(tmp_path / "results")],
        capture_output=True, text=True, timeout=600,
    )


@runs_a_benchmark
def test_make_slides_writes_a_pyramid_with_tissue(tmp_path) -> None:
    from wsiseg.slide import open_slide

    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_slides.py"), "--size", "2048",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    slide = open_slide(tmp_path / "synthetic-2k.tif")
    assert slide.shape == (2048, 2048) and [lvl.shape for lvl in slide.levels] == [(2048, 2048), (1024, 1024)]
    import ast

    info = ast.literal_eval(result.stdout.split(": ", 1)[1].strip())
    assert slide.mpp == (0.499, 0.499) and info["copies"] >= 1
    assert info["tissue_fraction"] >= 0.3  # copies are added until 30 % is tissue (one copy is 49 % of 2k)


@runs_a_benchmark
def test_speed_study_runs_on_a_tiny_slide(tmp_path, test_bundle) -> None:
    result = _bench(tmp_path, "speed", str(_tiny_slide(tmp_path)), "--model", str(test_bundle), "--workers", "1",
                    "--thresholds", "0", "0.5", "--ratio", "2")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "results" / "speed-tiny.json").read_text())
    assert data["default_report"]["stage1"]["scale"] == [2.0, 2.0]  # --ratio 2 reached the two-stage runs (bundle: 4)
    # The thresholds asked for plus the bundle's default (0.25: the test bundle states none).
    assert [r["threshold"] for r in data["rows"]] == [None, 0.0, 0.25, 0.5]
    assert data["rows"][1]["refined"] == 1.0 and data["rows"][1]["dice_vs_t0"] == 1.0
    assert all(r["gflop"] > 0 for r in data["rows"]) and "| full resolution |" in result.stdout
    # Refining fewer tiles never costs more model work than refining all of them (up to the rounding of
    # per-task sums: two thresholds that refine the same tiles may group them into tasks differently).
    gflop = [r["gflop"] for r in data["rows"]]
    assert gflop[3] <= gflop[2] * (1 + 1e-9) and gflop[2] <= gflop[1] * (1 + 1e-9)
    stages = data["breakdown"]["stages"]
    assert set(stages) == {"stage1", "stage2"} and stages["stage2"]["parts_s"]["model forward"] > 0
    assert 0 < data["breakdown"]["model_share_of_wall"] < 1
    from wsiseg.bundle import inspect_bundle
    from wsiseg.config import BundleSettings

    assert data["default_threshold"] == BundleSettings.from_config(inspect_bundle(test_bundle)["config"]).flow.selection.value


@runs_a_benchmark
def test_memory_and_scaling_studies_run_on_a_tiny_slide(tmp_path, test_bundle) -> None:
    slide = _tiny_slide(tmp_path)
    memory = _bench(tmp_path, "memory", str(slide), "--model", str(test_bundle), "--workers", "1")
    assert memory.returncode == 0, memory.stderr
    rows = json.loads((tmp_path / "results" / "memory-tiny.json").read_text())["rows"]
    assert rows[0]["peak_tree_rss_mb"] > 100 and 0 < rows[0]["peak_tree_pss_mb"] <= rows[0]["peak_tree_rss_mb"]
    scaling = _bench(tmp_path, "scaling", str(slide), "--model", str(test_bundle))
    assert scaling.returncode == 0, scaling.stderr
    rows = json.loads((tmp_path / "results" / "scaling-tiny.json").read_text())["rows"]
    assert [(r["workers"], r["cores"]) for r in rows] == [(1, 1), (2, 2), (1, 2)]
    assert len({r["gflop"] for r in rows}) == 1  # the same work, however it is spread


@runs_a_benchmark
def test_peer_study_runs_on_a_tiny_region(tmp_path, test_bundle) -> None:
    peer = _bench(tmp_path, "peer", str(_tiny_slide(tmp_path)), "--model", str(test_bundle), "--workers", "1",
                  "--region", "512")
    assert peer.returncode == 0, peer.stderr
    data = json.loads((tmp_path / "results" / "peer-tiny.json").read_text())
    assert data["rows"][0]["run"].startswith("MONAI") and 0.0 <= data["dice_monai_vs_wsiseg_full"] <= 1.0


@runs_a_benchmark
def test_dataset_via_segment_runs_on_a_fabricated_bowl_copy(tmp_path, test_bundle) -> None:
    from test_train import make_bowl

    make_bowl(tmp_path / "bowl", n=3)
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "dataset_via_segment.py"), "--data-root", str(tmp_path / "bowl"),
         "--model", str(test_bundle), "--split", "all", "--tile-size", "32"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "3 bowl all images, tile 32" in result.stdout and "mean Dice" in result.stdout


@runs_a_benchmark
def test_cohort_benchmark_runs_on_three_tiny_slides(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_cohort.py"), "--slides", "3", "--size", "256",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "cohort-resources.json").read_text())
    assert data["complete"] and [r["slides"] for r in data["rows"]] == [3]
    workers = data["rows"][0]["workers"]
    assert len(workers) == 2
    assert all(isinstance(w["fds"], int) and w["fds"] > 0 and w["rss_mb"] > 0 for w in workers.values())
    assert "| slides | s/slide |" in result.stdout and "bench_cohort.py --slides 3" in result.stdout


@runs_a_benchmark
def test_seam_study_matches_one_pass_once_the_halo_covers_the_receptive_field(tmp_path) -> None:
    import numpy as np

    from conftest import centred_model, structured_image, write_pyramid
    from wsiseg.bundle import save_bundle
    from wsiseg.tiling import downsample_mean

    image = structured_image(np.random.default_rng(5), 400, 448)
    slide = write_pyramid(tmp_path / "tiny.tif", image, tile=128, factors=(1, 2, 4))
    # resnet_lite U-Nets: no global pooling, so a wide enough halo makes tiles exact (a MobileNetV3's
    # squeeze-excitation pools the whole window, and no halo short of the image would).
    models = {
        "model1": centred_model("unet", "resnet_lite", downsample_mean(image, 4), 1),
        "model2": centred_model("unet", "resnet_lite", image, 2),
        "model": centred_model("unet", "resnet_lite", image, 3),
    }
    bundle = save_bundle(tmp_path / "lite.safetensors", models, {"ratio": 4, "halo": 32})
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "seam.py"), str(slide), "--model", str(bundle), "--region", "384",
         "--tile", "128", "--halos", "0", "48", "160", "--rf-size", "384", "--two-stage", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "out" / "seam.json").read_text())
    assert data["region"]["size"] == 384 and data["tile"] == 128 and "| 160 | yes |" in result.stdout
    assert len(data["studies"]) == 2
    for study in data["studies"].values():
        rows = {r["halo"]: r for r in study["rows"]}
        assert list(rows) == [0, 48, 160] and [r["aligned"] for r in rows.values()] == [True, False, True]
        assert rows[0]["max_prob_diff"] > 0.01 and rows[0]["band_max_prob_diff"] == rows[0]["max_prob_diff"]
        fields = study["receptive_field"]
        assert set(fields) == {"random", "tissue (region centre)"}
        for rf in fields.values():
            assert not rf["truncated"] and 0 < rf["r90"] <= rf["r99"] <= rf["r999"] <= rf["r100"]
            # One output pixel sees farther than the 32-pixel block needs outside itself, by at most the block.
            assert rf["block_r100"] <= rf["r100"] <= rf["block_r100"] + 32
        needed = max(rf["block_r100"] for rf in fields.values())
        assert 100 < needed <= 160  # five stride-2 stages and a decoder: about 155 pixels
        # A halo on the stride grid that covers the receptive field gives the one-pass result.
        assert rows[160]["differ_pixels"] == 0 and rows[160]["dice"] == 1.0 and rows[160]["max_prob_diff"] < 1e-5


@runs_a_benchmark
def test_wsi_peer_study_scores_monai_against_wsiseg_on_a_tiny_slide(tmp_path, test_bundle) -> None:
    """The whole-slide peer study: MONAI's patch inferer over every 576-pixel window (stride 512: 2 x 2 on
    704 x 640), with the same network as wsiseg's full-resolution run, so their masks agree."""
    peer = _bench(tmp_path, "wsi-peer", str(_tiny_slide(tmp_path)), "--model", str(test_bundle), "--workers", "1",
                  "--peers", "monai")
    assert peer.returncode == 0, peer.stderr
    data = json.loads((tmp_path / "results" / "wsi-peer-tiny.json").read_text())
    assert [r["run"].split()[0] for r in data["rows"]] == ["MONAI", "wsiseg", "wsiseg"]
    assert data["rows"][0]["patches"] == 4
    assert set(data["dice_peer_vs_wsiseg_full"]) == {"monai"} and data["dice_peer_vs_wsiseg_full"]["monai"] > 0.9
    missing = _bench(tmp_path, "wsi-peer", str(_tiny_slide(tmp_path)), "--model", str(test_bundle), "--peers", "tiatoolbox")
    assert missing.returncode != 0 and "--tiatoolbox-python" in missing.stderr


@runs_a_benchmark
def test_output_pixels_records_both_choices_on_a_tiny_slide(tmp_path, test_bundle) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "output_pixels.py"), str(_tiny_slide(tmp_path)), "--model", str(test_bundle),
         "--workers", "1", "--results", str(tmp_path / "results")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "results" / "output-pixels.json").read_text())
    assert data["command"].startswith("python benchmarks/output_pixels.py ")
    low, full = data["rows"]
    assert (low["pixels"], full["pixels"]) == ("low", "full") and full["pixels_shape_yx"] == [640, 704]
    assert 0 < low["pixel_bytes"] < full["pixel_bytes"] and "| tiny.tif (640 x 704) | full |" in result.stdout


@runs_a_benchmark
def test_he_proxy_figures_relate_a_mask_to_the_hematoxylin_density() -> None:
    import numpy as np

    he_proxy = load_script("he_proxy")

    density = np.tile(np.arange(100, dtype=float), (10, 1))  # (10, 100): columns 0..99, the darkest 10 % are 90..99
    tissue = np.ones((10, 100), bool)
    tissue[:, :20] = False  # tissue is columns 20..99; its darkest 10 % are columns 92..99
    mask = np.zeros((10, 100), bool)
    mask[:, 88:96] = True  # 8 columns marked, 4 of them (92..95) among the darkest
    figures = he_proxy.stain_figures(density, mask, tissue)
    assert figures["marked"] == pytest.approx(8 / 80)
    assert figures["h_marked"] == pytest.approx(91.5) and figures["h_unmarked"] == pytest.approx((sum(range(20, 100)) - 732) / 72)
    assert figures["darkest_marked"] == pytest.approx(4 / 8) and figures["marked_darkest"] == pytest.approx(4 / 8)


@runs_a_benchmark
def test_bowl_by_kind_weights_dice_and_agreement_by_image_count() -> None:
    bowl_by_kind = load_script("bowl_by_kind")

    def kind(images, base_dice, two_dice, agreement):
        return {"images": images, "rows": [
            {"method": "baseline", "threshold": None, "dice": base_dice, "refined": 100.0, "agreement": None},
            {"method": "two-stage", "threshold": 0.5, "dice": two_dice, "refined": 40.0, "agreement": agreement}]}

    per_kind = {"fluorescence": kind(3, 80.0, 90.0, 70.0), "color_brightfield": kind(1, 60.0, 50.0, 90.0)}
    every = bowl_by_kind._all_images(per_kind)
    assert every["images"] == 4
    assert every["rows"][0] == {"method": "baseline", "threshold": None, "dice": 75.0, "refined": 100.0, "agreement": None}
    assert every["rows"][1]["dice"] == 80.0 and every["rows"][1]["agreement"] == 75.0
    per_kind["fluorescence"]["per_image"] = {"a" * 12: [80.0, 95.0], "b" * 12: [80.0, 85.0], "c" * 12: [80.0, 90.0]}
    per_kind["color_brightfield"]["per_image"] = {"d" * 12: [60.0, 50.0]}
    results = {"command": "c", "machine": "m",
               "models": {"x": {"input": "rgb", "threshold": 0.5, "kinds": {"all": every, **per_kind}}}}
    lines = bowl_by_kind.table(results)
    assert "| x (rgb) | two-stage t=0.5 | 80.00 | 90.00 | 50.00 | 40.0 % |" in lines
    assert "| x (rgb) | two-stage t=0.5 | 75.00 | 70.00 | 90.00 |" in lines
    assert lines[-1] == ("- x: dddddddddd (color_brightfield) 50.0, bbbbbbbbbb (fluorescence) 85.0, "
                         "cccccccccc (fluorescence) 90.0, aaaaaaaaaa (fluorescence) 95.0")


@runs_a_benchmark
def test_agreement_by_scale_compares_the_three_paths_masks() -> None:
    import numpy as np

    from conftest import constant_model
    from wsiseg.bundle import Bundle

    by_scale = load_script("agreement_by_scale")

    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    assert by_scale.resample(image, 1.0) is image and by_scale.resample(image, 1.5).shape == (60, 90, 3)
    everything, nothing = constant_model(50.0), constant_model(-50.0)
    # Model 1 is sure of background everywhere, so nothing is refined at 0.5.
    bundle = Bundle({"model1": nothing, "model2": everything, "model": everything},
                    {"ratio": 2, "tile_size": 16, "halo": 8, "threshold": 0.5})
    figures = by_scale.agreement(by_scale.resample(image, 1.5), bundle, ratio=4)
    assert figures == {"refined": 0.0, "marked_two_stage": 0.0, "marked_model2_everywhere": 1.0, "marked_full": 1.0,
                       "two_stage_vs_full": 0.0, "model2_everywhere_vs_full": 1.0, "two_stage_vs_model2_everywhere": 0.0}
    results = {"command": "c", "machine": "m", "mpp": [0.5, 0.5], "rows": [{"scale": 2.0, "ratio": 4, **figures}]}
    assert by_scale.table(results)[-1] == "| 2 | 0.250 | 4 | 0.0 % | 0.0 % / 100.0 % / 100.0 % | 0.000 | 1.000 | 0.000 |"


@runs_a_benchmark
def test_pixel_size_study_scores_each_scan_and_work_pixel_size(tmp_path) -> None:
    from conftest import constant_model
    from test_datasets import make_release
    from wsiseg.bundle import save_bundle

    make_release(tmp_path / "r", per_organ=2)
    everything, nothing = constant_model(50.0), constant_model(-50.0)
    bundle = save_bundle(tmp_path / "b.safetensors", {"model1": nothing, "model2": everything, "model": everything},
                         {"ratio": 2, "tile_size": 16, "halo": 8, "threshold": 0.5, "mpp": 0.3, "mpp_range": [0.2, 0.5],
                          "training": {"split_seed": 0}})
    command = [sys.executable, str(ROOT / "benchmarks" / "pixel_size.py"), "--model", str(bundle), "--data-root",
               str(tmp_path / "r"), "--scan", "0.2", "--scan", "0.5", "--work", "0.5=0.25", "--results", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "pixel_size.json").read_text())["rows"]
    assert [(r["scan_mpp"], r["work_mpp"], r["method"]) for r in rows] == [
        (0.2, "rule", "baseline"), (0.2, "rule", "two-stage"), (0.5, "rule", "baseline"), (0.5, "rule", "two-stage"),
        (0.5, 0.25, "baseline"), (0.5, 0.25, "two-stage")]
    # Model 1 marks nothing and refines nothing at 0.5: no nucleus found, whatever the pixel size.
    assert all(r["dice"] == 0.0 and r["pq"] == 0.0 and r["refined"] == 0.0 for r in rows if r["method"] == "two-stage")
    # Everything marked: the Dice of an all-foreground mask does not depend on the pixel size.
    assert len({round(r["dice"], 9) for r in rows if r["method"] == "baseline"}) == 1
    assert (tmp_path / "pixel_size.md").read_text().count("\n| 0.5 |") == 4


def test_geojson_tracer_benchmark_finds_the_library_polygons_exact_or_not() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "geojson_tracer.py"), "--size", "256",
                             "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {cells[1].strip(): cells[2:-1] for cells in (line.split("|") for line in result.stdout.splitlines()
                                                         if line.startswith("| ") and "---" not in line)}
    assert set(rows) == {"method", "wsiseg", "shapely runs, union_all", "shapely pixels, coverage_union_all",
                         "skimage contours"}
    differing = {name: float(cells[4]) for name, cells in rows.items() if name != "method"}
    assert differing["wsiseg"] == differing["shapely runs, union_all"] == 0.0
    assert differing["shapely pixels, coverage_union_all"] == 0.0 and differing["skimage contours"] > 0


def test_refinement_curves_follow_each_order_and_the_oracle_leads() -> None:
    """Four one-tile images whose refinement gains are known: the orders refine them in the right sequence."""
    import numpy as np

    from wsiseg.tiling import TileGrid

    ceiling = load_script("refine_ceiling")
    gains = [0.4, -0.2, 0.1, 0.0]  # Dice (and PQ) of each image rises by this when refined, from 0.5
    scores = [0.1, 0.9, 0.5, 0.3]  # the gate's: it refines image 1 (a loss) first
    images, tiles = [], []
    for index, (gain, score) in enumerate(zip(gains, scores)):
        def score_of(labels, gain=gain):
            value = 0.5 + gain * float(labels.mean())  # labels: 0 as Model 1 alone, 1 as Model 2
            return value, value, np.array([[1, 0], [0, 1]])

        images.append({"alone": np.zeros((4, 4), np.uint8), "everywhere": np.ones((4, 4), np.uint8),
                       "grid": TileGrid(4, 4, 4), "score": score_of, "tiles": [index]})
        tiles.append({"image": index, "tile": (0, 0), "on_tissue": True, "score": score,
                      "candidates": {name: -score for name in ceiling.CANDIDATES},  # the gate's order reversed
                      "dice_gain": gain, "pq_gain": gain})
    result = ceiling.curves(images, tiles)
    at = {name: {row["fraction"]: round(row["dice"], 6) for row in rows} for name, rows in result.items()}
    assert at["oracle-dice"][0.25] == 0.6 and at["oracle-dice"][0.5] == 0.625  # images 0, then 2
    assert at["gate"][0.25] == 0.45 and at["gate"][0.5] == 0.475  # images 1, then 2
    assert at["gate"][0.0] == at["oracle-pq"][0.0] == 0.5 and at["gate"][1.0] == at["random"][1.0] == 0.575
    assert ceiling.captured(result["oracle-dice"], "dice", 0.25) == pytest.approx(0.1 / 0.075)
    assert ceiling.captured(result["gate"], "dice", 0.25) == pytest.approx(-0.05 / 0.075)
    assert at["gate-per-nucleus"][0.25] == 0.6 and at["gate-split"][0.5] == 0.6  # images 0, then 3


def test_candidate_gate_scores_of_a_known_tile() -> None:
    """Model 1's probabilities over one tile: per-nucleus entropy, foreground, and the split among nucleus classes."""
    import numpy as np

    from wsiseg.tiling import Box

    ceiling = load_script("refine_ceiling")
    probabilities = np.zeros((4, 2, 4), np.float32)  # background, rim, middle, core over a 2 x 4 map
    probabilities[0, :, :2] = 1.0  # left half: sure background
    probabilities[1:, :, 2:] = 1 / 3  # right half: nucleus, unsure which class
    scores = ceiling.candidate_scores(probabilities, Box(0, 8, 0, 16), (8, 16))
    entropy_right = np.log(3) / np.log(4)  # normalised entropy of (0, 1/3, 1/3, 1/3)
    assert scores["foreground"] == pytest.approx(0.5)
    assert scores["per-nucleus"] == pytest.approx(entropy_right / 2 / 0.5, rel=1e-5)
    assert scores["split"] == pytest.approx(1.0, rel=1e-5)  # all nucleus pixels split evenly among 3 classes
    left = ceiling.candidate_scores(probabilities, Box(0, 8, 0, 8), (8, 16))
    assert left == {"per-nucleus": 0.0, "foreground": 0.0, "split": 0.0}


def test_stain_renderings_and_organ_names() -> None:
    import numpy as np

    stains = load_script("stain_robustness")
    image = np.array([[[0, 64, 255]]], np.uint8)
    np.testing.assert_array_equal(stains.paler(image), [[[0, 111, 255]]])  # 255 * (64 / 255) ** 0.6 = 111.3
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    normalised = stains.normalised(ramp)
    assert normalised.min() == 0 and normalised.max() == 255  # stretched from the 1st to the 99th percentile
    assert normalised[8, 0, 0] == round(255 * ((128 - 2.55) / (252.45 - 2.55)) ** 1.6)
    assert load_script("object_counts").organ("mouse_muscle_tibia_04") == "mouse_muscle_tibia"
