"""The command line: help, info, segment end to end, and one clear line for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from wsiseg.cli import main
from wsiseg.run.report import read_report


def test_help_lists_commands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("segment", "train", "evaluate", "info", "models"):
        assert command in result.output
    seg = CliRunner().invoke(main, ["segment", "--help"])
    for option in ("--threshold", "--top", "--budget", "--full-resolution", "--scheduler", "--workers", "--resume", "--geojson"):
        assert option in seg.output


def test_models_lists_registry() -> None:
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0
    assert "deeplabv3, fcn, ifbfnet, segnet, unet" in result.output
    assert "mobilenet_v3_large" in result.output and "resnet_lite" in result.output


@pytest.mark.subprocess
def test_console_script_help_does_not_import_torch() -> None:
    code = "import sys; from wsiseg.cli import main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_info_prints_levels_and_pixel_size(pyramid_slide) -> None:
    result = CliRunner().invoke(main, ["info", str(pyramid_slide)])
    assert result.exit_code == 0
    assert "format:    tiff (read with tifffile)" in result.output
    assert "size:      1000 x 768 pixels" in result.output
    assert "mpp:       0.5 x 0.5 um/pixel" in result.output
    assert "1: 500 x 384, downsample 2, tiles 128 x 128" in result.output


def test_info_describes_the_shipped_model_from_its_header() -> None:
    result = CliRunner().invoke(main, ["info", "default"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].endswith("default.safetensors (wsiseg bundle: Model 1 unet/resnet_lite, Model 2 unet/resnet_lite)")
    assert lines[1] == ("trained:   NuInsSeg: 532 H&E images of 31 human and mouse organs, every nucleus "
                        "outlined by hand (CC BY 4.0)")
    assert lines[2].startswith("cite:      A. Mahbod et al.") and lines[2].endswith("doi:10.1038/s41597-024-03117-2")
    assert lines[3] == "pixels:    0.316 um per pixel, trained across 0.2-0.499 um"
    assert lines[4] == ("classes:   background, nucleus rim, nucleus middle, nucleus core (instance output 'distance': "
                        "--objects splits touching nuclei at it)")
    assert lines[5].startswith("flow:      Model 1 at 1/4 resolution, entropy threshold 0.1 ")
    assert lines[6] == ("scores:    two-stage t=0.1, 82.7 % of tiles refined: Dice 76.19 % (pooled 81.09 %), "
                        "PQ 0.430, AJI 0.475 on 133 nuinsseg test images")
    assert lines[7] == ("scores:    full resolution (Model 2 everywhere): Dice 76.52 % (pooled 81.18 %), "
                        "PQ 0.435, AJI 0.484 on 133 nuinsseg test images")
    assert lines[8].startswith("domain:    bright backgrounds; 99 % of tile scores <= 0.5735; ")


def test_info_on_a_missing_bundle_is_one_line(tmp_path) -> None:
    result = CliRunner().invoke(main, ["info", str(tmp_path / "absent.safetensors")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"Error: model bundle {str(tmp_path / 'absent.safetensors')!r} does not exist; "
        "give the path of a .safetensors bundle"]


@pytest.mark.subprocess
def test_segment_end_to_end_through_the_console_script(tmp_path, pyramid_slide, test_bundle) -> None:
    out = tmp_path / "run.zarr"
    command = [sys.executable, "-m", "wsiseg.cli", "segment", str(pyramid_slide), "--model", str(test_bundle),
               "--out", str(out), "--workers", "1", "--tile-size", "256", "--budget", "0.25", "--geojson"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"{out}: 3 of 12 tiles refined (25.0 %)" in result.stdout
    report = read_report(out)
    assert report.tiles.refined == 3 and report.settings["selection"] == "budget 0.25"
    assert report.outputs["geojson"] == "mask.geojson"
    mask = zarr.open_array(str(out / "labels/mask/0"), mode="r")
    assert mask.shape == (768, 1000) and mask.chunks == (256, 256)
    assert json.loads((out / "mask.geojson").read_text())["type"] == "FeatureCollection"
    # A second run into the same output is refused; --overwrite replaces it.
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "already exists; use --overwrite" in again.stderr


def _bad_inputs(tmp_path, pyramid_slide) -> dict[str, object]:
    (tmp_path / "empty.svs").write_bytes(b"")
    (tmp_path / "random.svs").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)))
    raw = pyramid_slide.read_bytes()
    (tmp_path / "truncated.tif").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / "folder").mkdir()
    return {
        "missing": (tmp_path / "missing.svs", "no such file"),
        "empty": (tmp_path / "empty.svs", "is empty"),
        "random": (tmp_path / "random.svs", "unsupported or unrecognised file format"),
        "truncated": (tmp_path / "truncated.tif", "truncated"),
        "unsupported": (tmp_path / "notes.txt", "unsupported or unrecognised file format"),
        "folder": (tmp_path / "folder", "no slides found in"),  # a folder of slides, here none
    }


@pytest.mark.parametrize("kind", ["missing", "empty", "random", "truncated", "unsupported", "folder"])
def test_bad_slides_exit_2_with_one_line_and_no_output(tmp_path, pyramid_slide, test_bundle, kind) -> None:
    path, message = _bad_inputs(tmp_path, pyramid_slide)[kind]
    out = tmp_path / "out.zarr"
    result = CliRunner().invoke(main, ["segment", str(path), "--model", str(test_bundle), "--out", str(out)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert not out.exists()


def test_bad_options_and_models_exit_2(tmp_path, pyramid_slide, test_bundle) -> None:
    runner = CliRunner()
    cases = [
        (["--model", str(tmp_path / "none.safetensors")], "does not exist"),
        (["--model", str(pyramid_slide)], None),  # not a bundle: refused when loading
        (["--threshold", "0.3", "--top", "4"], "only one of --threshold, --top and --budget"),
        (["--budget", "2"], "budget must be a fraction"),
        (["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "either --scheduler or --workers"),
    ]
    for extra, message in cases:
        result = runner.invoke(main, ["segment", str(pyramid_slide), "--out", str(tmp_path / "o.zarr"), *extra])
        assert result.exit_code == 2, (extra, result.output)
        line = result.stderr.strip().splitlines()
        assert len(line) == 1 and line[0].startswith("Error: ")
        if message:
            assert message in line[0]
    occupied = tmp_path / "occupied.zarr"
    occupied.mkdir()
    result = runner.invoke(main, ["segment", str(pyramid_slide), "--model", str(test_bundle), "--out", str(occupied)])
    assert result.exit_code == 2 and "already exists" in result.stderr


@pytest.mark.slow  # waits for the connection to time out
def test_unreachable_scheduler_is_one_line(pyramid_slide, test_bundle, tmp_path) -> None:
    result = CliRunner().invoke(main, ["segment", str(pyramid_slide), "--model", str(test_bundle),
                                       "--out", str(tmp_path / "o.zarr"), "--scheduler", "tcp://127.0.0.1:9"])
    assert result.exit_code == 2 and "cannot reach a Dask scheduler at tcp://127.0.0.1:9" in result.stderr
    assert not (tmp_path / "o.zarr").exists()


# --------------------------------------------------------------------------- Ctrl-C and progress


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["segment", "train", "evaluate"])
def test_ctrl_c_says_how_to_continue_this_command(tmp_path, monkeypatch, command) -> None:
    """Exit status 130 and one line: --resume for segment, the checkpoint for train (which has no --resume)."""
    import wsiseg.evaluate
    import wsiseg.run.job
    import wsiseg.train.fit

    monkeypatch.setattr(wsiseg.run.job, "prepare_run", _interrupt)
    monkeypatch.setattr(wsiseg.train.fit, "train", _interrupt)
    monkeypatch.setattr(wsiseg.evaluate, "evaluate_bundle", _interrupt)
    slide, bundle = tmp_path / "slide.tif", tmp_path / "model.safetensors"
    slide.write_bytes(b"")
    args, message = {
        "segment": (["segment", str(slide), "--quiet"],
                    "Interrupted; run the same command with --resume to continue."),
        "train": (["train", "--dataset", "ph2", "--data-root", str(tmp_path), "--out", str(bundle)],
                  f"Interrupted; run the same command again to continue from its checkpoint ({bundle}.ckpt)."),
        "evaluate": (["evaluate", str(bundle), "--dataset", "ph2", "--data-root", str(tmp_path)], "Interrupted."),
    }[command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130
    assert result.stderr == message + "\n"


def test_evaluate_without_a_terminal_prints_progress_lines_only(tmp_path, monkeypatch) -> None:
    """No stray label line: ten progress lines, then the table on stdout."""
    import wsiseg.evaluate

    def fake_evaluate(*args, progress, pixel_sizes, tissue):
        assert pixel_sizes == wsiseg.evaluate.PixelSizes() and tissue
        for done in range(21):
            progress(done, 20)
        names = {"csv": "evaluation.csv", "json": "evaluation.json", "plot": "speed_vs_dice.png"}
        (tmp_path / "evaluation.json").write_text('{"setting": "as wsiseg segment runs: ..."}')
        return [], {key: tmp_path / name for key, name in names.items()}

    monkeypatch.setattr(wsiseg.evaluate, "evaluate_bundle", fake_evaluate)
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "m.safetensors"), "--dataset", "ph2",
                                       "--data-root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert [line.split()[1] for line in lines] == [f"{2 * i}/20" for i in range(1, 11)]
    assert all(line.startswith("images        ") for line in lines)
    assert lines[-1].endswith("(100 %) 00:00 elapsed")
    assert result.stdout.splitlines()[0] == "scored as wsiseg segment runs: ..., tissue mask on"


def test_train_options_are_the_train_configs_fields_with_its_defaults() -> None:
    """Each TrainConfig field is one `wsiseg train` option whose default is the field's (stated once)."""
    from wsiseg.cli import train
    from wsiseg.train.config import train_defaults

    defaults = train_defaults()
    options = {param.name: param for param in train.params}
    assert set(defaults) <= set(options), set(defaults) - set(options)
    for name, default in defaults.items():
        given = options[name].default
        assert (tuple(given) if options[name].multiple else given) == default, name
