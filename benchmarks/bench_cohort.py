"""Resources of long-lived workers over a cohort: many small slides through one cluster.

    python benchmarks/bench_cohort.py [--slides 1000] [--size 512] [--every 50]
                                      [--model BUNDLE] [--out benchmarks/results] [--scratch DIR]

One local cluster of 2 worker processes (:func:`wsiseg.cluster.start_client`)
segments ``--slides`` synthetic slides one after another (each a
``--size`` square pyramidal TIFF, 128-pixel tiles, downsamples 1, 2, 4, made
just before its run and deleted with its output after it). Every ``--every``
slides it records, per worker process, the open file descriptors and the
resident memory (RSS) after the slide's release, the entries left in its
readers and arrays caches, the same for this driver process, and the mean
seconds per slide over the slides since the previous row. A flat cohort
keeps descriptors and memory constant however many slides it has run.

The JSON (``--out``/cohort-resources.json) is rewritten after every row, so
an interrupted run still leaves its figures; the Markdown table, with the
command on top, is written beside it and printed at the end.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (Stopwatch, add_results_argument, command_line, header, machine, make_parser, write_json,
                    write_result)

TILE = 128
FACTORS = (1, 2, 4)


def make_slide(path: Path, size: int, seed: int) -> Path:
    """A ``size`` square pyramidal TIFF of blocky noise with fine texture (like tissue at a glance)."""
    import numpy as np
    import tifffile

    from wsiseg.tiling import downsample_mean

    rng = np.random.default_rng(seed)
    cell = 16
    noise = rng.random((size // cell + 2, size // cell + 2, 3))
    big = np.kron(noise, np.ones((cell, cell, 1)))[:size, :size]
    image = (255 * (0.8 * big + 0.2 * rng.random((size, size, 3)))).astype(np.uint8)
    with tifffile.TiffWriter(path) as writer:
        for index, factor in enumerate(FACTORS):
            extra = {"resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER"} if index == 0 else {}
            writer.write(downsample_mean(image, factor), tile=(TILE, TILE), photometric="rgb", compression="zlib",
                         subfiletype=1 if index else 0, **extra)
    return path


def process_state() -> dict[str, Any]:
    """Open descriptors, RSS (MB) and cache entries of the calling process (run on every worker)."""
    import psutil

    from wsiseg import output, readers
    from wsiseg.run.worker import open_descriptors

    return {"fds": open_descriptors(), "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
            "readers": len(readers.READERS), "arrays": len(output._ARRAYS)}


def markdown(data: dict[str, Any]) -> list[str]:
    """The rows as a Markdown table, the command and the machine on top."""
    workers = data["workers"]
    names = [f"w{i}" for i in range(len(workers))]
    head = ["slides", "s/slide", *(f"fds {n}" for n in names), *(f"RSS MB {n}" for n in names),
            "fds driver", "RSS MB driver"]
    lines = [*header(data["command"], data["machine"]), "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in data["rows"]:
        per = [row["workers"].get(w, {}) for w in workers]
        cells = [row["slides"], f"{row['s_per_slide']:.2f}", *(p.get("fds", "-") for p in per),
                 *(p.get("rss_mb", "-") for p in per), row["driver"]["fds"], row["driver"]["rss_mb"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if not data["complete"]:
        lines += ["", "(stopped before the last slide)"]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--slides", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512, help="slide side in pixels")
    parser.add_argument("--every", type=int, default=50, help="slides between rows")
    parser.add_argument("--model", default=None, help="bundle path (default: the shipped model)")
    add_results_argument(parser, "--out")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for slides and outputs (default: a temp folder)")
    args = parser.parse_args(argv)

    import logging

    from wsiseg.cluster import start_client
    from wsiseg.config import RunOptions, TwoStageConfig
    from wsiseg.run import segment_slide
    from wsiseg.uncertainty import TileSelection

    logging.getLogger("distributed").setLevel(logging.ERROR)
    config = TwoStageConfig(tile_size=256, halo=32, stage1_block=64, stage1_halo=32,
                            selection=TileSelection.budget(0.5))
    options = RunOptions(model=args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    result = args.out / "cohort-resources.json"
    command = command_line(__file__, argv)
    scratch = Path(tempfile.mkdtemp(prefix="wsiseg-cohort-", dir=args.scratch))
    signal.signal(signal.SIGTERM, _stop)  # a stopped run still prints what it measured
    client = start_client(workers=2)
    data: dict[str, Any] = {}
    try:
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
        data = {
            "command": command, "date": time.strftime("%Y-%m-%d"), "machine": machine(),
            "slides_requested": args.slides, "size": args.size, "tile": TILE, "factors": list(FACTORS),
            "config": {"tile_size": config.tile_size, "halo": config.halo, "stage1_block": config.stage1_block,
                       "selection": "budget 0.5"},
            "model": args.model or "wsiseg:default", "workers": workers, "complete": False, "rows": [],
        }
        window, seconds = 0, 0.0  # slides and segment_slide seconds since the last row
        for i in range(args.slides):
            slide = make_slide(scratch / f"slide-{i:04d}.tif", args.size, seed=i)
            out = scratch / f"out-{i:04d}.zarr"
            with Stopwatch() as watch:
                report = segment_slide(slide, out, client, config, options)
            seconds += watch.seconds
            window += 1
            if report.status != "complete":
                raise RuntimeError(f"slide {i}: status {report.status!r}")
            shutil.rmtree(out)
            slide.unlink()
            if (i + 1) % args.every and i + 1 != args.slides:
                continue
            data["rows"].append({
                "slides": i + 1,
                "s_per_slide": round(seconds / window, 3),
                "workers": client.run(process_state),
                "driver": process_state(),
            })
            window, seconds = 0, 0.0
            write_json(result, data)
            row = data["rows"][-1]
            print(f"{row['slides']} slides, {row['s_per_slide']:.2f} s/slide: "
                  + ", ".join(f"{w}: {s['fds']} fds {s['rss_mb']} MB" for w, s in sorted(row["workers"].items())),
                  flush=True)
        data["complete"] = True
    finally:
        client.close()
        shutil.rmtree(scratch, ignore_errors=True)
        if data.get("rows"):
            print()
            write_result(args.out, result.stem, data, markdown(data))
            print(f"\nwrote {result} and {result.with_suffix('.md').name}", flush=True)
    return 0


def _stop(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
