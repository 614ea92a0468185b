"""The OME-Zarr output of a run: arrays, NGFF metadata, run record, report, overlay.

The layout of ``OUT.zarr`` and its NGFF metadata are :mod:`wsiseg.ngff`'s;
besides the arrays it holds ``report.json`` (what ran, on what, how long,
with which versions), ``overlay.png`` (a thumbnail with the mask and the
refined tiles outlined) and ``.wsiseg/`` (the run record used by --resume).

What may be written or deleted, the run lock and disk-full errors are
:mod:`wsiseg.guard`'s.

The NGFF metadata and ``report.json`` are written only when the run
completes, so an interrupted output never looks like a finished one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.cache import BoundedCache, register
from wsiseg.errors import InputError
from wsiseg.ngff import CONTEXT
from wsiseg.guard import RECORD_DIR, check_output_path, is_wsiseg_output, not_a_folder_error, remove_for_overwrite

SCRATCH_ARRAYS = (CONTEXT,)


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
        remove_for_overwrite(out)
    forget_arrays(out)
    _zarr().open_group(str(out), mode="w", zarr_format=2)
    create_arrays(out, arrays)
    record.write_signature(signature)
    return record, False


def create_arrays(out: Path, arrays: Iterable[ArraySpec], overwrite: bool = False) -> None:
    """Create the arrays (and the groups above them) in output ``out``, filled with 0."""
    root = _zarr().open_group(str(out), mode="r+", zarr_format=2)
    groups = {"": root}  # each parent group required once (a zarr call costs ~20 ms)
    for spec in arrays:
        parent, _, leaf = spec.name.rpartition("/")
        if parent not in groups:
            groups[parent] = root.require_group(parent)
        groups[parent].create_array(
            leaf,
            shape=spec.shape,
            chunks=spec.chunks,
            dtype=spec.dtype,
            fill_value=0,
            chunk_key_encoding={"name": "v2", "separator": "/"},
            compressors=_compressor(spec.dtype),
            overwrite=overwrite,
        )
    forget_arrays(out)


BandRunner = Callable[[Callable[..., None], list[tuple[Any, ...]]], None]


def build_pyramid(out: Path, name: str, tile: int, run: BandRunner | None = None, mean: bool = False) -> int:
    """Add levels ``1, 2, ...`` beside array ``0`` of group ``name`` (``""``: the root), each half the size.

    Labels take every other pixel (``mean=False``: nearest neighbour keeps
    them valid); pixels take the rounded mean of each 2 x 2 block (edge
    blocks: of the pixels they have). Arrays are ``(..., h, w)``. Levels
    are added until one fits in a single ``tile x tile`` chunk. Each level is
    written in bands of one chunk row by :func:`pyramid_band` calls, which
    never write the same chunk twice.

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
    group = zarr.open_group(str(out / name) if name else str(out), mode="r+", zarr_format=2)
    level = 0
    while max(group[str(level)].shape[-2:]) > tile:
        previous = group[str(level)]
        *lead, height, width = previous.shape
        rows = -(-height // 2)
        group.create_array(
            str(level + 1),
            shape=(*lead, rows, -(-width // 2)),
            chunks=(*lead, tile, tile),
            dtype=previous.dtype,
            fill_value=0,
            chunk_key_encoding={"name": "v2", "separator": "/"},
            compressors=_compressor(previous.dtype),
            overwrite=True,
        )
        bands = [(str(out), name, level + 1, y, min(y + tile, rows), mean) for y in range(0, rows, tile)]
        (run or _run_in_threads)(pyramid_band, bands)
        level += 1
    return level + 1


def pyramid_band(out: str, name: str, level: int, y0: int, y1: int, mean: bool = False) -> None:
    """Write rows ``[y0, y1)`` of level ``level`` of group ``name`` from level ``level - 1`` (see :func:`build_pyramid`)."""
    prefix = f"{name}/" if name else ""
    source = open_array(out, f"{prefix}{level - 1}")
    target = open_array(out, f"{prefix}{level}")
    step = target.chunks[-1]
    for x0 in range(0, target.shape[-1], step):
        x1 = min(x0 + step, target.shape[-1])
        block = np.asarray(source[..., 2 * y0 : 2 * y1, 2 * x0 : 2 * x1])
        target[..., y0:y1, x0:x1] = halve_mean(block) if mean else block[..., ::2, ::2]


def halve_mean(block: np.ndarray) -> np.ndarray:
    """``(..., h, w)`` uint8 -> ``(..., ceil(h/2), ceil(w/2))``: rounded 2 x 2 block means (edges: of the pixels present)."""
    h, w = block.shape[-2:]
    pad = [(0, 0)] * (block.ndim - 2) + [(0, h % 2), (0, w % 2)]
    padded = np.pad(block, pad, mode="edge").astype(np.uint16)
    sums = padded[..., ::2, ::2] + padded[..., 1::2, ::2] + padded[..., ::2, 1::2] + padded[..., 1::2, 1::2]
    return ((sums + 2) // 4).astype(block.dtype)


def _run_in_threads(function: Callable[..., None], calls: list[tuple[Any, ...]]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for _ in pool.map(lambda args: function(*args), calls):
            pass


def write_json_atomic(path: Path, value: Mapping[str, Any]) -> Path:
    """Write ``value`` as JSON to ``path`` atomically (``report.json``: it marks an output complete).

    The text goes to ``<path>.partial``, is flushed to the disk and then
    renamed. When any step fails (a full disk, say) the partial file is
    removed and the error re-raised, so a failed write leaves no file.
    """
    partial = path.with_name(path.name + ".partial")
    text = json.dumps(value, indent=2, sort_keys=False, default=_json_default)
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
    tile_size: int,
    work_shape: tuple[int, int],
    max_side: int = 1024,
    min_side: int = 512,
) -> Path:
    """Save ``overlay.png``: the thumbnail, the mask tinted, refined tiles outlined
    (drawn by :func:`wsiseg.plot.overlay_image`, whose parameters these are)."""
    from wsiseg.plot import overlay_image

    path = out / "overlay.png"
    overlay_image(background, mask, refined, tile_size, work_shape, max_side, min_side).save(path)
    return path


def remove_scratch(out: Path) -> None:
    """Delete the run's scratch arrays (the run record itself stays)."""
    for name in SCRATCH_ARRAYS:
        if (out / name).exists():
            shutil.rmtree(out / name)
    forget_arrays(out)
