"""Cohorts: slides found in folders and lists, distinct outputs, skip / resume, manifest.csv, failures.

The runs go to a real `dask scheduler` and two worker processes (``real_cluster``).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from conftest import structured_image, write_pyramid
from wsiseg.cli import main
from wsiseg.config import RunOptions, TwoStageConfig
from wsiseg.errors import InputError
from wsiseg.run import segment_slide
from wsiseg.run.cohort import MANIFEST_FIELDS, segment_cohort
from wsiseg.run.inputs import find_slides, is_cohort, plan_outputs
from wsiseg.uncertainty import TileSelection
from wsiseg.run.report import RunReport, TileCounts, read_report

CONFIG = TwoStageConfig(selection=TileSelection.budget(0.5), tile_size=128)


def _slide(path: Path, seed: int) -> Path:
    """A 256 x 320 pyramid (downsamples 1, 2, 4) of 64-pixel tiles: 6 tiles of 128."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_pyramid(path, structured_image(np.random.default_rng(seed), 256, 320), tile=64, factors=(1, 2, 4))


def _broken(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"II*\x00garbage")
    return path


def _mask(out: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(str(out / "labels" / "mask" / "0"), mode="r")[...])


def _report(out: Path) -> RunReport:
    return read_report(out)


def _manifest(out_dir: Path) -> list[dict[str, str]]:
    with open(out_dir / "manifest.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == MANIFEST_FIELDS
        return list(reader)


# --------------------------------------------------------------------------- finding and naming (no cluster)


def test_folders_are_searched_by_suffix_not_recursively_and_lists_are_read(tmp_path) -> None:
    folder = tmp_path / "slides"
    for name in ("s.tif", "S2.SVS", ".s.tif", "notes.txt", "level.dcm", "sub/deep.tif"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    (folder / "image.zarr").mkdir()
    listing = tmp_path / "lists" / "cohort.txt"
    listing.parent.mkdir()
    listing.write_text(f"# extra slides\n\n  ../elsewhere/a.svs  \n{folder / 's.tif'}\n# {folder / 'gone.tif'}\n")
    slides = find_slides([folder], listing)
    assert slides == [folder / "S2.SVS", folder / "s.tif", listing.parent / "../elsewhere/a.svs"]
    with pytest.raises(InputError, match="cannot read the slide list"):
        find_slides([], tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no slides found in .*empty"):
        find_slides([tmp_path / "empty"])


def test_cohort_mode_for_folders_lists_and_several_slides(tmp_path) -> None:
    slide, zarr_slide = tmp_path / "s.tif", tmp_path / "z.zarr"
    zarr_slide.mkdir()
    assert not is_cohort([slide]) and not is_cohort([zarr_slide])
    assert is_cohort([tmp_path]) and is_cohort([slide, slide]) and is_cohort([], tmp_path / "list.txt")


def test_same_stems_get_their_folders_then_their_suffixes(tmp_path) -> None:
    def names(*paths: str) -> list[str]:
        return [p.name for p in plan_outputs([tmp_path / p for p in paths], tmp_path / "out")]

    assert names("a/slide.jpg", "b/slide.png", "c/other.svs") == ["a_slide.zarr", "b_slide.zarr", "other.zarr"]
    assert names("x/scans/s.tif", "y/scans/s.tif") == ["x_scans_s.zarr", "y_scans_s.zarr"]
    assert names("a/s.tif", "a/s.png") == ["s_tif.zarr", "s_png.zarr"]
    assert names("a/s.tif", "a/s.png", "b/s.tif") == ["a_s_tif.zarr", "a_s_png.zarr", "b_s_tif.zarr"]
    assert names("a/S.ome.tif", "b/s.png") == ["a_S.zarr", "b_s.zarr"]  # one name on case-insensitive disks
    with pytest.raises(InputError, match=r"a/s.tif and .*a_s.tif would both be written to a_s.zarr"):
        names("a/s.tif", "b/s.tif", "a_s.tif")


def test_colliding_names_stop_the_cli_before_anything_runs(tmp_path, test_bundle) -> None:
    out = tmp_path / "out"
    args = ["segment", str(tmp_path / "a/s.tif"), str(tmp_path / "b/s.tif"), str(tmp_path / "a_s.tif"),
            "--out", str(out), "--model", str(test_bundle), "--scheduler", "tcp://127.0.0.1:9"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "would both be written to a_s.zarr" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_an_output_of_another_slide_is_neither_skipped_nor_resumed(tmp_path) -> None:
    out = tmp_path / "out"
    (out / "s.zarr").mkdir(parents=True)
    (out / "s.zarr" / "report.json").write_text(json.dumps({"status": "complete", "input": {"path": "/x/s.tif"}}))
    rows = segment_cohort([tmp_path / "s.tif"], out, client=None, config=CONFIG)
    assert rows[0]["status"] == "failed" and "holds the output of another slide (/x/s.tif)" in rows[0]["error"]
    assert _manifest(out)[0]["status"] == "failed"


# --------------------------------------------------------------------------- on a real cluster


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, test_bundle, real_cluster):
    """A folder (two slides, a corrupt one, a text file) and a list naming a slide of another
    folder with the same stem, segmented once, two slides in flight."""
    client, _ = real_cluster
    root = tmp_path_factory.mktemp("cohort")
    folder = root / "slides"
    _slide(folder / "s0.tif", 0)
    _slide(folder / "s1.tif", 1)
    _broken(folder / "broken.tif")
    (folder / "notes.txt").write_text("not a slide")
    _slide(root / "other" / "s0.tif", 2)
    listing = root / "lists" / "cohort.txt"
    listing.parent.mkdir()
    listing.write_text("# the same stem as slides/s0.tif\n\n../other/s0.tif\n")
    slides = find_slides([folder], listing)
    options = RunOptions(model=str(test_bundle))
    out = root / "out"
    rows = segment_cohort(slides, out, client, CONFIG, options, parallel=2)
    return SimpleNamespace(client=client, root=root, slides=slides, options=options, out=out, rows=rows)


def test_cohort_outputs_manifest_and_masks(cohort) -> None:
    rows, out = cohort.rows, cohort.out
    assert [Path(r["slide"]).parent.name + "/" + Path(r["slide"]).name for r in rows] == [
        "slides/broken.tif", "slides/s0.tif", "slides/s1.tif", "other/s0.tif"]
    assert [Path(r["output"]).name for r in rows] == ["broken.zarr", "slides_s0.zarr", "s1.zarr", "other_s0.zarr"]
    assert [r["status"] for r in rows] == ["failed", "done", "done", "done"]
    error = rows[0]["error"]
    assert "broken.tif" in error and "\n" not in error and "Traceback" not in error
    assert rows[0]["tiles_total"] == "" and not (out / "broken.zarr").exists()
    assert all(r["tiles_total"] == 6 and r["tiles_refined"] == 3 and r["seconds"] > 0 and r["error"] == ""
               for r in rows[1:])
    assert _manifest(out) == [{k: str(v) for k, v in r.items()} for r in rows]

    # Each done slide's mask is what a single-slide run of it gives; the two s0 slides kept their own.
    for row in rows[1:4:2]:
        single = cohort.root / "single" / Path(row["output"]).name
        segment_slide(row["slide"], single, cohort.client, CONFIG, cohort.options)
        assert np.array_equal(_mask(Path(row["output"])), _mask(single))
        assert _report(Path(row["output"])).input.path == str(Path(row["slide"]).resolve())
    assert not np.array_equal(_mask(out / "slides_s0.zarr"), _mask(out / "other_s0.zarr"))


def test_running_again_skips_finished_and_resumes_interrupted(cohort) -> None:
    out, client = cohort.out, cohort.client
    before = {name: _mask(out / name) for name in ("s1.zarr", "other_s0.zarr")}
    # s1: interrupted (Ctrl-C) in stage 2 of a fresh run; other_s0: finished, then its report lost.
    shutil.rmtree(out / "s1.zarr")

    def interrupt(slide: Path, stage: str, done: int, total: int) -> None:
        if stage == "stage2":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        segment_cohort([cohort.slides[2]], out, client, CONFIG, cohort.options, progress=interrupt)
    assert (out / "s1.zarr" / ".wsiseg" / "run.json").is_file() and not (out / "s1.zarr" / "report.json").exists()
    (out / "other_s0.zarr" / "report.json").unlink()

    rows = segment_cohort(cohort.slides, out, client, CONFIG, cohort.options, parallel=2)
    assert [r["status"] for r in rows] == ["failed", "skipped", "resumed", "resumed"]
    assert rows[1]["tiles_refined"] == 3 and rows[1]["seconds"] == ""
    assert [m["status"] for m in _manifest(out)] == ["failed", "skipped", "resumed", "resumed"]
    for name in ("s1.zarr", "other_s0.zarr"):
        report = _report(out / name)
        assert report.status == "complete" and report.tiles.resumed >= 1
        assert np.array_equal(_mask(out / name), before[name])
    assert _report(out / "other_s0.zarr").tiles.resumed == 6


def test_same_stem_in_the_same_folder_structure_never_shares_an_output(cohort) -> None:
    slides = [_slide(cohort.root / "x" / "scans" / "s.tif", 3), _slide(cohort.root / "y" / "scans" / "s.tif", 4)]
    out = cohort.root / "same-structure"
    rows = segment_cohort(slides, out, cohort.client, CONFIG, cohort.options, parallel=2)
    assert [r["status"] for r in rows] == ["done", "done"]
    assert [Path(r["output"]).name for r in rows] == ["x_scans_s.zarr", "y_scans_s.zarr"]
    for slide, row in zip(slides, rows):
        assert _report(Path(row["output"])).input.path == str(slide.resolve())
    assert not np.array_equal(_mask(out / "x_scans_s.zarr"), _mask(out / "y_scans_s.zarr"))


def test_console_script_on_a_folder_exits_1_when_a_slide_failed(tmp_path, test_bundle, real_cluster) -> None:
    client, _ = real_cluster
    folder, out = tmp_path / "folder", tmp_path / "masks"
    _slide(folder / "good.tif", 5)
    _broken(folder / "broken.tif")
    command = [sys.executable, "-m", "wsiseg.cli", "segment", str(folder), "--out", str(out), "--model",
               str(test_bundle), "--scheduler", client.scheduler.address, "--parallel", "2",
               "--tile-size", "128", "--budget", "0.5"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert [(m["slide"], m["status"]) for m in _manifest(out)] == [
        (str(folder / "broken.tif"), "failed"), (str(folder / "good.tif"), "done")]
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == f"2 slides: 1 done, 0 resumed, 0 skipped, 1 failed; manifest {out / 'manifest.csv'}"
    assert any(line.startswith("failed   ") and "broken.tif" in line for line in lines)
    assert _report(out / "good.zarr").tiles == TileCounts(total=6, refined=3, refined_fraction=0.5, resumed=0)


def test_small_images_run_in_this_process_unless_a_cluster_is_asked_for() -> None:
    from types import SimpleNamespace

    from wsiseg.run.cohort import INLINE_MAX_PIXELS, runs_inline
    from wsiseg.run.job import SegmentRun

    def run(*pixels):
        return SegmentRun(tuple(SimpleNamespace(slide=object(), working_pixels=n) for n in pixels))

    small, large = INLINE_MAX_PIXELS, INLINE_MAX_PIXELS + 1
    assert runs_inline(run(small, 512 * 512)) and not runs_inline(run(small, large))
    assert not runs_inline(run(small), workers=2) and not runs_inline(run(small), scheduler="tcp://h:8786")
    assert runs_inline(run(large), workers=0)  # --workers 0: in this process, whatever the size
    assert runs_inline(SegmentRun((SimpleNamespace(slide=None, working_pixels=0),)))  # a failed job needs nothing
