"""Segment a cohort of slides on a Dask cluster, several slides at a time.

    python pipelines/segment_cohort.py SLIDE_OR_FOLDER... --out OUTDIR
        [--list slides.txt] [--model BUNDLE] [--scheduler tcp://host:8786 | --workers N]
        [--parallel 2] [--threshold 0.25 | --budget F]

Every slide goes to ``OUTDIR/<name>.zarr``. A slide whose output already has
a complete report is skipped; one with an interrupted output is resumed.
``OUTDIR/manifest.csv`` gets one row per slide (done, skipped or failed, with
tile counts, seconds and the error line), and the exit status is 1 when any
slide failed. Slides run concurrently on one cluster: while one slide is in
its driver-side steps (selection, pyramid), the workers stay busy with the
others.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".btf", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu",
                  ".svslide", ".dcm", ".png", ".jpg", ".jpeg", ".bmp"}
MANIFEST_FIELDS = ["slide", "output", "status", "tiles_total", "tiles_refined", "refined_fraction", "seconds", "error"]


def find_slides(inputs: list[Path], listing: Path | None = None) -> list[Path]:
    """Slides named directly, found (not recursively) in folders, or listed one per line in a file."""
    found: list[Path] = []
    for item in inputs:
        if item.is_dir() and item.suffix != ".zarr":
            found.extend(sorted(p for p in item.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES))
        else:
            found.append(item)
    if listing is not None:
        found.extend(Path(line.strip()) for line in listing.read_text().splitlines() if line.strip())
    return found


def is_done(out: Path) -> bool:
    try:
        return json.loads((out / "report.json").read_text()).get("status") == "complete"
    except (OSError, json.JSONDecodeError):
        return False


def run_cohort(
    slides: list[Path], out_dir: Path, config: Any, options: Any, client: Any, parallel: int = 2
) -> list[dict[str, Any]]:
    """Segment ``slides`` into ``out_dir``; returns one manifest row per slide (input order)."""
    from dataclasses import replace

    from wsiseg.errors import WsisegError
    from wsiseg.run import default_output, segment_slide

    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[int, dict[str, Any]] = {}

    def one(index: int, slide: Path) -> dict[str, Any]:
        out = default_output(slide, out_dir)
        row = {"slide": str(slide), "output": str(out), "status": "", "tiles_total": "", "tiles_refined": "",
               "refined_fraction": "", "seconds": "", "error": ""}
        if is_done(out):
            report = json.loads((out / "report.json").read_text())
            row.update(status="skipped", tiles_total=report["tiles"]["total"], tiles_refined=report["tiles"]["refined"],
                       refined_fraction=round(report["tiles"]["refined_fraction"], 4))
            return row
        started = time.perf_counter()
        try:
            report = segment_slide(slide, out, client, config, replace(options, resume=out.exists(), overwrite=False))
        except WsisegError as exc:
            row.update(status="failed", error=str(exc), seconds=round(time.perf_counter() - started, 2))
            return row
        row.update(status="done", tiles_total=report["tiles"]["total"], tiles_refined=report["tiles"]["refined"],
                   refined_fraction=round(report["tiles"]["refined_fraction"], 4),
                   seconds=round(time.perf_counter() - started, 2))
        return row

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = {pool.submit(one, i, s): i for i, s in enumerate(slides)}
        for future in as_completed(futures):
            rows[futures[future]] = future.result()
            print(f"{rows[futures[future]]['status']:8s} {rows[futures[future]]['slide']}", flush=True)
    ordered = [rows[i] for i in range(len(slides))]
    with open(out_dir / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(ordered)
    return ordered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", type=Path, help="slides or folders of slides")
    parser.add_argument("--list", type=Path, default=None, help="a text file with one slide path per line")
    parser.add_argument("--out", type=Path, required=True, help="folder for the outputs and manifest.csv")
    parser.add_argument("--model", default=None, help="model bundle (default: the shipped model)")
    parser.add_argument("--scheduler", default=None, help="Dask scheduler address; default: a local cluster")
    parser.add_argument("--workers", type=int, default=None, help="local worker processes")
    parser.add_argument("--parallel", type=int, default=2, help="slides in flight at once")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, default=None)
    group.add_argument("--budget", type=float, default=None)
    args = parser.parse_args(argv)

    from wsiseg.cluster import start_client
    from wsiseg.errors import WsisegError
    from wsiseg.config import RunOptions
    from wsiseg.run import bundle_settings
    from wsiseg.uncertainty import TileSelection

    slides = find_slides(args.inputs, args.list)
    if not slides:
        print("Error: no slides given or found", file=sys.stderr)
        return 2
    selection = None  # the bundle's default threshold
    if args.budget is not None:
        selection = TileSelection.budget(args.budget)
    elif args.threshold is not None:
        selection = TileSelection.threshold(args.threshold)
    try:
        client = start_client(args.scheduler, args.workers)
    except WsisegError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    try:
        config = bundle_settings(args.model).for_slides().with_overrides(selection=selection)
        rows = run_cohort(slides, args.out, config, RunOptions(model=args.model), client, args.parallel)
    finally:
        client.close()
    failed = sum(row["status"] == "failed" for row in rows)
    print(f"{len(rows)} slides: {len(rows) - failed} done or skipped, {failed} failed; manifest {args.out / 'manifest.csv'}")
    return 1 if failed else 0


if __name__ == "__main__":  # LocalCluster spawns processes: keep the guard.
    sys.exit(main())
