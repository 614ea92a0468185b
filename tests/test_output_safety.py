"""Data safety of the output folder: overwrite rules, input collisions, the run lock, full disks."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from wsiseg import output
from wsiseg.errors import DiskFullError, InputError, OutputBusyError
from wsiseg.guard import OutputLock, check_output_path, disk_full_error, is_wsiseg_output, lock_path
from wsiseg.output import ArraySpec, prepare_output, write_json_atomic

SIGNATURE = {"model": "tiny", "tile": 32}
ARRAYS = [ArraySpec("labels/mask/0", (64, 64), (32, 32), "uint8")]


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) with its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def make_output(out: Path) -> None:
    prepare_output(out, SIGNATURE, ARRAYS, overwrite=False, resume=False)


def one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --- overwrite -------------------------------------------------------------------------


def test_overwrite_refuses_regular_file(tmp_path: Path) -> None:
    out = tmp_path / "CMU.zarr"
    out.write_bytes(b"precious")
    for resume in (False, True):
        with pytest.raises(InputError) as err:
            prepare_output(out, SIGNATURE, ARRAYS, overwrite=True, resume=resume)
        assert "not a folder" in one_line(err)
    assert out.read_bytes() == b"precious"


def test_overwrite_refuses_foreign_folder(tmp_path: Path) -> None:
    out = tmp_path / "results"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "data.csv").write_text("a,b\n1,2\n")
    (out / "notes.txt").write_text("keep me")
    before = snapshot(out)
    with pytest.raises(InputError) as err:
        prepare_output(out, SIGNATURE, ARRAYS, overwrite=True, resume=False)
    assert "not a wsiseg output" in one_line(err)
    assert snapshot(out) == before


def test_overwrite_refuses_wsiseg_output_with_foreign_entry(tmp_path: Path) -> None:
    out = tmp_path / "CMU.zarr"
    make_output(out)
    (out / "my_annotations.geojson").write_text("{}")
    before = snapshot(out)
    with pytest.raises(InputError) as err:
        prepare_output(out, SIGNATURE, ARRAYS, overwrite=True, resume=False)
    assert "my_annotations.geojson" in one_line(err)
    assert snapshot(out) == before


def test_overwrite_replaces_clean_wsiseg_output(tmp_path: Path) -> None:
    out = tmp_path / "CMU.zarr"
    make_output(out)
    write_json_atomic(out / "report.json", {"done": True})
    (out / "overlay.png").write_bytes(b"png")
    record, resumed = prepare_output(out, {**SIGNATURE, "tile": 64}, ARRAYS, overwrite=True, resume=False)
    assert not resumed
    assert is_wsiseg_output(out)
    assert record.signature() == {**SIGNATURE, "tile": 64}
    assert not (out / "report.json").exists() and not (out / "overlay.png").exists()


def test_overwrite_replaces_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "CMU.zarr"
    out.mkdir()
    prepare_output(out, SIGNATURE, ARRAYS, overwrite=True, resume=False)
    assert is_wsiseg_output(out)


def test_overwrite_refuses_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.zarr"
    make_output(real)
    link = tmp_path / "link.zarr"
    link.symlink_to(real)
    before = snapshot(real)
    with pytest.raises(InputError) as err:
        prepare_output(link, SIGNATURE, ARRAYS, overwrite=True, resume=False)
    assert "symbolic link" in one_line(err)
    assert snapshot(real) == before


def test_existing_output_needs_a_flag(tmp_path: Path) -> None:
    out = tmp_path / "CMU.zarr"
    make_output(out)
    with pytest.raises(InputError, match="--overwrite"):
        make_output(out)
    assert prepare_output(out, SIGNATURE, ARRAYS, overwrite=False, resume=True)[1]


# --- output versus inputs --------------------------------------------------------------


@pytest.fixture
def slide(tmp_path: Path) -> Path:
    path = tmp_path / "slides" / "CMU-1.svs"
    path.parent.mkdir()
    path.write_bytes(os.urandom(4096))
    return path


@pytest.fixture
def zarr_input(tmp_path: Path) -> Path:
    path = tmp_path / "image.zarr"
    (path / "0").mkdir(parents=True)
    (path / ".zattrs").write_text(json.dumps({"multiscales": []}))
    (path / "0" / ".zarray").write_text("{}")
    return path


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_equal_to_input_file(slide: Path, overwrite: bool) -> None:
    before = snapshot(slide)
    with pytest.raises(InputError) as err:
        prepare_output(slide, SIGNATURE, ARRAYS, overwrite=overwrite, resume=False, inputs=[slide])
    assert "is the input" in one_line(err)
    assert snapshot(slide) == before


def test_output_equal_to_input_other_spelling(slide: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(slide.parent)
    with pytest.raises(InputError, match="is the input"):
        check_output_path(Path("../slides/CMU-1.svs"), [slide])
    link = slide.parent / "alias.svs"
    link.symlink_to(slide)
    with pytest.raises(InputError, match="is the input"):
        check_output_path(link, [slide])


def test_output_inside_input_folder(zarr_input: Path) -> None:
    before = snapshot(zarr_input)
    with pytest.raises(InputError) as err:
        prepare_output(zarr_input / "seg.zarr", SIGNATURE, ARRAYS, overwrite=True, resume=False, inputs=[zarr_input])
    assert "inside the input" in one_line(err)
    assert snapshot(zarr_input) == before
    assert not (zarr_input / "seg.zarr").exists()


@pytest.mark.parametrize("which", ["file", "folder"])
def test_output_containing_input(tmp_path: Path, slide: Path, zarr_input: Path, which: str) -> None:
    source = slide if which == "file" else zarr_input
    out = source.parent
    before = snapshot(source)
    with pytest.raises(InputError) as err:
        prepare_output(out, SIGNATURE, ARRAYS, overwrite=True, resume=False, inputs=[source])
    assert "contains the input" in one_line(err)
    assert snapshot(source) == before


def test_output_beside_input_is_fine(slide: Path) -> None:
    check_output_path(slide.parent / "CMU-1.zarr", [slide])
    check_output_path(slide.parent / "CMU-1.svs.zarr", [slide])


# --- the run lock ----------------------------------------------------------------------


def write_lock(out: Path, pid: int, host: str) -> Path:
    path = lock_path(out)
    path.write_text(json.dumps({"pid": pid, "host": host, "started": "2024-01-01T00:00:00+0000"}))
    return path


def test_lock_path_is_sibling(tmp_path: Path) -> None:
    assert lock_path(tmp_path / "CMU.zarr") == tmp_path.resolve() / "CMU.zarr.lock"


def test_second_lock_refused_until_released(tmp_path: Path) -> None:
    out = tmp_path / "CMU.zarr"
    with OutputLock(out) as first:
        assert json.loads(first.path.read_text())["pid"] == os.getpid()
        with pytest.raises(OutputBusyError) as err:
            with OutputLock(out):
                pass
        message = one_line(err)
        assert str(lock_path(out)) in message and str(os.getpid()) in message
        assert first.path.exists()  # the refused lock did not remove the held one
    assert not lock_path(out).exists()
    with OutputLock(out):
        make_output(out)
    assert is_wsiseg_output(out)


def test_stale_lock_of_dead_process_taken_over(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    out = tmp_path / "CMU.zarr"
    path = write_lock(out, child.pid, socket.gethostname())
    with OutputLock(out):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()
    assert not list(tmp_path.glob("*.stale"))


def test_lock_of_live_process_or_other_host_refused(tmp_path: Path) -> None:
    out = tmp_path / "CMU.zarr"
    for pid, host in [(os.getppid(), socket.gethostname()), (1, "another-host.example")]:
        path = write_lock(out, pid, host)
        before = path.read_text()
        with pytest.raises(OutputBusyError) as err:
            with OutputLock(out):
                pass
        assert f"delete {path}" in one_line(err)
        assert path.read_text() == before


def test_unreadable_lock_refused(tmp_path: Path) -> None:
    out = tmp_path / "CMU.zarr"
    lock_path(out).write_text("")
    with pytest.raises(OutputBusyError, match="unreadable"):
        OutputLock(out).acquire()
    assert lock_path(out).exists()


def test_lock_released_on_exception(tmp_path: Path) -> None:
    out = tmp_path / "CMU.zarr"
    with pytest.raises(RuntimeError, match="boom"):
        with OutputLock(out):
            raise RuntimeError("boom")
    assert not lock_path(out).exists()


# --- full disk -------------------------------------------------------------------------


def test_disk_full_error_maps_enospc(tmp_path: Path) -> None:
    out = tmp_path / "CMU.zarr"
    error = disk_full_error(OSError(errno.ENOSPC, "No space left on device"), out)
    assert isinstance(error, DiskFullError)
    message = str(error)
    assert "\n" not in message and "--resume" in message and str(out) in message
    assert disk_full_error(OSError(errno.EACCES, "Permission denied"), out) is None
    assert disk_full_error(ValueError("no"), out) is None


def test_disk_full_error_finds_wrapped_cause(tmp_path: Path) -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("chunk write failed") from exc
    except RuntimeError as wrapped:
        assert isinstance(disk_full_error(wrapped, tmp_path), DiskFullError)


def test_write_report_on_full_device_leaves_nothing(tmp_path: Path) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    # The partial file points at /dev/full, whose writes fail with ENOSPC.
    (tmp_path / "report.json.partial").symlink_to("/dev/full")
    with pytest.raises(OSError) as err:
        write_json_atomic(tmp_path / "report.json", {"x": "y" * 100_000})
    assert err.value.errno == errno.ENOSPC
    assert isinstance(disk_full_error(err.value, tmp_path), DiskFullError)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_write_report_failing_flush_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output.os, "fsync", no_space)
    with pytest.raises(OSError):
        write_json_atomic(tmp_path / "report.json", {"done": True})
    assert not (tmp_path / "report.json").exists()
    assert not (tmp_path / "report.json.partial").exists()


def test_write_report_writes_json(tmp_path: Path) -> None:
    path = write_json_atomic(tmp_path / "report.json", {"done": True, "out": tmp_path})
    assert json.loads(path.read_text()) == {"done": True, "out": str(tmp_path)}
    assert not (tmp_path / "report.json.partial").exists()


def test_a_refused_resume_names_only_the_settings_that_changed(tmp_path) -> None:
    """Tuples in a signature come back from run.json as lists: they must not count as changed."""
    out = tmp_path / "o.zarr"
    signature = {"tile": 32, "low_shape": (10, 12), "scale": (4.0, 4.0), "halo": 32}
    prepare_output(out, signature, ARRAYS, overwrite=False, resume=False)
    assert prepare_output(out, signature, ARRAYS, overwrite=False, resume=True)[1] is True
    with pytest.raises(InputError) as refused:
        prepare_output(out, {**signature, "halo": 64}, ARRAYS, overwrite=False, resume=True)
    assert "(halo)" in str(refused.value)
