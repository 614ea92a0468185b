"""Data safety of whole runs: bad outputs through the console script, the run lock,
a disk that fills up mid-run (then --resume), and the slide's warnings on the terminal."""

from __future__ import annotations

import errno
import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from wsiseg.config import RunOptions, TwoStageConfig
from wsiseg.errors import DiskFullError, OutputBusyError
from wsiseg.guard import OutputLock, lock_path
from wsiseg.run import segment_slide
from wsiseg.tiling import downsample_mean
from wsiseg.uncertainty import TileSelection
from wsiseg.run.report import read_report

CONFIG = TwoStageConfig(ratio=4, selection=TileSelection.budget(0.25), tile_size=256, halo=32,
                        stage1_block=64, stage1_halo=32)


def _run(slide, out, client, bundle, **options):
    """``segment_slide`` with the test geometry; ``options`` are RunOptions fields."""
    return segment_slide(slide, out, client, CONFIG, RunOptions(model=str(bundle), **options))


def _cli(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wsiseg.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def _mask_levels(out: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(out / "labels" / "mask"), mode="r")
    return {name: np.asarray(group[name][...]) for name in sorted(group.array_keys())}


def _wait_until_idle(client, timeout: float = 60) -> None:
    """Tasks of a failed run that were already running end (they may still write)."""
    deadline = time.monotonic() + timeout
    while any(client.processing().values()):
        assert time.monotonic() < deadline, "the cluster stayed busy"
        time.sleep(0.1)


def _ome_zarr_slide(path: Path, image: np.ndarray) -> Path:
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.create_array("0", data=np.moveaxis(image, 2, 0), chunks=(3, 256, 256))
    root.create_array("1", data=np.moveaxis(downsample_mean(image, 2), 2, 0), chunks=(3, 256, 256))
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    datasets = [{"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [1, 2**i, 2**i]}]}
                for i in range(2)]
    root.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets}]
    return path


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- bad --out, through the console script


@pytest.mark.slow
@pytest.mark.subprocess
def test_out_that_is_a_regular_file_is_refused_and_kept(tmp_path, pyramid_slide, test_bundle) -> None:
    afile = tmp_path / "afile.txt"
    afile.write_text("precious notes\n")
    result = _cli("segment", pyramid_slide, "--out", afile, "--overwrite", "--model", test_bundle, "--workers", "1")
    line = _one_error_line(result)
    assert f"--out {afile} exists and is not a folder" in line
    assert afile.read_text() == "precious notes\n"
    assert not lock_path(afile).exists()


@pytest.mark.slow
@pytest.mark.subprocess
def test_out_equal_to_the_slide_or_inside_an_input_zarr_is_refused(tmp_path, pyramid_slide, slide_image,
                                                                    test_bundle) -> None:
    slide = tmp_path / "slide.tif"
    slide.write_bytes(pyramid_slide.read_bytes())
    before = _sha256(slide)
    result = _cli("segment", slide, "--out", slide, "--overwrite", "--model", test_bundle, "--workers", "1")
    assert f"--out {slide} is the input {slide}" in _one_error_line(result)
    assert _sha256(slide) == before

    image = _ome_zarr_slide(tmp_path / "image.zarr", slide_image)
    files = _snapshot(image)
    inside = image / "mask.zarr"
    result = _cli("segment", image, "--out", inside, "--overwrite", "--model", test_bundle, "--workers", "1")
    assert f"--out {inside} lies inside the input {image}" in _one_error_line(result)
    assert not inside.exists() and _snapshot(image) == files


# --------------------------------------------------------------------------- the run lock


def test_a_held_lock_refuses_a_second_run_and_a_stale_one_does_not(tmp_path, pyramid_slide, test_bundle,
                                                                   local_client) -> None:
    out = tmp_path / "run.zarr"
    with OutputLock(out) as held:  # another run (this live process) writes the output
        with pytest.raises(OutputBusyError) as busy:
            _run(pyramid_slide, out, local_client, test_bundle)
        assert str(held.path) in str(busy.value) and "being written by another run" in str(busy.value)
        assert "\n" not in str(busy.value)
        assert not out.exists() and held.path.is_file()
    assert not held.path.exists()
    report = _run(pyramid_slide, out, local_client, test_bundle)
    assert report.status == "complete" and (out / "report.json").is_file()
    assert not lock_path(out).exists()

    # A lock left by a process of this host that has ended does not block a run.
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    stale = json.dumps({"pid": int(ended.stdout), "host": socket.gethostname(), "started": "2000-01-01T00:00:00"})
    lock_path(out).write_text(stale)
    again = _run(pyramid_slide, out, local_client, test_bundle, resume=True)  # finished: nothing left to do
    assert again == report
    assert not lock_path(out).exists()


# --------------------------------------------------------------------------- a full disk, then --resume


class _FillingArray:
    """A zarr array whose writes fail with ENOSPC once ``state["left"]`` writes are used up."""

    def __init__(self, array, state: dict, lock: threading.Lock) -> None:
        self._array, self._state, self._lock = array, state, lock

    def __setitem__(self, key, value) -> None:
        with self._lock:
            self._state["writes"] += 1
            full = self._state["writes"] > self._state["left"]
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._array[key] = value

    def __getitem__(self, key):
        return self._array[key]

    def __getattr__(self, name):
        return getattr(self._array, name)


def test_disk_full_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, pyramid_slide, test_bundle,
                                                                   local_client, monkeypatch) -> None:
    import wsiseg.run.slides as slides

    reference = tmp_path / "reference.zarr"
    _run(pyramid_slide, reference, local_client, test_bundle)

    out = tmp_path / "full.zarr"
    state, lock = {"writes": 0, "left": 3}, threading.Lock()
    real_open_array = slides.open_array

    def filling_open_array(where, name):
        array = real_open_array(where, name)
        return _FillingArray(array, state, lock) if name == "labels/mask/0" and str(where) == str(out) else array

    monkeypatch.setattr(slides, "open_array", filling_open_array)
    with pytest.raises(DiskFullError) as full:
        _run(pyramid_slide, out, local_client, test_bundle)
    message = str(full.value)
    assert "\n" not in message and "no space left" in message and str(out) in message and "--resume" in message
    assert state["writes"] > state["left"]  # the disk did fill up mid-run
    _wait_until_idle(local_client)
    assert not (out / "report.json").exists() and not (out / "report.json.partial").exists()
    assert "multiscales" not in zarr.open_group(str(out), mode="r").attrs
    assert not lock_path(out).exists()

    monkeypatch.setattr(slides, "open_array", real_open_array)  # space freed
    report = _run(pyramid_slide, out, local_client, test_bundle, resume=True)
    assert report.status == "complete"
    assert read_report(out).status == "complete"
    expected, got = _mask_levels(reference), _mask_levels(out)
    assert sorted(got) == sorted(expected) and len(got) > 1
    for level in expected:
        assert np.array_equal(got[level], expected[level]), level
    assert "multiscales" in zarr.open_group(str(out), mode="r").attrs


# --------------------------------------------------------------------------- the slide's warnings


def _truncated_copy(source: Path, target: Path) -> Path:
    """``source`` cut inside its last level's tile data: that level is dropped with one warning."""
    with tifffile.TiffFile(source) as tiff:
        cut = int(tiff.pages[-1].dataoffsets[-1]) + 1
    target.write_bytes(source.read_bytes()[:cut])
    return target


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_prints_each_slide_warning_as_one_line(tmp_path, pyramid_slide, test_bundle) -> None:
    slide = _truncated_copy(pyramid_slide, tmp_path / "cut.tif")
    out = tmp_path / "cut.zarr"
    result = _cli("segment", slide, "--model", test_bundle, "--out", out, "--workers", "1", "--tile-size", "256",
                  "--budget", "0.25", "--quiet")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith("Warning: level 2 of ") and "cut.tif is truncated" in warnings[0]
    assert warnings[0].endswith("; using levels 0-1 only")
    assert "Traceback" not in result.stderr
    report = read_report(out)
    assert report.input.warnings == [warnings[0].removeprefix("Warning: ")]
    assert zarr.open_array(str(out / "labels/mask/0"), mode="r").shape == (768, 1000)
