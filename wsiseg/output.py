"""The OME-Zarr output of a run: arrays, NGFF metadata, run record, report, overlay.

Layout of ``OUT.zarr`` (OME-NGFF 0.4 on zarr v2, which napari, QuPath /
Bio-Formats, OMERO and vizarr read)::

    OUT.zarr/
      mask/          multiscale label image: 0 = (H, W) uint8, 1, 2, ... = /2 each
      probability/   Model 1's class probabilities (C, h, w) float32, low resolution
      uncertainty/   Model 1's per-pixel uncertainty (h, w) float32
      tile_scores/   mean uncertainty per tile (rows, cols) float32
      refined/       1 where Model 2 refined the tile (rows, cols) uint8
      report.json    what ran, on what, how long, with which versions
      overlay.png    thumbnail with the mask and the refined tiles outlined
      .wsiseg/       run record (settings, completed work) used by --resume

Each image group carries ``multiscales`` metadata whose scales place it over
the slide in micrometres (or pixels when the pixel size is unknown). The
metadata and ``report.json`` are written only when the run completes, so an
interrupted output never looks like a finished one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from wsiseg.cache import BoundedCache, register
from wsiseg.errors import DiskFullError, InputError, OutputBusyError, WsisegError

NGFF_VERSION = "0.4"
RECORD_DIR = ".wsiseg"
LOWRES_ARRAY = f"{RECORD_DIR}/lowres"
#: Model 1's features projected for Model 2 (scratch, deleted when the run completes).
CONTEXT_ARRAY = f"{RECORD_DIR}/context"
SCRATCH_ARRAYS = (LOWRES_ARRAY, CONTEXT_ARRAY)
#: Top-level entries wsiseg writes in an output; ``--overwrite`` deletes nothing else.
OUTPUT_ENTRIES = frozenset({
    "mask", "probability", "uncertainty", "tile_scores", "refined", RECORD_DIR,
    "report.json", "report.json.partial", "overlay.png", "mask.geojson",
    ".zattrs", ".zgroup", "zarr.json", "labels",
})
#: Label colours (RGBA) for napari / QuPath: class 1, 2, ...
LABEL_COLOURS = [
    (0, 200, 80, 255), (230, 60, 60, 255), (50, 110, 230, 255), (240, 200, 30, 255),
    (170, 60, 200, 255), (30, 200, 200, 255), (240, 130, 30, 255), (120, 120, 120, 255),
]


def _zarr() -> Any:
    import zarr

    return zarr


def _compressor(dtype: Any) -> Any:
    """Blosc (zarr v2's default codec, which every zarr reader has, QuPath's included):
    Zstd for labels and pixels; LZ4 with byte shuffle for float maps, which decodes
    about 4x faster than Zstd and compresses them better (measured on Model 1's maps)."""
    import numcodecs

    if np.dtype(dtype).kind == "f":
        return numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    return numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.NOSHUFFLE)


#: Open output arrays of this process, keyed by (out, name, .zarray mtime_ns).
ARRAYS_MAXSIZE = 64
_ARRAYS: BoundedCache[tuple[str, str, int | None], Any] = register(
    "arrays", BoundedCache(ARRAYS_MAXSIZE), path_of=lambda key: key[0]
)


def open_array(out: str | os.PathLike[str], name: str) -> Any:
    """A zarr array of an output, opened once per process for reading and writing.

    The cache is keyed by the array's metadata file version too, so a worker
    that served an earlier run into the same path never sees stale shapes.
    """
    try:
        version = os.stat(Path(out) / name / ".zarray").st_mtime_ns
    except OSError:
        version = None
    key = (str(out), name, version)
    return _ARRAYS.get_or_create(key, lambda: _zarr().open_array(str(Path(out) / name), mode="r+"))


def forget_arrays(out: str | os.PathLike[str]) -> None:
    """Drop this process's cached arrays of ``out`` (after it is rewritten)."""
    _ARRAYS.discard(lambda key: key[0] == str(out))


@dataclass(frozen=True)
class ArraySpec:
    """An array to create: group-relative name, shape, chunks, dtype."""

    name: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str


class RunRecord:
    """The settings of a run and the work it has finished, for ``--resume``.

    ``run.json`` holds the settings signature; ``progress.jsonl`` gets one
    JSON line per finished piece of work, appended and flushed by the driver
    only, so a crash loses at most the pieces in flight (which are then
    recomputed: every task writes only its own chunks).
    """

    def __init__(self, out: Path) -> None:
        self.dir = out / RECORD_DIR
        self._progress = self.dir / "progress.jsonl"

    def write_signature(self, signature: Mapping[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "run.json").write_text(json.dumps(signature, indent=1, sort_keys=True))

    def signature(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def append(self, entry: Mapping[str, Any]) -> None:
        with open(self._progress, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def entries(self) -> list[dict[str, Any]]:
        """Recorded entries; a torn last line (killed mid-write) is ignored."""
        try:
            lines = self._progress.read_text().splitlines()
        except OSError:
            return []
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return entries


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


def _remove_for_overwrite(out: Path) -> None:
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
    foreign = [name for name in entries if name not in OUTPUT_ENTRIES]
    if foreign:
        names = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise InputError(
            f"{out} holds {names}, which wsiseg did not write; move it out of the folder or choose another --out"
        )
    shutil.rmtree(out)


def prepare_output(
    out: Path,
    signature: Mapping[str, Any],
    arrays: Iterable[ArraySpec],
    overwrite: bool,
    resume: bool,
    *,
    inputs: Sequence[Path] = (),
) -> tuple[RunRecord, bool]:
    """Create (or reopen, for ``resume``) the output folder and its arrays.

    The caller holds an :class:`OutputLock` on ``out`` around this call and
    everything the run writes afterwards; this function does not take it.
    ``overwrite`` deletes only an empty folder or a wsiseg output holding
    nothing wsiseg did not write; a file at ``out`` is never deleted.

    Parameters
    ----------
    inputs : sequence of Path, optional
        The run's input slides; ``out`` may not be, lie inside or contain one
        (see :func:`check_output_path`).

    Returns
    -------
    record : RunRecord
    resumed : bool
        True when an unfinished run with the same settings was found.

    Raises
    ------
    InputError
        When ``out`` collides with an input, exists but is not a folder, exists
        and neither flag allows using it, when ``overwrite`` would delete
        something wsiseg did not write, or when ``resume`` finds a run made
        with other settings.
    """
    check_output_path(out, inputs)
    record = RunRecord(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise not_a_folder_error(out)
        if resume and is_wsiseg_output(out):
            previous = record.signature() or {}
            current = json.loads(json.dumps(dict(signature), sort_keys=True))  # tuples compare as lists
            if previous != current:
                changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
                raise InputError(
                    f"{out} was made with other settings ({', '.join(changed)}); "
                    "resume with the same settings or use --overwrite"
                )
            return record, True
        if not overwrite:
            raise InputError(f"{out} already exists; use --overwrite to replace it or --resume to continue it")
        _remove_for_overwrite(out)
    forget_arrays(out)
    zarr = _zarr()
    root = zarr.open_group(str(out), mode="w", zarr_format=2)
    for spec in arrays:
        parent, _, leaf = spec.name.rpartition("/")
        group = root.require_group(parent) if parent else root
        group.create_array(
            leaf,
            shape=spec.shape,
            chunks=spec.chunks,
            dtype=spec.dtype,
            fill_value=0,
            chunk_key_encoding={"name": "v2", "separator": "/"},
            compressors=_compressor(spec.dtype),
        )
    record.write_signature(signature)
    return record, False


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


BandRunner = Callable[[Callable[..., None], list[tuple[Any, ...]]], None]


def build_pyramid(out: Path, name: str, tile: int, run: BandRunner | None = None) -> int:
    """Add levels ``1, 2, ...`` under group ``name`` by taking every other pixel.

    Nearest-neighbour subsampling keeps labels valid. Levels are added until
    one fits in a single ``tile x tile`` chunk. Each level is written in bands
    of one chunk row by :func:`pyramid_band` calls, which never write the same
    chunk twice.

    Parameters
    ----------
    run : callable, optional
        ``run(function, list_of_args)`` calls ``function(*args)`` for each
        entry and returns when all are done (e.g. as Dask tasks); default:
        threads of this process.

    Returns
    -------
    int
        Number of levels, level 0 included.
    """
    zarr = _zarr()
    group = zarr.open_group(str(out / name), mode="r+", zarr_format=2)
    level = 0
    while max(group[str(level)].shape) > tile:
        height, width = group[str(level)].shape
        group.create_array(
            str(level + 1),
            shape=(-(-height // 2), -(-width // 2)),
            chunks=(tile, tile),
            dtype=group[str(level)].dtype,
            fill_value=0,
            chunk_key_encoding={"name": "v2", "separator": "/"},
            compressors=_compressor(group[str(level)].dtype),
            overwrite=True,
        )
        rows = -(-height // 2)
        bands = [(str(out), name, level + 1, y, min(y + tile, rows)) for y in range(0, rows, tile)]
        (run or _run_in_threads)(pyramid_band, bands)
        level += 1
    return level + 1


def pyramid_band(out: str, name: str, level: int, y0: int, y1: int) -> None:
    """Write rows ``[y0, y1)`` of level ``level`` of group ``name``: every other pixel of level ``level - 1``."""
    source = open_array(out, f"{name}/{level - 1}")
    target = open_array(out, f"{name}/{level}")
    step = target.chunks[1]
    for x0 in range(0, target.shape[1], step):
        x1 = min(x0 + step, target.shape[1])
        target[y0:y1, x0:x1] = source[2 * y0 : 2 * y1, 2 * x0 : 2 * x1][::2, ::2]


def _run_in_threads(function: Callable[..., None], calls: list[tuple[Any, ...]]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for _ in pool.map(lambda args: function(*args), calls):
            pass


def write_multiscales(
    out: Path,
    name: str,
    axes: list[str],
    levels: int,
    step: tuple[float, float],
    mpp: tuple[float, float] | None,
    labels: Mapping[int, str] | None = None,
) -> None:
    """Write NGFF 0.4 ``multiscales`` metadata for group ``name``.

    Parameters
    ----------
    axes : list of str
        e.g. ``["y", "x"]`` or ``["c", "y", "x"]``.
    levels : int
        Datasets ``0 .. levels - 1``, each half the size of the previous.
    step : (sy, sx)
        Level-0 slide pixels per pixel of dataset 0.
    mpp : (y, x) or None
        Micrometres per slide pixel; None gives scales in slide pixels.
    labels : mapping, optional
        Label value -> name; adds ``image-label`` colours (napari shows the
        image as a labels layer).
    """
    zarr = _zarr()
    unit = mpp if mpp else (1.0, 1.0)
    axis_meta = []
    for a in axes:
        entry: dict[str, Any] = {"name": a, "type": "channel" if a == "c" else "space"}
        if a != "c" and mpp:
            entry["unit"] = "micrometer"
        axis_meta.append(entry)
    datasets = []
    for level in range(levels):
        factor = 2**level
        sy, sx = step[0] * factor * unit[0], step[1] * factor * unit[1]
        # A pixel of this dataset covers [i*s, (i+1)*s) slide pixels (dataset 0) or
        # is the subsampled pixel i*2^level of it: centre offset from slide pixel 0.
        ty = (step[0] - 1) / 2 * unit[0]
        tx = (step[1] - 1) / 2 * unit[1]
        scale = ([1.0] if axes[0] == "c" else []) + [sy, sx]
        translation = ([0.0] if axes[0] == "c" else []) + [ty, tx]
        datasets.append({
            "path": str(level),
            "coordinateTransformations": [
                {"type": "scale", "scale": scale},
                {"type": "translation", "translation": translation},
            ],
        })
    group = zarr.open_group(str(out / name), mode="r+", zarr_format=2)
    attrs: dict[str, Any] = {
        "multiscales": [{
            "version": NGFF_VERSION,
            "name": name,
            "axes": axis_meta,
            "datasets": datasets,
            "type": "nearest" if levels > 1 else "none",
        }]
    }
    if labels:
        attrs["image-label"] = {
            "version": NGFF_VERSION,
            "colors": [
                {"label-value": int(v), "rgba": list(LABEL_COLOURS[(int(v) - 1) % len(LABEL_COLOURS)])}
                for v in sorted(labels) if int(v) > 0
            ],
            "properties": [{"label-value": int(v), "class": str(n)} for v, n in sorted(labels.items())],
        }
    group.attrs.update(attrs)


def write_report(out: Path, report: Mapping[str, Any]) -> Path:
    """Write ``report.json`` atomically (it marks the output complete).

    The text goes to ``report.json.partial``, is flushed to the disk and then
    renamed. When any step fails (a full disk, say) the partial file is
    removed and the error re-raised, so a failed write leaves no report.
    """
    path = out / "report.json"
    partial = out / "report.json.partial"
    text = json.dumps(report, indent=2, sort_keys=False, default=_json_default)
    try:
        with open(partial, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_overlay(
    out: Path,
    background: np.ndarray,
    mask: np.ndarray,
    refined: np.ndarray | None,
    max_side: int = 1024,
) -> Path:
    """Save ``overlay.png``: the thumbnail, the mask tinted, refined tiles outlined.

    Parameters
    ----------
    background : np.ndarray
        ``(h, w, 3)`` uint8 thumbnail of the slide.
    mask : np.ndarray
        ``(mh, mw)`` labels at any resolution (resized with nearest neighbour).
    refined : np.ndarray or None
        ``(rows, cols)`` bool tile map; outlines drawn in yellow.
    """
    from PIL import Image, ImageDraw

    thumb = Image.fromarray(background)
    scale = min(1.0, max_side / max(thumb.size))
    size = (max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale)))
    thumb = thumb.resize(size, Image.Resampling.BILINEAR)
    labels = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    rgb = np.asarray(thumb).astype(np.float32)
    for value in np.unique(labels):
        if value == 0:
            continue
        colour = np.array(LABEL_COLOURS[(int(value) - 1) % len(LABEL_COLOURS)][:3], np.float32)
        where = labels == value
        rgb[where] = 0.55 * rgb[where] + 0.45 * colour
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if refined is not None and refined.any():
        draw = ImageDraw.Draw(image)
        rows, cols = refined.shape
        fy, fx = size[1] / rows, size[0] / cols
        for r, c in np.argwhere(refined):
            draw.rectangle([c * fx, r * fy, (c + 1) * fx - 1, (r + 1) * fy - 1], outline=(255, 220, 0))
    path = out / "overlay.png"
    image.save(path)
    return path


def remove_scratch(out: Path) -> None:
    """Delete the run's scratch arrays (the run record itself stays)."""
    for name in SCRATCH_ARRAYS:
        if (out / name).exists():
            shutil.rmtree(out / name)
    forget_arrays(out)
