"""What a run may write and delete, and when: the output's guard.

- :func:`check_output_path`: an output is never an input, inside one, or
  around one.
- :func:`remove_for_overwrite`: ``--overwrite`` deletes only a wsiseg output
  holding nothing wsiseg did not write; never a file, never through a link.
- :class:`OutputLock`: one run per output at a time, through a sibling lock
  file; a lock left by a dead process on this host is taken over.
- :func:`disk_full_error`: a full disk becomes one line saying to free space
  and resume.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from wsiseg.errors import DiskFullError, InputError, OutputBusyError, WsisegError

#: The run record's folder inside an output (settings and finished work, for --resume).
RECORD_DIR = ".wsiseg"
#: Top-level entries wsiseg writes in an output; ``--overwrite`` deletes nothing else.
OUTPUT_ENTRIES = frozenset({
    "labels", "maps", RECORD_DIR, "report.json", "report.json.partial", "overlay.png", "mask.geojson",
    "objects.parquet", "objects.csv", "objects.geojson", ".zattrs", ".zgroup", "zarr.json",
})


def is_output_entry(name: str) -> bool:
    """An entry of an output folder wsiseg writes: :data:`OUTPUT_ENTRIES`, or a pixels level ``0, 1, ...``."""
    return name in OUTPUT_ENTRIES or name.isdigit()


def is_wsiseg_output(path: Path) -> bool:
    """True for a folder this program wrote (it has a run record)."""
    return (path / RECORD_DIR / "run.json").is_file()


def check_output_path(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output that is, lies inside, or contains one of the inputs.

    Paths are compared resolved (links, ``..`` and relative paths followed),
    so no spelling of a slide's path, or of an input OME-Zarr folder, lets a
    run write into it or ``--overwrite`` delete it.

    Parameters
    ----------
    out : Path
        The output folder (it need not exist).
    inputs : sequence of Path
        Input slides: files or folders.

    Raises
    ------
    InputError
        Naming the input that ``out`` collides with.
    """
    target = Path(out).resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source or _same_file(target, source):
            raise InputError(f"--out {out} is the input {given}; choose another --out")
        if _contains(source, target):
            raise InputError(f"--out {out} lies inside the input {given}; choose an --out outside it")
        if _contains(target, source):
            raise InputError(f"--out {out} contains the input {given}; choose an --out that does not")


def not_a_folder_error(out: Path) -> InputError:
    """The error for an ``--out`` that exists and is not a folder (a file is never replaced)."""
    return InputError(
        f"--out {out} exists and is not a folder; choose another --out (--overwrite replaces only wsiseg outputs)"
    )


def _same_file(a: Path, b: Path) -> bool:
    """True when both paths exist and name one file (hard links, case-insensitive file systems)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _contains(outer: Path, inner: Path) -> bool:
    """True when resolved path ``inner`` lies strictly below resolved path ``outer``."""
    return inner != outer and (inner.is_relative_to(outer) or any(_same_file(outer, p) for p in inner.parents))


def remove_for_overwrite(out: Path) -> None:
    """Delete the existing folder ``out`` for ``--overwrite``.

    Only an empty folder, or a wsiseg output (it has a run record) holding
    nothing but entries wsiseg writes (:data:`OUTPUT_ENTRIES`), is deleted.

    Raises
    ------
    InputError
        When ``out`` is a link, is not a wsiseg output, or holds a foreign entry.
    """
    if out.is_symlink():
        raise InputError(f"--out {out} is a symbolic link; give the folder it links to as --out to overwrite it")
    entries = sorted(entry.name for entry in out.iterdir())
    if not entries:
        out.rmdir()
        return
    if not is_wsiseg_output(out):
        raise InputError(f"{out} exists and is not a wsiseg output; refusing to delete it, choose another --out")
    foreign = [name for name in entries if not is_output_entry(name)]
    if foreign:
        names = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise InputError(
            f"{out} holds {names}, which wsiseg did not write; move it out of the folder or choose another --out"
        )
    shutil.rmtree(out)


def lock_path(out: Path) -> Path:
    """The lock file of output ``out``: a sibling ``<name>.lock`` (``CMU.zarr.lock`` for ``CMU.zarr``)."""
    resolved = Path(out).resolve()
    return resolved.with_name(resolved.name + ".lock")


class OutputLock:
    """Exclusive use of an output folder by one run, held in a sibling lock file.

    The run driver holds it around everything that writes the output;
    :func:`prepare_output` does not take it itself::

        with OutputLock(out):
            record, resumed = prepare_output(out, signature, arrays, overwrite, resume, inputs=slides)
            ...  # compute and write the arrays, the metadata, the report

    The lock file (:func:`lock_path`) is created exclusively and holds
    ``{"pid", "host", "started"}``. A lock left by a process of this host that
    no longer exists is stale and taken over; any other lock is refused. The
    file is removed on exit, also when the run raises.

    Raises
    ------
    OutputBusyError
        On entry, when another run holds the lock.
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = lock_path(self.out)
        self._payload: str | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def acquire(self) -> None:
        """Create the lock file, taking over a stale one; see the class docstring."""
        if self._payload is not None:
            raise RuntimeError(f"{self.path} is already held by this OutputLock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        held = None
        for _ in range(3):
            if _create_exclusive(self.path, payload):
                self._payload = payload
                return
            held = _read_text(self.path)
            if held is not None and not _is_stale(_parse_lock(held)):
                break
            if held is not None:
                _take_over(self.path, held)
        raise OutputBusyError(
            f"{self.out} is being written by another run ({_describe_lock(held)}); "
            f"wait for it to end, or delete {self.path} if no run is active"
        )

    def release(self) -> None:
        """Remove the lock file if this lock holds it (a no-op otherwise)."""
        if self._payload is None:
            return
        try:
            if _read_text(self.path) == self._payload:
                self.path.unlink(missing_ok=True)
        finally:
            self._payload = None


def _create_exclusive(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text``; False when it already exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return True


def _read_text(path: Path) -> str | None:
    """The text of ``path``, or None when it does not exist."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _parse_lock(text: str) -> dict[str, Any] | None:
    """The holder recorded in a lock file, or None when it is unreadable (e.g. being written)."""
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return None
    return holder if isinstance(holder, dict) else None


def _is_stale(holder: dict[str, Any] | None) -> bool:
    """True for a lock of this host whose process no longer exists."""
    if not holder or holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    return isinstance(pid, int) and pid > 0 and not _process_exists(pid)


def _process_exists(pid: int) -> bool:
    """True when process ``pid`` exists on this host (or this cannot be told)."""
    if os.name == "nt":  # os.kill would end the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _take_over(path: Path, stale: str) -> None:
    """Remove the stale lock ``path`` if it still holds ``stale``.

    The lock is first renamed aside, so of several runs taking it over at
    once only one removes it; a run that moved a fresh lock instead (created
    meanwhile by the winner) puts it back.
    """
    aside = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read_text(aside) == stale:
        aside.unlink(missing_ok=True)
        return
    try:
        os.link(aside, path)
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links
        os.replace(aside, path)
        return
    aside.unlink(missing_ok=True)


def _describe_lock(text: str | None) -> str:
    """The holder of a lock, in words, for error messages."""
    holder = _parse_lock(text) if text is not None else None
    if not holder:
        return "its lock file is being written or unreadable"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def disk_full_error(exc: BaseException, out: Path) -> WsisegError | None:
    """The user-facing error for a write to ``out`` that failed on a full disk.

    Parameters
    ----------
    exc : BaseException
        What the write raised; its causes (``__cause__``, ``__context__``) are
        searched too, as zarr and Dask may wrap the ``OSError``.
    out : Path
        The output folder.

    Returns
    -------
    DiskFullError or None
        A one-line error for ``ENOSPC`` / ``EDQUOT``; None for any other error.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL:
            what = "no space left" if current.errno == errno.ENOSPC else "disk quota exceeded"
            return DiskFullError(f"{what} on the device holding {out}; free space and run again with --resume")
        current = current.__cause__ or current.__context__
    return None
