"""What the benchmark scripts share: paths, the machine, the command line, timing, result files, arguments.

Scripts in ``benchmarks/`` run as ``python benchmarks/NAME.py`` (their folder
is then first on ``sys.path``) and import this module as ``common``. It
imports only the standard library when loaded, so that ``--help`` stays quick
and ``benchmarks/peers/`` scripts can use it from another environment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

#: The repository's root folder.
ROOT = Path(__file__).resolve().parents[1]
#: Where results are written unless a script's ``--results`` (or ``--out``) says otherwise.
RESULTS = ROOT / "benchmarks" / "results"
#: The real H&E example slide (CC0) that several studies read.
EXAMPLE_SLIDE = ROOT / "examples" / "data" / "CMU-1-Small-Region.svs"


# --------------------------------------------------------------------------- the machine


def cores() -> int:
    """CPU cores this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def set_torch_threads(threads: int | None = None) -> int:
    """Give torch ``threads`` threads (default: one per available core); returns the number set."""
    import torch

    threads = threads or cores()
    torch.set_num_threads(threads)
    return threads


def machine() -> str:
    """One line for a result: architecture, cores, torch threads (once torch is loaded), versions, date.

    torch's version is read from its package metadata, so describing the
    machine never imports torch.
    """
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:  # pragma: no cover - torch is a dependency
        torch_version = "?"
    torch = sys.modules.get("torch")
    threads = f" ({torch.get_num_threads()} torch threads)" if torch is not None else ""
    return (f"{platform.machine()}, {cores()} cores{threads}, torch {torch_version}, "
            f"python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stopwatch:
    """Wall seconds of a ``with`` block (``watch.seconds``; inside the block, the seconds so far)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.stopped: float | None = None

    def __enter__(self) -> Stopwatch:
        self.started, self.stopped = time.perf_counter(), None
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped = time.perf_counter()

    @property
    def seconds(self) -> float:
        return (self.stopped if self.stopped is not None else time.perf_counter()) - self.started


# --------------------------------------------------------------------------- the command and the results


def shown(path: str | os.PathLike[str]) -> str:
    """``path`` relative to the repository's root when it lies inside it, else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def command_line(script: str | os.PathLike[str], argv: list[str] | None = None) -> str:
    """``python benchmarks/NAME.py ARGS``: how to run ``script`` again with ``argv`` (default: this process's)."""
    return " ".join(["python", shown(script), *(sys.argv[1:] if argv is None else argv)])


def header(command: str, *notes: str) -> list[str]:
    """The Markdown lines every result starts with: the command in code, then ``notes`` (the machine, ...)."""
    return [f"`{command}`  ", *(f"{note}  " for note in notes[:-1]), *notes[-1:], ""]


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2, default=float) + "\n")
    os.replace(partial, path)


def write_result(folder: Path, stem: str, record: dict[str, Any], lines: list[str] | None = None) -> Path:
    """``folder/stem.json`` from ``record`` and, given Markdown ``lines``, ``folder/stem.md``, which is printed.

    ``record`` should hold the ``command`` that made it; returns the JSON's path.
    """
    path = folder / f"{stem}.json"
    write_json(path, record)
    if lines is not None:
        text = "\n".join(lines).rstrip("\n") + "\n"
        (folder / f"{stem}.md").write_text(text)
        print(text, end="", flush=True)
    return path


def pipeline_name(method: str, threshold: float | None) -> str:
    """A score row's path as the tables name it: ``baseline``, or ``two-stage t=T``."""
    return "baseline" if method == "baseline" else f"two-stage t={threshold:g}"


# --------------------------------------------------------------------------- arguments


def make_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser described by the first paragraph of a script's docstring."""
    return argparse.ArgumentParser(description=(doc or "").split("\n\n")[0].strip() or None)


def add_results_argument(parser: argparse.ArgumentParser, flag: str = "--results") -> None:
    """The folder results are written to (default ``benchmarks/results``)."""
    parser.add_argument(flag, type=Path, default=RESULTS,
                        help="folder for the JSON and Markdown results (default: benchmarks/results)")


def add_data_arguments(parser: argparse.ArgumentParser, limit: bool = True,
                       help: str = "the data set's folder") -> None:
    """``--data-root`` (required) and, with ``limit``, ``--limit N`` (the first N images of the split; 0: all)."""
    parser.add_argument("--data-root", type=Path, required=True, help=help)
    if limit:
        parser.add_argument("--limit", type=int, default=0, help="the first N images of the split only (0: all)")


def named_bundle(spec: str) -> tuple[str, str]:
    """``NAME=BUNDLE`` (an argparse ``type``) as ``(name, bundle)``."""
    name, sep, bundle = spec.partition("=")
    if not (name and sep and bundle):
        raise argparse.ArgumentTypeError(f"{spec!r}: expected NAME=BUNDLE")
    return name, bundle


def two_stage_pair(reference: str) -> Any:
    """A bundle (a path or a shipped name) with its Model 1 and Model 2 only: no baseline to score."""
    from wsiseg.bundle import Bundle, load_bundle, resolve_model

    loaded = load_bundle(resolve_model(reference))
    return Bundle({role: loaded.models[role] for role in ("model1", "model2")}, loaded.config)


def full_resolution_network(reference: str) -> Any:
    """The network a bundle runs on every tile at full resolution, for peers: its ``model`` (a separate
    baseline), else its Model 2 (which ``--full-resolution`` runs everywhere with Model 1's context; a peer
    runs it without, the same network and work per tile)."""
    from wsiseg.bundle import load_bundle, resolve_model

    models = load_bundle(resolve_model(reference)).models
    return (models.get("model") or models["model2"]).eval()


def add_scoring_arguments(parser: argparse.ArgumentParser, many: bool = True) -> None:
    """``--model NAME=BUNDLE`` (repeatable with ``many``), ``--dataset`` (default NuInsSeg), the data and results."""
    parser.add_argument("--model", type=named_bundle, required=True, metavar="NAME=BUNDLE",
                        **({"action": "append"} if many else {}))
    parser.add_argument("--dataset", default="nuinsseg")
    add_data_arguments(parser)
    add_results_argument(parser)


# --------------------------------------------------------------------------- images


def tissue_mask(image: np.ndarray) -> np.ndarray:
    """Tissue pixels of an ``(H, W, 3)`` uint8 image: grey below 215 or saturation above 25."""
    grey = image.mean(axis=2)
    saturation = image.max(axis=2).astype("int16") - image.min(axis=2)
    return (grey < 215) | (saturation > 25)
