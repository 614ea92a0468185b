"""What a segmentation run is given: slides named, found in folders and listed; their outputs named and checked.

Output names: a slide's stem (``a/s1.svs`` -> ``s1.zarr``). Slides sharing a
stem are told apart by as few of their parent folders' names as it takes
(``a/slide.jpg``, ``b/slide.png`` -> ``a_slide.zarr``, ``b_slide.zarr``;
``x/scans/s.tif``, ``y/scans/s.tif`` -> ``x_scans_s.zarr``, ``y_scans_s.zarr``),
and by their suffix as well when two of them share a folder (``s.tif``,
``s.png`` -> ``s_tif.zarr``, ``s_png.zarr``). A name that still collides with
another slide's is an error before anything runs.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from wsiseg.errors import InputError
from wsiseg.guard import RECORD_DIR, check_output_path, is_wsiseg_output, not_a_folder_error

#: The report that marks an output complete.
REPORT_NAME = "report.json"

#: File suffixes a folder is searched for (not ``.dcm``: a DICOM slide is a
#: folder of files, one per level; name one of its files directly or in a list).
SLIDE_SUFFIXES = frozenset({".svs", ".tif", ".tiff", ".btf", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu",
                            ".svslide", ".png", ".jpg", ".jpeg", ".bmp"})


def default_output(slide: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<out_dir or cwd>/<slide stem>.zarr``."""
    stem = Path(slide).name
    for suffix in (".ome.tiff", ".ome.tif", ".zarr"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        stem = Path(stem).stem
    return Path(out_dir or ".") / f"{stem}.zarr"


def is_zarr_folder(path: Path) -> bool:
    """A folder that is one OME-Zarr slide, not a folder of slides."""
    return path.suffix.lower() == ".zarr" or any((path / name).exists() for name in ("zarr.json", ".zattrs", ".zgroup"))


def is_cohort(inputs: Sequence[Path], listing: Path | None = None) -> bool:
    """Several slides, a folder of slides or a list file: outputs go into a folder, with a manifest."""
    if listing is not None or len(inputs) != 1:
        return True
    return inputs[0].is_dir() and not is_zarr_folder(inputs[0])


def slides_in_folder(folder: Path) -> list[Path]:
    """The slides directly in ``folder`` (by suffix, not in subfolders, not hidden), sorted by name."""
    return sorted(
        p for p in folder.iterdir()
        if p.suffix.lower() in SLIDE_SUFFIXES and not p.name.startswith(".") and not p.is_dir()
    )


def read_slide_list(listing: Path) -> list[Path]:
    """One slide per line; blank lines and ``#`` lines ignored; relative paths from the list's folder."""
    try:
        lines = listing.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the slide list {listing}: {exc.__class__.__name__}") from exc
    entries = (line.strip() for line in lines)
    return [listing.parent / Path(entry).expanduser() for entry in entries if entry and not entry.startswith("#")]


def find_slides(inputs: Sequence[Path], listing: Path | None = None) -> list[Path]:
    """Slides named, found in folders (see :func:`slides_in_folder`) and listed, in that order, each once.

    A path named directly or in the list is kept even when it does not
    exist: it fails as that slide, not as the cohort.

    Raises
    ------
    InputError
        When no slide is given or found, or the list cannot be read.
    """
    found: list[Path] = []
    for item in inputs:
        found.extend(slides_in_folder(item) if item.is_dir() and not is_zarr_folder(item) else [item])
    if listing is not None:
        found.extend(read_slide_list(listing))
    if not found:
        where = ", ".join(str(p) for p in [*inputs, *([listing] if listing else [])]) or "the arguments"
        raise InputError(f"no slides found in {where} (folders are searched for {', '.join(sorted(SLIDE_SUFFIXES))}, "
                         "not in subfolders)")
    return _unique(found)


def _unique(paths: Iterable[Path]) -> list[Path]:
    """The first of the paths naming each file (compared resolved)."""
    seen: set[Path] = set()
    kept = []
    for path in paths:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            kept.append(path)
    return kept


def plan_outputs(slides: Sequence[Path], out_dir: Path) -> list[Path]:
    """Each slide's output folder in ``out_dir``, all distinct (the rule is in this module's docstring).

    Raises
    ------
    InputError
        When two slides would still share an output.
    """
    names = [default_output(slide).stem for slide in slides]
    by_stem: dict[str, list[int]] = defaultdict(list)
    for index, name in enumerate(names):
        by_stem[name.casefold()].append(index)
    for members in by_stem.values():
        if len(members) > 1:
            paths = [Path(os.path.normpath(slides[i].absolute())) for i in members]
            labels = _distinct_labels(paths, [names[i] for i in members])
            for index, label in zip(members, labels):
                names[index] = label
    _refuse_shared_names(slides, names)
    return [out_dir / f"{name}.zarr" for name in names]


def _distinct_labels(paths: Sequence[Path], stems: Sequence[str]) -> list[str]:
    """``<folders>_<stem>[_<suffix>]`` for slides sharing a stem: the fewest parent folders that differ."""
    with_suffix = len({p.parent for p in paths}) < len(paths)
    depth = max(len(p.parent.parts) for p in paths)
    for k in range(0 if with_suffix else 1, depth + 1):
        labels = [_label(p, stem, k, with_suffix) for p, stem in zip(paths, stems)]
        if len({label.casefold() for label in labels}) == len(labels):
            return labels
    return labels  # identical spellings of one name: reported by _refuse_shared_names


def _label(path: Path, stem: str, folders: int, with_suffix: bool) -> str:
    parents = [part for part in path.parent.parts if part not in (path.anchor, "")][-folders:] if folders else []
    suffix = [path.suffix.lstrip(".").lower()] if with_suffix and path.suffix else []
    return "_".join([*parents, stem, *suffix])


def _refuse_shared_names(slides: Sequence[Path], names: Sequence[str]) -> None:
    first: dict[str, int] = {}
    for index, name in enumerate(names):
        other = first.setdefault(name.casefold(), index)
        if other != index:
            raise InputError(f"{slides[other]} and {slides[index]} would both be written to {name}.zarr; "
                             "rename one or segment it on its own with --out")


def check_cohort(slides: Sequence[Path], out_dir: Path, parallel: int) -> list[Path]:
    """The outputs of a cohort, once its arguments are checked (nothing is written).

    Raises
    ------
    InputError
        A bad ``parallel``, an ``out_dir`` that is a file or a ``.zarr``,
        two slides sharing an output, or an output that is, holds or lies in an input.
    """
    if parallel < 1:
        raise InputError(f"--parallel must be at least 1, got {parallel}")
    if out_dir.suffix == ".zarr":
        raise InputError("with several slides, --out is a folder for the outputs, not one .zarr")
    if out_dir.exists() and not out_dir.is_dir():
        raise not_a_folder_error(out_dir)
    outputs = plan_outputs(slides, out_dir)
    for output in outputs:
        check_output_path(output, slides)
    return outputs


def output_state(out: Path, slide: Path) -> str:
    """``"complete"`` (a report), ``"interrupted"`` (a run record, no report) or ``"new"``.

    Raises
    ------
    InputError
        When ``out`` holds the output, finished or not, of another slide.
    """
    owner = _owner(out)
    if owner is not None and Path(owner) != slide.resolve():
        raise InputError(f"{out} holds the output of another slide ({owner}); move it away or use --overwrite")
    if (out / REPORT_NAME).is_file():
        return "complete"
    return "interrupted" if is_wsiseg_output(out) else "new"


def _owner(out: Path) -> str | None:
    """The slide an output was made from: its report's input, else its run record's."""
    for path, keys in ((out / REPORT_NAME, ("input", "path")), (out / RECORD_DIR / "run.json", ("slide",))):
        try:
            value: Any = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, str):
            return value
    return None


def one_line(error: BaseException) -> str:
    """An error's message on one line."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())
